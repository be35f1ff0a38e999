"""A run's state beside its output folder: the claim on the output, finished variants, checkpoints.

``<parent>/.<output name>.state/`` is created when a run starts and locked (``flock``) for as long as
it runs, so a second run into the same ``--output`` is refused at once instead of racing the first.
Each variant's result and model land there as the variant finishes, and rank 0's checkpoints as each
epoch ends (sent to the driver), or, with the run's ``checkpoint_dir``, in a folder of this run's own
under it (``<checkpoint_dir>/<output name>-<id>``, written there by rank 0; state.json names it);
``sparkml-mnist train --resume OUTPUT`` reads them back: finished variants are kept, the one in flight
resumes from its last epoch. Both are removed once the report is in place.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sparkml_mnist.config import RunConfig, from_mapping
from sparkml_mnist.launcher.checkpoints import CheckpointFiles, join, normalized
from sparkml_mnist.launcher.driver.store import CheckpointStore
from sparkml_mnist.errors import ConfigError, SparkMnistError
from sparkml_mnist.report import VariantResult

STATE_SUFFIX = ".state"
LOCK_FILE = ".lock"
STATE_FILE = "state.json"
RESULT_FILE = "result.json"
VARIANTS_DIR = "variants"
CHECKPOINTS_DIR = "checkpoints"
STATE_VERSION = 1
CHECKPOINTS_KEY = "checkpoints"  # state.json: this run's folder under its checkpoint_dir, when it has one
RUN_ID_CHARS = 12  # names this run's folder under a checkpoint_dir shared by several runs
RESUMED = " (resumed)"


class StateError(SparkMnistError):
    """The run's state cannot be written or read (disk full, permissions); says what to change."""


def state_folder(output: Path) -> Path:
    output = output.absolute()
    return output.parent / f".{output.name}{STATE_SUFFIX}"


def _stored_state(output: Path) -> dict[str, Any]:
    path = state_folder(output) / STATE_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict) or not isinstance(document.get("run"), dict):
            raise ValueError("no run settings in it")
    except FileNotFoundError:
        raise ConfigError(f"{output}: there is no unfinished run to resume (no {path})") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read the run's state ({error}); start afresh with --overwrite") from None
    return document


def stored_run(output: Path) -> RunConfig:
    """The run config an unfinished run into ``output`` was started with (for ``--resume``).

    Its output is ``output`` as given now: the stored one may be relative to another working folder.
    """
    settings = dict(_stored_state(output)["run"])
    settings["output"] = str(output)
    source = str(settings.pop("source", state_folder(output) / STATE_FILE))
    return from_mapping(RunConfig, settings, source if source.endswith(RESUMED) else source + RESUMED)


def stored_overwrite(output: Path) -> bool:
    """Whether that run was started with ``--overwrite`` (its report then replaces the one in ``output``)."""
    return bool(_stored_state(output).get("overwrite", False))


def _stored_checkpoints(folder: Path) -> str | None:
    """The run's folder under its checkpoint_dir, as its state.json names it (None: it has none)."""
    try:
        location = json.loads((folder / STATE_FILE).read_text(encoding="utf-8")).get(CHECKPOINTS_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return location if isinstance(location, str) else None


class RunState:
    """The claimed state folder of one run (a context manager: leaving it releases the claim)."""

    def __init__(self, folder: Path, lock_fd: int) -> None:
        self.folder = folder
        self._lock_fd = lock_fd
        self.checkpoint_location: str | None = None  # this run's folder under its checkpoint_dir (state.json)

    @classmethod
    def claim(cls, output: Path, run: RunConfig, resume: bool = False, overwrite: bool = False) -> RunState:
        """Claim ``output`` for this run, or say why not (another run holds it; an unfinished one left it)."""
        folder = state_folder(output)
        existed = (folder / STATE_FILE).exists()
        if resume and not existed:
            raise ConfigError(f"{output}: there is no unfinished run to resume (no {folder / STATE_FILE})")
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(folder / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as error:
            raise StateError(f"cannot create the run's state folder {folder} ({error.strerror}); "
                             "choose an --output on a writable disk") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(lock_fd)
            raise ConfigError(f"{output}: another run ({holder}) is writing this output now; wait for it to end, "
                              "or choose another --output") from None
        if existed and not resume and not overwrite:
            os.close(lock_fd)
            raise ConfigError(
                f"{output}: an unfinished run left its state in {folder}; continue it with "
                f"`sparkml-mnist train --resume {output}`, or start afresh with --overwrite"
            )
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        state = cls(folder, lock_fd)
        if existed and overwrite and not resume:
            state.checkpoint_location = _stored_checkpoints(folder)
            state._clear()
        if existed and resume:
            state.checkpoint_location = _stored_checkpoints(folder)
        if not (folder / STATE_FILE).exists():
            if run.checkpoint_dir is not None:
                run_id = f"{output.absolute().name}-{uuid.uuid4().hex[:RUN_ID_CHARS]}"
                state.checkpoint_location = join(normalized(run.checkpoint_dir), run_id)
            try:
                state._write_json(folder / STATE_FILE, {"version": STATE_VERSION, "run": asdict(run),
                                                          "overwrite": overwrite,
                                                          CHECKPOINTS_KEY: state.checkpoint_location})
            except OSError as error:
                state.release()
                raise StateError(f"cannot write the run's state in {folder} ({error.strerror}); choose an "
                                 "--output on a writable disk with free space") from None
        return state

    def __enter__(self) -> RunState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1

    # -- variants --------------------------------------------------------------------------------

    def variant_folder(self, name: str) -> Path:
        return self.folder / VARIANTS_DIR / name

    def checkpoints(self) -> CheckpointStore:
        """Rank 0's checkpoints, one key (a folder) per variant: in this run's folder under its checkpoint_dir
        (rank 0 writes them there), else in the state folder (the driver writes what rank 0 sends)."""
        if self.checkpoint_location is not None:
            return CheckpointStore(self.checkpoint_location, direct=True)
        return CheckpointStore(self.folder / CHECKPOINTS_DIR)

    def finished(self, name: str) -> VariantResult | None:
        """A variant an earlier attempt of this run finished (result and model kept), else None."""
        folder = self.variant_folder(name)
        try:
            saved = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise StateError(f"{folder / RESULT_FILE}: cannot read a finished variant ({error}); "
                             "remove that folder to train the variant again") from None
        return VariantResult.from_dict(saved["result"], [folder / name for name in saved["model_files"]])

    def save_finished(self, result: VariantResult) -> VariantResult:
        """Keep a finished variant (its model moved into the state folder); returns it pointing there."""
        folder = self.variant_folder(result.name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            kept = []
            for source in result.model_files:
                destination = folder / source.name
                if source.absolute() != destination.absolute():
                    shutil.move(str(source), destination)
                kept.append(destination)
            result.model_files = kept
            self._write_json(folder / RESULT_FILE, {"result": result.to_dict(), "model_files": [p.name for p in kept]})
        except OSError as error:
            raise StateError(f"cannot keep variant {result.name!r} in {folder} ({error.strerror}); free space or "
                             "fix permissions, then `sparkml-mnist train --resume` the run") from None
        # Its last checkpoint stays until the run completes: a retried attempt's ranks see there that it is done.
        return result

    def complete(self) -> None:
        """The report is in place: the state has served its purpose (removed while still claimed)."""
        self._remove_checkpoint_folder()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.release()

    def holds_work(self) -> bool:
        """Whether anything of the run was kept (a checkpoint, a finished variant) for ``--resume``."""
        kept = (path for path in self.folder.rglob("*") if path.is_file())
        if any(path.name not in (STATE_FILE, LOCK_FILE) for path in kept):
            return True
        if self.checkpoint_location is None:
            return False
        try:
            return bool(CheckpointFiles(self.checkpoint_location).keys())
        except SparkMnistError:  # cannot tell: keep the state, so that --resume can look again
            return True

    # -- files ----------------------------------------------------------------------------------

    def _remove_checkpoint_folder(self) -> None:
        if self.checkpoint_location is not None:
            try:
                CheckpointFiles(self.checkpoint_location).remove_all()
            except SparkMnistError:  # cannot be opened now: what is left there is only a leftover
                pass

    def _clear(self) -> None:
        self._remove_checkpoint_folder()
        self.checkpoint_location = None
        for item in self.folder.iterdir():
            if item.name != LOCK_FILE:
                shutil.rmtree(item) if item.is_dir() else item.unlink()

    def _write_json(self, path: Path, document: Any) -> None:
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(partial, path)
