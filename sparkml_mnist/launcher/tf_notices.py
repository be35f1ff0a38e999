"""TensorFlow's native start-up notices: recognised, and hidden unless asked for.

Every process that imports TensorFlow prints, through absl before ``TF_CPP_MIN_LOG_LEVEL`` applies,
lines such as ``I0000 ... port.cc:153] oneDNN custom operations are on``, the ``cpu_feature_guard``
notice, and on a machine without a GPU ``E0000 ... cuda_platform.cc:52] failed call to cuInit``:
noise that makes a first run on a laptop look like it is failing. They are hidden (in the ranks'
forwarded output, and around the driver's own TensorFlow import) unless ``SPARKML_MNIST_TF_NOTICES=1``
(the CLI's ``--verbose``). Every other line, real errors included, still shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from typing import Iterator

SHOW_NOTICES_ENV = "SPARKML_MNIST_TF_NOTICES"
_GLOG_INFO_OR_WARNING = r"[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] "
_GLOG_ANY = r"[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ "
_NOTICE = re.compile(
    "^(?:"
    + _GLOG_INFO_OR_WARNING
    + r"|WARNING: All log messages before absl::InitializeLog\(\)"
    + r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags"
    + "|" + _GLOG_ANY + r"cuda_platform\.cc:\d+\] failed call to cuInit"
    + "|" + _GLOG_ANY + r"\S+\] Unable to register cu(?:DNN|FFT|BLAS) factory"
    + "|" + _GLOG_ANY + r"\S+\] computation placer already registered"
    + ")"
)


def notices_wanted() -> bool:
    return os.environ.get(SHOW_NOTICES_ENV, "") == "1"


def is_native_notice(line: str) -> bool:
    """Whether ``line`` is one of TensorFlow's start-up notices (never an error that matters)."""
    return bool(_NOTICE.match(line))


@contextlib.contextmanager
def quiet_native_notices() -> Iterator[None]:
    """Filter this process's file descriptor 2 while the block runs (where TensorFlow's C++ writes).

    Lines that are not notices pass through unchanged, in order; nothing is filtered when notices
    are wanted, or when fd 2 cannot be redirected.
    """
    if notices_wanted():
        yield
        return
    try:
        saved = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:
        yield
        return

    def pump() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for raw in lines:
                if not is_native_notice(raw.decode("utf-8", errors="replace")):
                    os.write(saved, raw)

    reader = threading.Thread(target=pump, name="sparkml-mnist-tf-notices", daemon=True)
    reader.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees EOF
        reader.join()
        os.close(saved)
