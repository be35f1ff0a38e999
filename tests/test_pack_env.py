"""scripts/pack_env.py without building anything: what makes it rebuild, and what it refuses.

The real build, and the archive on a cluster, are tests/test_cluster.py's.
"""

from __future__ import annotations

import pytest
from standalone_cluster import pack_script

pack_env = pack_script()


def test_an_archive_built_from_the_same_sources_is_not_built_again(tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the archive was rebuilt")

    monkeypatch.setattr(pack_env, "build_wheel", no_build)
    output = tmp_path / "env.tar.gz"
    output.write_bytes(b"an archive")
    output.with_name(output.name + pack_env.STAMP_SUFFIX).write_text(pack_env.archive_key("cpu", None) + "\n")
    said = []
    assert pack_env.pack_environment(output, "cpu", say=said.append) == output
    assert said == [f"{output} is up to date"]
    with pytest.raises(AssertionError, match="rebuilt"):  # another flavour is another archive
        pack_env.pack_environment(output, "gpu", say=said.append)
    with pytest.raises(AssertionError, match="rebuilt"):
        pack_env.pack_environment(output, "cpu", force=True, say=said.append)
    with pytest.raises(AssertionError, match="rebuilt"):  # stored instead of gzipped is another archive too
        pack_env.pack_environment(output, "cpu", say=said.append, compress_level=0)


def test_the_archive_key_follows_what_it_is_built_from():
    keys = {pack_env.archive_key(flavour, prefix, level) for flavour in ("cpu", "gpu") for prefix in (None, "/usr")
            for level in (0, pack_env.DEFAULT_COMPRESS_LEVEL)}
    assert len(keys) == 8
    assert pack_env.archive_key("cpu", None) == pack_env.archive_key("cpu", None)
    sources = {path.relative_to(pack_env.REPO).as_posix() for path in pack_env.source_files()}
    assert {"setup.py", "sparkml_mnist/cli/commands.py", "conf/runs/lab.yaml"} <= sources
    assert not any("__pycache__" in path or path.endswith(".pyc") for path in sources)


def test_a_venv_folder_it_did_not_make_is_never_replaced(tmp_path):
    mine = tmp_path / "project-venv"
    (mine / "bin").mkdir(parents=True)
    with pytest.raises(pack_env.PackError, match="was not made by this script"):
        pack_env.pack_environment(tmp_path / "env.tar.gz", "cpu", venv=mine, say=lambda line: None)
    assert (mine / "bin").is_dir()
    assert pack_env.main(["--venv", str(mine), "--output", str(tmp_path / "env.tar.gz")]) == 1
