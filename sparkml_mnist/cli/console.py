"""The command line's console: one handler for everything the package logs, rank lines included, with
the ranks' live progress kept in place under the log on a terminal.

Configured once, by the CLI (``-v``/``-q``); library code never touches handlers. On a terminal the
progress lines are redrawn in place (ANSI: cursor up, clear to the end of the screen); elsewhere the
progress board logs plain lines now and then (``launcher.driver.board``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from datetime import datetime
from typing import IO, Iterator

from sparkml_mnist.launcher.driver import board as progress
from sparkml_mnist.launcher.driver.events import RANKS_LOGGER
from sparkml_mnist.launcher.tf_notices import SHOW_NOTICES_ENV

PACKAGE_LOGGER = "sparkml_mnist"
# Advice of libraries that does not apply here (MLflow asks for type hints its schemas cannot express for an
# image tensor: ``mlflow_model.py`` says why ``predict`` has none). Dropped from the console, nothing else.
NOT_FOR_US = ("Add type hints to the `predict` method",)
QUIET, NORMAL, VERBOSE = -1, 0, 1
MLFLOW_LOGGING_LEVEL_ENV = "MLFLOW_LOGGING_LEVEL"
_CURSOR_UP = "\x1b[{}A"
_CLEAR_DOWN = "\r\x1b[J"


class ConsoleFormatter(logging.Formatter):
    """``[rank r] line`` for the ranks, ``warning: ...`` for warnings, plain text otherwise; with a time at -v."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.name == RANKS_LOGGER and hasattr(record, "rank"):
            text = f"[rank {record.rank}] {text}"  # type: ignore[attr-defined]
        elif record.levelno >= logging.ERROR:
            text = f"error: {text}"
        elif record.levelno >= logging.WARNING:
            text = f"warning: {text}"
        if record.exc_info and self.verbose:
            text += "\n" + self.formatException(record.exc_info)
        if self.verbose:
            stamp = datetime.fromtimestamp(record.created).isoformat(timespec="milliseconds")
            text = f"{stamp} {record.name}: {text}"
        return text


class ConsoleHandler(logging.Handler):
    """Writes records to ``stream``; on a terminal, keeps a block of live lines below them."""

    def __init__(self, stream: IO[str], live: bool) -> None:
        super().__init__()
        self.stream = stream
        self.live = live
        self._footer: list[str] = []
        self._lock = threading.RLock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            with self._lock:
                self._clear()
                self.stream.write(text + "\n")
                self._draw()
                self.stream.flush()
        except Exception:  # a broken console must not end the run
            self.handleError(record)

    def show(self, lines: list[str]) -> None:
        """The live block: these lines, in place of the previous ones."""
        with self._lock:
            self._clear()
            self._footer = list(lines)
            self._draw()
            self.stream.flush()

    def _clear(self) -> None:
        if self._footer:
            self.stream.write(_CURSOR_UP.format(len(self._footer)) + _CLEAR_DOWN)

    def _draw(self) -> None:
        for line in self._footer:
            self.stream.write(line + "\n")


def configure(verbosity: int, stream: IO[str] | None = None) -> ConsoleHandler:
    """The CLI's logging: -q warnings and errors only, default progress, -v debug and TensorFlow's notices."""
    stream = stream or sys.stderr
    live = stream.isatty() and verbosity > QUIET and os.environ.get("TERM") != "dumb"
    handler = ConsoleHandler(stream, live)
    handler.setFormatter(ConsoleFormatter(verbose=verbosity >= VERBOSE))
    package = logging.getLogger(PACKAGE_LOGGER)
    package.handlers[:] = [handler]
    package.propagate = False
    package.setLevel({QUIET: logging.WARNING, NORMAL: logging.INFO}.get(verbosity, logging.DEBUG))
    warnings_logger = logging.getLogger("py.warnings")  # warnings.warn(...) reach the user as warnings
    warnings_logger.filters[:] = [lambda record: not any(text in record.getMessage() for text in NOT_FOR_US)]
    warnings_logger.handlers[:] = [handler]
    warnings_logger.propagate = False
    logging.captureWarnings(True)
    if verbosity >= VERBOSE:
        os.environ[SHOW_NOTICES_ENV] = "1"
    if verbosity < VERBOSE:  # MLflow configures its own stderr handler when imported; it reads this first
        os.environ.setdefault(MLFLOW_LOGGING_LEVEL_ENV, "WARNING")  # its INFO lines (schema, signature) at -v
    progress.set_live_display(handler.show if live else None)
    return handler


@contextlib.contextmanager
def configured(verbosity: int, stream: IO[str] | None = None) -> Iterator[ConsoleHandler]:
    """``configure`` for one command, then the loggers, warnings capture and environment as they were.

    ``cli.main`` may be called in a process that goes on (a notebook, a wheel task, a test): its
    handler must not outlive the command, writing to a stream that may be closed by then.
    """
    loggers = [logging.getLogger(name) for name in (PACKAGE_LOGGER, "py.warnings")]
    saved = [(logger, logger.handlers[:], logger.filters[:], logger.propagate, logger.level) for logger in loggers]
    environment = {key: os.environ.get(key) for key in (SHOW_NOTICES_ENV, MLFLOW_LOGGING_LEVEL_ENV)}
    capturing = getattr(logging, "_warnings_showwarning", None) is not None  # logging keeps no public flag
    try:
        yield configure(verbosity, stream)
    finally:
        progress.set_live_display(None)
        for logger, handlers, filters, propagate, level in saved:
            logger.handlers[:], logger.filters[:], logger.propagate = handlers, filters, propagate
            logger.setLevel(level)
        logging.captureWarnings(capturing)
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
