"""A run's state beside its output folder: the claim on the output, finished variants, checkpoints.

``<parent>/.<output name>.state/`` is created when a run starts and locked (``flock``) for as long as
it runs, so a second run into the same ``--output`` is refused at once instead of racing the first.
Each variant's result and model land there as the variant finishes, and rank 0's checkpoints as each
epoch ends (sent to the driver), or, with the run's ``checkpoint_dir``, in a folder of this run's own
under it (``<checkpoint_dir>/<output name>-<id>``, written there by rank 0; state.json names it);
``sparkml-mnist train --resume OUTPUT`` reads them back: finished variants are kept, the one in flight
resumes from its last epoch. Both are removed once the report is in place.

The folder is private, because in a shared parent folder another user could make it first: a checkpoint
planted there would be evaluated and reported as this run's model. It is made 0700, and one found there
is used only when it is this user's, not a link, and open to nobody else (else one line says what to do,
exit 2, nothing touched); its files are opened relative to it and never through a link. state.json keeps
the run's settings masked as every other output does (``sparkml_mnist.redact``); the few values masking
hid (an input URI's ``user:password@``, a signed URL's token), which ``--resume`` needs to read the same
inputs, are kept apart in credentials.json (0600), only when there are any, and go with the state.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sparkml_mnist.config import RunConfig, from_mapping
from sparkml_mnist.launcher.checkpoints import PARTIAL_SUFFIX, CheckpointFiles, join, normalized
from sparkml_mnist.launcher.driver.store import CheckpointStore
from sparkml_mnist.errors import ConfigError, SparkMnistError
from sparkml_mnist.redact import redact_all
from sparkml_mnist.report import VariantResult
from sparkml_mnist.report.folder import remove_leftovers
from sparkml_mnist.job.state_folder import (
    StateError, entry, open_file, open_folder, read_json, write_json,
)

STATE_SUFFIX = ".state"
LOCK_FILE = ".lock"
STATE_FILE = "state.json"
CREDENTIALS_FILE = "credentials.json"  # the values state.json shows masked, as given (--resume reads them)
RESULT_FILE = "result.json"
VARIANTS_DIR = "variants"
CHECKPOINTS_DIR = "checkpoints"
STATE_VERSION = 1
CHECKPOINTS_KEY = "checkpoints"  # state.json: this run's folder under its checkpoint_dir, when it has one
MASKED_KEY = "masked"  # state.json: the settings shown masked ("run.train", "checkpoints"); credentials.json has them
RUN_ID_CHARS = 12  # names this run's folder under a checkpoint_dir shared by several runs
RESUMED = " (resumed)"
HOLDER_BYTES = 200  # the lock file names the run holding it: "pid N on HOST"
_PARTIAL_FILE = re.compile(rf"^\..+{re.escape(PARTIAL_SUFFIX)}$")  # ".<name>.partial": a write cut short


def state_folder(output: Path) -> Path:
    output = output.absolute()
    return output.parent / f".{output.name}{STATE_SUFFIX}"


# -- the state's own files ---------------------------------------------------------------------


def _check_entries(folder_fd: int, folder: Path) -> bool:
    """The state's own files are plain files of this user's (a link or another's is refused); whether
    state.json is there (an unfinished run)."""
    entry(folder_fd, folder, LOCK_FILE)
    entry(folder_fd, folder, CREDENTIALS_FILE)
    return entry(folder_fd, folder, STATE_FILE) is not None


# -- state.json: the run's settings, masked -------------------------------------------------------


def _masked(document: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``document`` with its credentials masked, the values masking changed (same nesting), and their names.

    A setting is kept whole in the second (``{"run": {"train": "s3a://K:S@b/x"}}``), so resume reads it as given.
    """
    plain = json.loads(json.dumps(document, default=str))
    masked = redact_all(plain)
    hidden: dict[str, Any] = {}
    names: list[str] = []
    for key, value in plain.items():
        if isinstance(value, dict):
            for field, item in value.items():
                if masked[key][field] != item:
                    hidden.setdefault(key, {})[field] = item
                    names.append(f"{key}.{field}")
        elif masked[key] != value:
            hidden[key] = value
            names.append(key)
    return masked, hidden, names


def _unmasked(document: dict[str, Any], hidden: Any) -> dict[str, Any]:
    """state.json's document with what credentials.json keeps put back (every name in its ``masked``)."""
    names = document.get(MASKED_KEY) or []
    if not isinstance(names, list) or not isinstance(hidden, dict):
        raise ValueError(f"{CREDENTIALS_FILE} does not match it")
    for name in names:
        key, _, field = str(name).partition(".")
        source, target = hidden.get(key), document.get(key)
        if field:
            if not isinstance(source, dict) or field not in source or not isinstance(target, dict):
                raise ValueError(f"{CREDENTIALS_FILE} lacks {name}")
            target[field] = source[field]
        elif key in hidden:
            document[key] = source
        else:
            raise ValueError(f"{CREDENTIALS_FILE} lacks {name}")
    return document


def _state_document(folder_fd: int, folder: Path, output: Path) -> dict[str, Any]:
    """state.json, with the values it shows masked put back from credentials.json."""
    path = folder / STATE_FILE
    try:
        document = read_json(folder_fd, folder, STATE_FILE)
        if not isinstance(document, dict) or not isinstance(document.get("run"), dict):
            raise ValueError("no run settings in it")
        if document.get(MASKED_KEY):
            try:
                hidden = read_json(folder_fd, folder, CREDENTIALS_FILE)
            except FileNotFoundError:
                raise ValueError(f"its {CREDENTIALS_FILE}, with the settings it shows masked, is missing") from None
            document = _unmasked(document, hidden)
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"{output}: there is no unfinished run to resume (no {path})") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read the run's state ({error}); start afresh with --overwrite") from None
    return document


def _stored_state(output: Path) -> dict[str, Any]:
    folder = state_folder(output)
    folder_fd = open_folder(folder, create=False)
    if folder_fd is None:
        raise ConfigError(f"{output}: there is no unfinished run to resume (no {folder / STATE_FILE})")
    try:
        _check_entries(folder_fd, folder)
        return _state_document(folder_fd, folder, output)
    finally:
        os.close(folder_fd)


def stored_run(output: Path) -> RunConfig:
    """The run config an unfinished run into ``output`` was started with (for ``--resume``), credentials included.

    Its output is ``output`` as given now: the stored one may be relative to another working folder.
    """
    settings = dict(_stored_state(output)["run"])
    settings["output"] = str(output)
    source = str(settings.pop("source", state_folder(output) / STATE_FILE))
    return from_mapping(RunConfig, settings, source if source.endswith(RESUMED) else source + RESUMED)


def stored_overwrite(output: Path) -> bool:
    """Whether that run was started with ``--overwrite`` (its report then replaces the one in ``output``)."""
    return bool(_stored_state(output).get("overwrite", False))


def check_state_folder(output: Path) -> None:
    """A state folder beside ``output``, if there is one, is this user's own and private (at plan time).

    Reads nothing in it and changes nothing: a planted one is refused before Spark starts.
    """
    folder = state_folder(output)
    folder_fd = open_folder(folder, create=False)
    if folder_fd is None:
        return
    try:
        _check_entries(folder_fd, folder)
    finally:
        os.close(folder_fd)


class RunState:
    """The claimed state folder of one run (a context manager: leaving it releases the claim)."""

    def __init__(self, folder: Path, lock_fd: int, folder_fd: int) -> None:
        self.folder = folder
        self._lock_fd = lock_fd
        self._folder_fd = folder_fd  # the folder as checked: its files are opened relative to it
        self.checkpoint_location: str | None = None  # this run's folder under its checkpoint_dir (state.json)

    @classmethod
    def claim(cls, output: Path, run: RunConfig, resume: bool = False, overwrite: bool = False) -> RunState:
        """Claim ``output`` for this run, or say why not (another run holds it; an unfinished one left it;
        its state folder is not this user's own). Leftovers of killed runs into ``output`` are then removed."""
        folder = state_folder(output)
        missing = ConfigError(f"{output}: there is no unfinished run to resume (no {folder / STATE_FILE})")
        folder_fd = open_folder(folder, create=not resume)
        if folder_fd is None:
            raise missing
        try:
            existed = _check_entries(folder_fd, folder)  # nothing is written before these checks
            if resume and not existed:
                raise missing
            try:
                lock_fd = open_file(folder_fd, folder, LOCK_FILE, os.O_CREAT | os.O_RDWR)
            except OSError as error:
                raise StateError(f"cannot create the run's state folder {folder} ({error.strerror}); "
                                 "choose an --output on a writable disk") from None
        except BaseException:
            os.close(folder_fd)
            raise
        state = cls(folder, lock_fd, folder_fd)
        try:
            state._hold(output, existed, resume, overwrite)
            state._start(output, run, existed, resume, overwrite)
        except BaseException:
            state.release()
            raise
        return state

    def _hold(self, output: Path, existed: bool, resume: bool, overwrite: bool) -> None:
        """Take the lock, or say who holds it; then clean what killed runs into ``output`` left."""
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, HOLDER_BYTES, 0).decode("utf-8", "replace").strip() or "another process"
            raise ConfigError(f"{output}: another run ({holder}) is writing this output now; wait for it to end, "
                              "or choose another --output") from None
        if existed and not resume and not overwrite:
            raise ConfigError(
                f"{output}: an unfinished run left its state in {self.folder}; continue it with "
                f"`sparkml-mnist train --resume {output}`, or start afresh with --overwrite"
            )
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            self._remove_partial_files()
            restored = remove_leftovers(output)
        except OSError as error:
            raise StateError(f"cannot clean what an earlier run into {output} left beside it ({error}); fix the "
                             "permissions of its parent folder, or choose another --output") from None
        if restored is not None and not overwrite:
            raise ConfigError(f"{output}: a report an --overwrite run had set aside ({restored.name}) was put back "
                              "there (that run was killed before its own was in place); run again with --overwrite "
                              "to replace it, or choose another --output")

    def _start(self, output: Path, run: RunConfig, existed: bool, resume: bool, overwrite: bool) -> None:
        """This run's state.json (a resumed run keeps its own), and where its checkpoints are."""
        folder = self.folder
        if existed:
            self.checkpoint_location = self._stored_checkpoints(output)
        if existed and overwrite and not resume:
            self._clear()
        if entry(self._folder_fd, folder, STATE_FILE) is not None:
            return
        if run.checkpoint_dir is not None:
            run_id = f"{output.absolute().name}-{uuid.uuid4().hex[:RUN_ID_CHARS]}"
            self.checkpoint_location = join(normalized(run.checkpoint_dir), run_id)
        masked, hidden, names = _masked({"version": STATE_VERSION, "run": asdict(run), "overwrite": overwrite,
                                         CHECKPOINTS_KEY: self.checkpoint_location})
        try:
            if hidden:  # first: a state.json that names masked settings always has them here
                write_json(self._folder_fd, folder, CREDENTIALS_FILE, hidden)
            write_json(self._folder_fd, folder, STATE_FILE, {**masked, MASKED_KEY: names})
        except OSError as error:
            raise StateError(f"cannot write the run's state in {folder} ({error.strerror}); choose an "
                             "--output on a writable disk with free space") from None

    def _stored_checkpoints(self, output: Path) -> str | None:
        """The run's folder under its checkpoint_dir, as its state names it (None: it has none, or it cannot
        be read: an --overwrite run starts afresh; --resume read the same state when it planned)."""
        try:
            location = _state_document(self._folder_fd, self.folder, output).get(CHECKPOINTS_KEY)
        except ConfigError:
            return None
        return location if isinstance(location, str) else None

    def __enter__(self) -> RunState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1
        if self._folder_fd >= 0:
            os.close(self._folder_fd)
            self._folder_fd = -1

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
            saved = read_json(self._folder_fd, self.folder, f"{VARIANTS_DIR}/{name}/{RESULT_FILE}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
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
            write_json(self._folder_fd, self.folder, f"{VARIANTS_DIR}/{result.name}/{RESULT_FILE}",
                        {"result": result.to_dict(), "model_files": [p.name for p in kept]})
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
        if any(path.name not in (STATE_FILE, LOCK_FILE, CREDENTIALS_FILE) for path in kept):
            return True
        if self.checkpoint_location is None:
            return False
        try:
            return bool(CheckpointFiles(self.checkpoint_location).keys())
        except SparkMnistError:  # cannot tell: keep the state, so that --resume can look again
            return True

    # -- files ----------------------------------------------------------------------------------

    def _remove_partial_files(self) -> None:
        """Files a killed run was writing under a temporary name (``.<name>.partial``: its state's json, the
        checkpoints the driver keeps): never read, only in the way. Called with the claim held."""
        for root, _, names in os.walk(self.folder):
            for name in names:
                if _PARTIAL_FILE.match(name):
                    try:
                        os.unlink(os.path.join(root, name))
                    except FileNotFoundError:
                        pass

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
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
