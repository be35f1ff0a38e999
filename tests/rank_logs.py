"""The ranks' lines as the driver logs them (``sparkml_mnist.ranks``), collected for a test."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from sparkml_mnist.launcher.driver.events import RANKS_LOGGER


class _Collect(logging.Handler):
    def __init__(self, lines: list[tuple[int, str]]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((getattr(record, "rank", -1), record.getMessage()))


@contextlib.contextmanager
def rank_lines() -> Iterator[list[tuple[int, str]]]:
    """``with rank_lines() as lines:`` (rank, line) of every rank line the driver logs in the block."""
    logger = logging.getLogger(RANKS_LOGGER)
    lines: list[tuple[int, str]] = []
    handler, level = _Collect(lines), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
