"""The driver's view of a run's checkpoints: the latest one per key, as files with a sha256 each.

Two ways a checkpoint gets there (``launcher.checkpoints`` writes and checks the files):

* ``direct``: the run has a ``checkpoint_dir`` every rank reaches; rank 0 writes each checkpoint there
  itself and the driver is told only (key, epoch, location, sha256). The bytes never cross the driver.
* over the channel (the default): rank 0 sends the bytes and the driver writes them into its own
  folder (the run's state folder, or one under Spark's local dir), or keeps them in memory when it
  has none.

Either way the next attempt of a run, or ``--resume`` after the driver itself stopped, finds the
latest good checkpoint of each key. A key names one of several things a run trains (the job: one key
per variant); nothing is unpickled. Epochs only go up: a checkpoint older than the one kept is not taken,
nor another one of the same epoch, and the checkpoints of one store are written one at a time, so a
slower, older write can never remove or hide a newer one. A write that fails (a full disk, a folder
turned read-only) raises a ``CheckpointError`` naming the folder and the OS's reason; it leaves no file
of its own, and the previous checkpoint is kept.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sparkml_mnist.launcher.checkpoints import Checkpoint, CheckpointError, CheckpointFiles, sha256_of
from sparkml_mnist.launcher.protocol import DEFAULT_KEY, valid_key

logger = logging.getLogger(__name__)


class CheckpointStore:
    """The latest checkpoint of each key of one run.

    ``location``: where the files are (a folder of the driver, or a URI; ``CheckpointFiles`` to reuse
    opened ones); None keeps the checkpoints in memory only. ``direct``: rank 0 writes the files itself
    (``location`` is then the run's ``checkpoint_dir``, which the ranks are given).
    """

    def __init__(self, location: Path | str | CheckpointFiles | None = None, direct: bool = False) -> None:
        if location is None or isinstance(location, CheckpointFiles):
            self.files = location
        else:
            self.files = CheckpointFiles(location)
        if direct and self.files is None:
            raise ValueError("a direct store needs the location the ranks write to")
        self.direct = direct
        self._latest: dict[str, Checkpoint | None] = {}
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # one put or record at a time: its epoch check and its write as one

    @property
    def location(self) -> str | None:
        """Where the files are (a path or URI as every rank can use it), or None in memory."""
        return self.files.location if self.files is not None else None

    @property
    def rank_location(self) -> str | None:
        """What the ranks are given: where rank 0 writes and every rank reads (None: over the channel)."""
        return self.location if self.direct else None

    def latest(self, key: str = DEFAULT_KEY) -> Checkpoint | None:
        """``key``'s latest checkpoint (its bytes read, and checked, when ``data`` is used)."""
        with self._lock:
            if key not in self._latest:
                found = self.files.latest(key) if self.files is not None else None
                self._latest[key] = self._kept_form(found)
            return self._latest[key]

    def put(self, epoch: int, data: bytes, key: str = DEFAULT_KEY) -> Checkpoint | None:
        """Keep the bytes rank 0 sent as ``key``'s checkpoint after ``epoch`` epochs: on disk first (with
        its sha256), then noted. The checkpoint kept; the one already kept when these are the same bytes
        again; None when it is older than the one kept (or another one of its epoch). A ``CheckpointError``
        naming the folder and the reason when the disk refuses it (the previous one is kept)."""
        with self._writing:
            kept = self._not_newer(key, epoch, sha256_of(data))
            if kept is not False:
                return kept
            if self.files is None:
                checkpoint = Checkpoint(epoch, data)
            else:
                try:
                    checkpoint = self.files.write(key, epoch, data)
                except CheckpointError as error:
                    raise CheckpointError(
                        f"the driver cannot keep the checkpoint of {key or 'the run'} after epoch {epoch} in its "
                        f"folder {self.location} ({error.reason}): free space there or make it writable, or give "
                        "the run a checkpoint_dir (--checkpoint-dir) that rank 0 writes to itself",
                        reason=error.reason,
                    ) from None
            with self._lock:
                self._latest[key] = self._kept_form(checkpoint)
            return checkpoint

    def record(self, key: str, checkpoint: Checkpoint) -> Checkpoint | None:
        """Note a checkpoint rank 0 wrote itself (direct); None when it is not one of this store's files
        or is older than the one kept. What is kept reads its bytes from the files when used."""
        if not self.direct or self.files is None or checkpoint.location is None or checkpoint.sha256 is None:
            return None
        expected = self.files.data_location(key, checkpoint.epoch)
        if checkpoint.location != expected:
            logger.warning("a checkpoint reported at %s, not at %s; ignored", checkpoint.location, expected)
            return None
        with self._writing:
            kept = self._not_newer(key, checkpoint.epoch, checkpoint.sha256)
            if kept is not False:
                return kept
            stored = self.files.stored(checkpoint.epoch, checkpoint.location, checkpoint.sha256)
            with self._lock:
                self._latest[key] = stored
            return stored

    def epochs(self) -> dict[str, int]:
        """Every key's latest epoch (from memory, and from the files for keys not read yet). A direct store
        reads its files again: rank 0 may have written a checkpoint the driver was never told of."""
        if self.direct:
            with self._lock:
                self._latest.clear()
        keys = set(self._latest)
        if self.files is not None:
            keys |= {key for key in self.files.keys() if valid_key(key)}
        found = {key: self.latest(key) for key in sorted(keys)}
        return {key: checkpoint.epoch for key, checkpoint in found.items() if checkpoint is not None}

    def _not_newer(self, key: str, epoch: int, sha256: str) -> Checkpoint | None | bool:
        """False when a checkpoint after ``epoch`` epochs is newer than the one kept (it is to be kept);
        else what to answer instead: the one kept when it holds these very bytes, None otherwise."""
        kept = self.latest(key)
        if kept is None or epoch > kept.epoch:
            return False
        if epoch == kept.epoch and (kept.sha256 or sha256_of(kept.data)) == sha256:
            return kept  # the same checkpoint again (a report repeated): nothing to write
        logger.warning("a checkpoint of %s after epoch %d came after the one after epoch %d; not taken",
                       key or "the run", epoch, kept.epoch)
        return None

    def _kept_form(self, checkpoint: Checkpoint | None) -> Checkpoint | None:
        """What memory holds: a file's location and sha256 (its bytes stay on disk), or the bytes themselves."""
        if checkpoint is None or self.files is None or checkpoint.location is None:
            return checkpoint
        return self.files.stored(checkpoint.epoch, checkpoint.location, checkpoint.sha256)  # type: ignore[arg-type]
