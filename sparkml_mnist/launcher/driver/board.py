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
import unicodedata
from dataclasses import dataclass, replace
from typing import Callable

from sparkml_mnist.launcher.channel import clean_line
from sparkml_mnist.launcher.protocol import Heartbeat

logger = logging.getLogger("sparkml_mnist.progress")

DEFAULT_INTERVAL_S = 30.0  # plain lines, when nothing redraws in place
LIVE_REFRESH_S = 0.5
STRAGGLER_RATIO = 0.8  # a rank below this fraction of the fastest rank's step rate is a straggler
# Unicode categories that move the cursor or reorder or hide text on a terminal: controls (tab included),
# format characters (bidi overrides, zero-width), line and paragraph separators.
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})

LiveDisplay = Callable[[list[str]], None]  # shows these lines in place (an empty list clears them)
_live_display: LiveDisplay | None = None


def set_live_display(display: LiveDisplay | None) -> None:
    """Registered by a terminal front end (the CLI); library users get plain periodic lines."""
    global _live_display
    _live_display = display


@dataclass
class _Seen:
    """A rank's last heartbeat, and when it arrived."""

    beat: Heartbeat
    at: float | None = None

    def rate(self, now: float) -> float | None:
        """Steps a second since the rank's first step."""
        beat = self.beat
        if beat.first_step_at is None or beat.steps == 0:
            return None
        seconds = (self.at or now) - beat.first_step_at
        return beat.steps / seconds if seconds > 0 else None

    def images_per_s(self, now: float) -> float | None:
        """Images a second in the rank's current fit."""
        beat = self.beat
        start = beat.fit_started_at or beat.first_step_at
        if start is None or not beat.fit_examples:
            return None
        seconds = (self.at or now) - start
        return beat.fit_examples / seconds if seconds > 0 else None


def one_line(text: str) -> str:
    """What a rank sent (its label, its host) as it may stand in a console line: printable characters only.

    ``clean_line`` leaves the tab and Unicode's invisible characters, which can still reorder or hide what
    the board shows (a bidi override makes "rank 1" read backwards).
    """
    return "".join(char for char in clean_line(text) if unicodedata.category(char) not in UNPRINTABLE_CATEGORIES)


class LiveBoard:
    """What every rank reported last; rendered as one line per rank."""

    def __init__(self, size: int, title: str = "", interval_s: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.size = size
        self.title = one_line(title)
        self.interval_s = interval_s if interval_s is not None else DEFAULT_INTERVAL_S
        self._clock = clock
        self.ranks = [_Seen(Heartbeat()) for _ in range(size)]
        self._lock = threading.Lock()

    def update(self, rank: int, beat: Heartbeat) -> None:
        with self._lock:
            done = beat.done or self.ranks[rank].beat.done  # a rank that said done stays done
            label = one_line(beat.label) if beat.label is not None else None
            self.ranks[rank] = _Seen(replace(beat, done=done, label=label, host=one_line(beat.host)), self._clock())

    def task_started(self, rank: int, host: str) -> None:
        with self._lock:
            self.ranks[rank].beat.host = one_line(host)

    def lines(self) -> list[str]:
        now = self._clock()
        with self._lock:
            return [self._line(rank, state, now) for rank, state in enumerate(self.ranks)]

    def _line(self, rank: int, seen: _Seen, now: float) -> str:
        beat = seen.beat
        parts = [f"{beat.label or self.title} rank {rank} ({beat.host}):".strip()]
        if beat.steps == 0 and not beat.done:
            return parts[0] + " starting"
        if beat.epoch is not None:
            parts.append(f"epoch {beat.epoch}" + (f"/{beat.epochs}" if beat.epochs else ""))
        parts.append(f"step {beat.fit_steps or beat.steps}")
        if beat.loss is not None:
            parts.append(f"loss {beat.loss:.4f}")
        images = seen.images_per_s(now)
        if images is not None:
            parts.append(f"{images:,.0f} img/s")
        if beat.done:
            parts.append("done")
        return "  ".join(parts)

    def summary(self) -> dict:
        """Per-rank step rates and the straggler, if any, for report.json."""
        now = self._clock()
        with self._lock:
            rates = {rank: seen.rate(now) for rank, seen in enumerate(self.ranks)}
            hosts = {rank: seen.beat.host for rank, seen in enumerate(self.ranks)}
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
