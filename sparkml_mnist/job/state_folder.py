"""The run's state folder as only this user may use it: made 0700, and one found in its place used only
when it is this user's, not a link, and open to nobody else (else one line says what to do, exit 2,
nothing touched); its files are opened relative to it, never through a link, and written in one step.

Why: in a shared parent folder another user could make ``.<output>.state/`` first, and a checkpoint
planted there would be evaluated and reported as the run's model. On a filesystem that keeps no owners
or modes (DBFS and Unity Catalog volumes on Databricks report fixed ones) access is the platform's
business: a probe folder tells, and the checks are left out there.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from sparkml_mnist.errors import ConfigError, SparkMnistError
from sparkml_mnist.launcher.checkpoints import PARTIAL_SUFFIX

PRIVATE_FOLDER_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SHARED_BITS = 0o077  # group and other permission bits: the state folder has none
PROBE_MARKER = ".probe-"  # a folder made beside the state for a moment: does this filesystem keep owners and modes?
_PROBE_HEX_BYTES = 4
_NO_LINKS = os.O_NOFOLLOW | os.O_CLOEXEC
_NO_WAIT = os.O_NONBLOCK  # a FIFO where a file should be must not hang the open (its type is checked after)
_LINK_ERRNOS = (errno.ELOOP, errno.EMLINK)  # open(O_NOFOLLOW) of a link (EMLINK on the BSDs)


class StateError(SparkMnistError):
    """The run's state cannot be written or read (disk full, permissions); says what to change."""


def not_yours(folder: Path, path: Path, problem: str) -> ConfigError:
    """A state folder (or a file in it) this run must not use: one line saying what to do."""
    return ConfigError(f"{path}: {problem}, so it is not used (another user may have planted it); remove {folder}, "
                       "or choose another --output")


def keeps_owners_and_modes(folder: Path) -> bool:
    """Whether a folder made beside the state ``folder`` shows this user as its owner and mode 0700.

    Not on a FUSE mount that reports fixed attributes (DBFS, Unity Catalog volumes on Databricks), where
    access is the platform's business: there, owners and modes say nothing and are not checked.
    """
    probe = folder.with_name(f"{folder.name}{PROBE_MARKER}{secrets.token_hex(_PROBE_HEX_BYTES)}")
    try:
        os.mkdir(probe, PRIVATE_FOLDER_MODE)
    except OSError:
        return True  # cannot tell: keep the checks
    try:
        try:
            os.chmod(probe, PRIVATE_FOLDER_MODE)
        except OSError:
            pass
        info = os.lstat(probe)
        return info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == PRIVATE_FOLDER_MODE
    finally:
        try:
            os.rmdir(probe)
        except OSError:
            pass


def check_owned(folder: Path, path: Path, info: os.stat_result) -> None:
    """``path`` (the state ``folder`` or a file in it) is this user's, and the folder open to nobody else,
    where the filesystem keeps owners and modes."""
    is_folder = path == folder
    foreign = info.st_uid != os.getuid()
    shared = is_folder and stat.S_IMODE(info.st_mode) & SHARED_BITS
    if not (foreign or shared):
        return
    if not keeps_owners_and_modes(folder):
        return
    if foreign:
        what = "the run's state folder" if is_folder else "a file in the run's state"
        raise not_yours(folder, path, f"{what} belongs to another user (uid {info.st_uid}), not to uid {os.getuid()}")
    mode = stat.S_IMODE(info.st_mode)
    raise ConfigError(f"{path}: the run's state folder is open to other users (mode {mode:04o}, this tool makes it "
                      f"{PRIVATE_FOLDER_MODE:04o}); if its contents are yours, `chmod {PRIVATE_FOLDER_MODE:o} {path}` "
                      "and run again, else remove it or choose another --output")


def open_folder(folder: Path, create: bool) -> int | None:
    """The state folder, opened without following a link and checked (None: there is none and ``create`` is False)."""
    created = False
    if create:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(folder, PRIVATE_FOLDER_MODE)
            created = True
        except FileExistsError:
            pass
        except OSError as error:
            raise StateError(f"cannot create the run's state folder {folder} ({error.strerror}); "
                             "choose an --output on a writable disk") from None
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _NO_LINKS)
    except FileNotFoundError:
        if create:
            raise StateError(f"{folder}: the run's state folder vanished while it was being made; run again") from None
        return None
    except OSError as error:
        if error.errno in (errno.ENOTDIR, *_LINK_ERRNOS):
            raise not_yours(folder, folder, "the run's state folder is a link or not a folder") from None
        raise StateError(f"cannot open the run's state folder {folder} ({error.strerror}); fix its permissions, "
                         "or choose another --output") from None
    try:
        if created:
            try:
                os.fchmod(descriptor, PRIVATE_FOLDER_MODE)  # the umask may have taken bits away: exactly 0700
            except OSError:
                pass  # a filesystem without modes: checked below
        check_owned(folder, folder, os.fstat(descriptor))
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def entry(folder_fd: int, folder: Path, name: str) -> os.stat_result | None:
    """A file of the state as it is (never through a link), checked: a plain file of this user's, or None."""
    try:
        info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise not_yours(folder, folder / name, "a link or not a plain file where the run's state keeps a file")
    check_owned(folder, folder / name, info)
    return info


def open_file(folder_fd: int, folder: Path, name: str, flags: int) -> int:
    """``name`` under the state folder, opened relative to it and never through a link, then checked."""
    try:
        descriptor = os.open(name, flags | _NO_LINKS | _NO_WAIT, PRIVATE_FILE_MODE, dir_fd=folder_fd)
    except OSError as error:
        if error.errno in _LINK_ERRNOS:
            raise not_yours(folder, folder / name, "a link where the run's state keeps a file") from None
        raise
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise not_yours(folder, folder / name, "not a plain file where the run's state keeps a file")
        check_owned(folder, folder / name, info)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def read_json(folder_fd: int, folder: Path, name: str) -> Any:
    with os.fdopen(open_file(folder_fd, folder, name, os.O_RDONLY), "rb") as file:
        return json.loads(file.read().decode("utf-8"))


def write_json(folder_fd: int, folder: Path, name: str, document: Any) -> None:
    """``name`` (relative to the state folder) replaced in one step: written under ``.<name>.partial`` first."""
    head, _, tail = name.rpartition("/")
    partial = f"{head}/.{tail}{PARTIAL_SUFFIX}" if head else f".{tail}{PARTIAL_SUFFIX}"
    descriptor = open_file(folder_fd, folder, partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(descriptor, "wb") as file:
        file.write((json.dumps(document, indent=1, default=str) + "\n").encode("utf-8"))
    os.replace(partial, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
