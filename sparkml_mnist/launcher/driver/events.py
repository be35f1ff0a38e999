"""The package's loggers, visible without configuration and routable with it.

Everything goes through named ``logging`` loggers (``sparkml_mnist.*``; the ranks' lines through
``sparkml_mnist.ranks`` with the rank and stream attached as record fields). The package never adds a
handler. As long as nobody configured logging (a notebook, a script calling ``run_job``), INFO lines
still reach stderr as plain text, the way ``print`` did; once the application (or the CLI) configures
a handler, every line goes through it instead.
"""

from __future__ import annotations

import logging
import sys

RANKS_LOGGER = "sparkml_mnist.ranks"


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
    """One line a rank sent to the driver, as a record of ``sparkml_mnist.ranks`` with its rank."""
    logger = logging.getLogger(RANKS_LOGGER)
    if _configured(logger):
        logger.info(line, extra={"rank": rank, "stream": stream})
    else:
        sys.stderr.write(f"[rank {rank}] {line}\n")
        sys.stderr.flush()
