"""Where the shipped configuration lives: the repository's ``conf/``, packaged as ``sparkml_mnist.conf``."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_CONF_PACKAGE = "sparkml_mnist.conf"
YAML_SUFFIX = ".yaml"


def default_conf_file(name: str) -> Path:
    """A file (or folder) of the configuration shipped with the package."""
    return package_folder(DEFAULT_CONF_PACKAGE) / name


@lru_cache(maxsize=None)
def package_folder(package: str, *parts: str) -> Path:
    """A folder shipped inside a package, as a real directory.

    Installed, that is the folder itself. Imported from a zip (the wheel that ``spark-submit
    --py-files`` puts on ``sys.path``) it has no file-system path: it is copied once per
    process into a temporary folder, removed at exit.
    """
    source = resources.files(package)
    for part in parts:
        source = source.joinpath(part)
    path = Path(str(source))
    if path.is_dir():
        return path
    copy = Path(tempfile.mkdtemp(prefix="sparkml-mnist-" + "-".join((package, *parts)).replace(".", "-") + "-"))
    atexit.register(shutil.rmtree, copy, True)
    _copy_tree(source, copy)
    return copy


def _copy_tree(source: Any, target: Path) -> None:
    for item in source.iterdir():
        if item.is_dir():
            (target / item.name).mkdir()
            _copy_tree(item, target / item.name)
        else:
            (target / item.name).write_bytes(item.read_bytes())


def shipped_names(folder: str) -> list[str]:
    """The YAML files of a shipped config folder (``variants``, ``runs``), by name, sorted."""
    return sorted(path.stem for path in default_conf_file(folder).glob(f"*{YAML_SUFFIX}"))


def named_or_path(name_or_path: str, folder: str, what: str) -> Path:
    """``variant3`` -> ``conf/variants/variant3.yaml``; a ``.yaml`` path is taken as it is."""
    path = Path(name_or_path)
    if path.suffix == YAML_SUFFIX:
        return path
    path = default_conf_file(folder) / f"{name_or_path}{YAML_SUFFIX}"
    if not path.exists():
        from sparkml_mnist.errors import ConfigError

        raise ConfigError(
            f"unknown {what} {name_or_path!r}; available: {', '.join(shipped_names(folder))} "
            f"(or give the path of a {what} YAML file)"
        )
    return path
