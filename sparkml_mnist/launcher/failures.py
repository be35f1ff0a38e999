"""What each rank reports back, and the errors a run raises on the driver.

A failing rank's details travel inside the Spark task's exception message as one base64 JSON
marker, so the driver can name the rank and show its own traceback instead of Spark's Py4J
wall, over classic Spark and Spark Connect alike. A rank that raises also tells the driver at
once over the run's channel, so that when several fail (the others because the first one left their
collectives) the driver names the first, not the one whose task Spark happened to report.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from sparkml_mnist.errors import LaunchError
from sparkml_mnist.launcher.protocol import RANK_FAILED

_MARKER_PREFIX = "[sparkml-mnist-rank-failure:"
_MARKER_SUFFIX = "]"
_MARKER_PATTERN = re.compile(re.escape(_MARKER_PREFIX) + r"([A-Za-z0-9+/=]+)" + re.escape(_MARKER_SUFFIX))

EXCEPTION = "exception"  # the user function (or the rank's set-up) raised
CRASH = "crash"  # the rank's process died without reporting (signal, os._exit, out of memory)
# The driver refused what the rank sent or asked for, for a reason a retry cannot change (its disk is
# full or not writable, a cap): the launcher does not retry it; the message says what to fix.
REFUSED = "refused"


@dataclass
class RankError:
    """Why one rank failed, with the worker-side traceback or the crashed process's output tail."""

    kind: str
    error_type: str
    message: str
    traceback: str = ""
    exit_code: int | None = None
    output_tail: str = ""
    steps: int | None = None  # training steps the rank had taken when it failed (None: unknown)
    progress: int | None = None  # its progress counter then (steps and reports): where it failed


@dataclass
class RankRecord:
    """One rank's run: where it ran, its return value (or error), timings and how much it trained."""

    rank: int
    host: str
    pid: int | None
    value: Any = None
    error: RankError | None = None
    started_at: float | None = None
    ended_at: float | None = None
    steps: int = 0
    examples_seen: int | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        """Everything but ``value`` (which travels pickled, beside it)."""
        data = asdict(self)
        data.pop("value")
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str, value: Any = None) -> RankRecord:
        data = json.loads(text)
        error = data.pop("error")
        return cls(**data, value=value, error=RankError(**error) if error else None)


class PreflightError(LaunchError):
    """The run cannot start on this cluster as configured; nothing was launched."""


class ReportRefusedError(LaunchError):
    """The driver could not keep, or refused, what a rank reported or asked for: its checkpoint folder
    failed (disk full, permission denied) or a cap was reached. A retry would fail the same way, so the
    launcher makes none; the message names the folder or the cap, and what to do."""


class RankFailedError(LaunchError):
    """A rank raised or crashed; ``rank``, ``host`` and ``error`` (with its traceback) say which and why."""

    def __init__(self, rank: int, host: str, error: RankError) -> None:
        self.rank = rank
        self.host = host
        self.error = error
        super().__init__(describe_failure(rank, host, error))

    @property
    def final(self) -> bool:
        """The rank was refused something a retry cannot change (``REFUSED``): not retried."""
        return self.error.kind == REFUSED


def error_kind(error: BaseException) -> str:
    """The ``RankError.kind`` of an exception a rank raised: ``REFUSED`` for the driver's refusal,
    also when the function wrapped it (its cause or context), else ``EXCEPTION``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ReportRefusedError):
            return REFUSED
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return EXCEPTION


def is_final(error: LaunchError) -> bool:
    """A failure no retry can fix: the cluster or a setting must change first."""
    return isinstance(error, (PreflightError, ReportRefusedError)) or (
        isinstance(error, RankFailedError) and error.final)


class RankStalledError(LaunchError):
    """Ranks stopped making progress (or never started) for longer than a timeout; the attempt was ended."""

    def __init__(self, ranks: list[int], hosts: list[str], reason: str, timeout_s: float,
                 setting: str = "progress_timeout_s") -> None:
        self.ranks = ranks
        self.hosts = hosts
        self.reason = reason
        self.timeout_s = timeout_s
        self.setting = setting
        where = ", ".join(f"rank {rank} on {host}" for rank, host in zip(ranks, hosts))
        super().__init__(
            f"{where}: {reason}; the run was ended after {setting}={timeout_s:g}. If that rank is "
            f"legitimately slow (a long first step, rank-0-only work), raise {setting}"
        )


def describe_failure(rank: int, host: str, error: RankError) -> str:
    """The driver-side message: which rank, where, what, and the worker's own traceback or output."""
    if error.kind == CRASH:
        head = f"rank {rank} on {host} crashed: its process exited with code {error.exit_code} without a result"
        detail = f"Last lines of its stderr:\n{error.output_tail}" if error.output_tail else "It wrote nothing to stderr."
        return f"{head}.\n{detail}"
    head = f"rank {rank} on {host} failed: {error.error_type}: {error.message}"
    return f"{head}\nTraceback from rank {rank}:\n{error.traceback}" if error.traceback else head


def failure_marker(rank: int, host: str, error: RankError) -> str:
    """A single line the driver finds in Spark's task-failure text and decodes back."""
    payload = json.dumps({"rank": rank, "host": host, "error": asdict(error)})
    return _MARKER_PREFIX + base64.b64encode(payload.encode("utf-8")).decode("ascii") + _MARKER_SUFFIX


_REPORTED_TEXT_CHARS = 16_384  # each text field of that report: inside the 1 MiB frame cap even as \uXXXX


def failure_event(host: str, error: RankError) -> dict[str, Any]:
    fields = {name: value[-_REPORTED_TEXT_CHARS:] if isinstance(value, str) else value
              for name, value in asdict(error).items()}
    return {"type": RANK_FAILED, "host": host, "error": fields}


def failure_from_event(rank: int, event: dict[str, Any]) -> RankFailedError | None:
    """The ``RankFailedError`` a rank's ``failure_event`` describes (None: not one)."""
    error, host = event.get("error"), event.get("host")
    if not isinstance(error, dict) or not isinstance(host, str):
        return None
    known = {name: error[name] for name in RankError.__dataclass_fields__ if name in error}
    if not all(isinstance(known.get(name), str) for name in ("kind", "error_type", "message")):
        return None
    return RankFailedError(rank, host, RankError(**known))


def find_failure(text: str) -> RankFailedError | None:
    """The first rank failure marked in ``text`` (a Spark exception's message), if any."""
    match = _MARKER_PATTERN.search(text)
    if match is None:
        return None
    data = json.loads(base64.b64decode(match.group(1)).decode("utf-8"))
    return RankFailedError(data["rank"], data["host"], RankError(**data["error"]))
