"""The driver's side of the channel for one attempt, and the package's logging of what ranks say.

Every message a rank sends arrives here, parsed once: heartbeats go to the watchdog and the live
board, reports and fetches to the attempt's receiver, log lines to the ``sparkml_mnist.ranks`` logger, a rank's own
failure report is kept so the first failing rank is named.

The package never adds a logging handler. As long as nobody configured logging (a notebook, a script
calling ``run_job``), INFO lines still reach stderr as plain text, the way ``print`` did; once the
application (or the CLI) configures a handler, every line goes through it instead (rank lines carry
``rank`` and ``stream`` as record fields).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from sparkml_mnist.launcher.channel import Event, clean_line
from sparkml_mnist.launcher.driver.board import LiveBoard
from sparkml_mnist.launcher.driver.reports import AttemptReceiver
from sparkml_mnist.launcher.driver.watchdog import Watchdog
from sparkml_mnist.launcher.failures import RankFailedError, failure_from_event
from sparkml_mnist.launcher.protocol import (
    FETCH, HEARTBEAT, LOG, MAX_HOST_CHARS, RANK_FAILED, REPORT, TASK_STARTED, Heartbeat,
)
from sparkml_mnist.launcher.tf_notices import is_native_notice, notices_wanted

RANKS_LOGGER = "sparkml_mnist.ranks"
STREAMS = ("stdout", "stderr", "log")


def _configured(logger: logging.Logger) -> bool:
    return logger.hasHandlers()


def info(logger: logging.Logger, message: str) -> None:
    """INFO through ``logger``; plain stderr when logging was never configured (Python would drop it)."""
    if _configured(logger):
        logger.info(message)
    else:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def rank_line(rank: int, stream: str, line: str) -> None:
    """One line a rank sent to the driver, as a record of ``sparkml_mnist.ranks`` with its rank
    (``[rank r] line`` on stderr while logging is not configured).

    TensorFlow's native start-up notices are left out unless asked for (``launcher.tf_notices``).
    """
    if is_native_notice(line) and not notices_wanted():
        return
    logger = logging.getLogger(RANKS_LOGGER)
    if _configured(logger):
        logger.info(line, extra={"rank": rank, "stream": stream})
    else:
        sys.stderr.write(f"[rank {rank}] {line}\n")
        sys.stderr.flush()


class AttemptEvents:
    """Dispatches one attempt's messages; keeps the earliest first step and the first rank failure."""

    def __init__(self, watchdog: Watchdog, board: LiveBoard, receiver: AttemptReceiver) -> None:
        self.watchdog = watchdog
        self.board = board
        self.receiver = receiver  # this attempt's reports and fetches: it answers only this attempt's ranks
        self.first_step_at: float | None = None
        self.first_failure: RankFailedError | None = None  # the first rank to report its own exception

    def on_event(self, rank: int, event: Event) -> Event | list[Event] | None:
        kind = event["type"]
        if kind == HEARTBEAT:
            beat = Heartbeat.from_message(event)
            self.watchdog.heartbeat(rank, beat)
            self.board.update(rank, beat)
            first = beat.first_step_at
            if first is not None and (self.first_step_at is None or first < self.first_step_at):
                self.first_step_at = first
        elif kind == TASK_STARTED:
            host = _text(event.get("host")) or "?"
            self.watchdog.task_started(rank, host)
            self.board.task_started(rank, host)
        elif kind == LOG and event.get("stream") in STREAMS:
            rank_line(rank, event["stream"], clean_line(str(event.get("line", ""))))
        elif kind == REPORT:
            return self.receiver.receive(rank, event)
        elif kind == FETCH:
            return self.receiver.fetch(rank, event)
        elif kind == RANK_FAILED and self.first_failure is None:
            self.first_failure = failure_from_event(rank, event)
        return None


def _text(value: Any) -> str | None:
    return clean_line(value)[:MAX_HOST_CHARS] if isinstance(value, str) else None
