"""Live progress of every rank, on the driver: step, epoch, loss and images/s from the ranks' heartbeats.

A terminal front end (the CLI's console handler) registers a live display: the ranks' lines are then
redrawn in place under the log. Without one (spark-submit logs, Databricks job output, a notebook),
the board logs one plain line per rank every ``interval_s``. The launcher knows nothing of epochs'
meaning: ``epoch`` and ``loss`` are whatever the rank's progress callback reported.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger("sparkml_mnist.progress")

DEFAULT_INTERVAL_S = 30.0  # plain lines, when nothing redraws in place
LIVE_REFRESH_S = 0.5
STRAGGLER_RATIO = 0.8  # a rank below this fraction of the fastest rank's step rate is a straggler

LiveDisplay = Callable[[list[str]], None]  # shows these lines in place (an empty list clears them)
_live_display: LiveDisplay | None = None


def set_live_display(display: LiveDisplay | None) -> None:
    """Registered by a terminal front end (the CLI); library users get plain periodic lines."""
    global _live_display
    _live_display = display


@dataclass
class RankProgress:
    host: str = "?"
    steps: int = 0
    fit_steps: int | None = None  # steps of the current fit (what the live line shows), when the rank says
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    examples: int = 0
    first_step_at: float | None = None
    since: float | None = None  # the current fit's first step: images/s are counted from there
    last_seen: float | None = None
    done: bool = False
    label: str | None = None

    def rate(self, now: float) -> float | None:
        """Steps a second since the rank's first step."""
        if self.first_step_at is None or self.steps == 0:
            return None
        seconds = (self.last_seen or now) - self.first_step_at
        return self.steps / seconds if seconds > 0 else None

    def images_per_s(self, now: float) -> float | None:
        start = self.since or self.first_step_at
        if start is None or not self.examples:
            return None
        seconds = (self.last_seen or now) - start
        return self.examples / seconds if seconds > 0 else None


class ProgressBoard:
    """What every rank reported last; rendered as one line per rank."""

    def __init__(self, size: int, title: str = "", interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.size = size
        self.title = title
        self.interval_s = interval_s
        self._clock = clock
        self.ranks = [RankProgress() for _ in range(size)]
        self._lock = threading.Lock()

    def update(self, rank: int, event: dict) -> None:
        with self._lock:
            state = self.ranks[rank]
            state.last_seen = self._clock()
            for name, kind in (("steps", int), ("fit_steps", int), ("examples", int), ("epoch", int), ("epochs", int)):
                value = event.get(name)
                if isinstance(value, kind) and not isinstance(value, bool):
                    setattr(state, name, value)
            loss = event.get("loss")
            if isinstance(loss, (int, float)) and not isinstance(loss, bool):
                state.loss = float(loss)
            for name in ("first_step_at", "since"):
                value = event.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    setattr(state, name, float(value))
            host = event.get("host")
            if isinstance(host, str):
                state.host = host
            label = event.get("label")
            if isinstance(label, str):
                state.label = label[:100]
            state.done = state.done or event.get("done") is True

    def lines(self) -> list[str]:
        now = self._clock()
        with self._lock:
            return [self._line(rank, state, now) for rank, state in enumerate(self.ranks)]

    def _line(self, rank: int, state: RankProgress, now: float) -> str:
        parts = [f"{state.label or self.title} rank {rank} ({state.host}):".strip()]
        if state.steps == 0 and not state.done:
            return parts[0] + " starting"
        if state.epoch is not None:
            parts.append(f"epoch {state.epoch}" + (f"/{state.epochs}" if state.epochs else ""))
        parts.append(f"step {state.fit_steps if state.fit_steps is not None else state.steps}")
        if state.loss is not None:
            parts.append(f"loss {state.loss:.4f}")
        images = state.images_per_s(now)
        if images is not None:
            parts.append(f"{images:,.0f} img/s")
        if state.done:
            parts.append("done")
        return "  ".join(parts)

    def summary(self) -> dict:
        """Per-rank step rates and the straggler, if any, for report.json."""
        now = self._clock()
        with self._lock:
            rates = {rank: state.rate(now) for rank, state in enumerate(self.ranks)}
            hosts = {rank: state.host for rank, state in enumerate(self.ranks)}
        return straggler_summary(rates, hosts)

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: redraw in place when a live display is registered, else log every ``interval_s``."""
        last_logged = self._clock()
        while not stop.wait(LIVE_REFRESH_S):
            display = _live_display
            if display is not None:
                display(self.lines())
            elif self._clock() - last_logged >= self.interval_s:
                last_logged = self._clock()
                for line in self.lines():
                    logger.info(line)
        if _live_display is not None:
            _live_display([])

    def start(self) -> Callable[[], None]:
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), name="sparkml-mnist-progress", daemon=True)
        thread.start()

        def stop_board() -> None:
            stop.set()
            thread.join()

        return stop_board


def straggler_summary(rates: dict[int, float | None], hosts: dict[int, str]) -> dict:
    """``{"steps_per_s": {rank: rate}, "straggler": line or None}``: a rank below STRAGGLER_RATIO of the fastest."""
    known = {rank: rate for rank, rate in rates.items() if rate}
    line = None
    if len(known) > 1:
        fastest = max(known.values())
        slow = sorted(rank for rank, rate in known.items() if rate < STRAGGLER_RATIO * fastest)
        if slow:
            line = "; ".join(
                f"rank {rank} on {hosts.get(rank, '?')} ran at {known[rank] / fastest:.2f}x the fastest rank's step rate"
                for rank in slow
            )
    return {"steps_per_s": {str(rank): rate for rank, rate in rates.items()}, "straggler": line}
