"""The package's shape, held by tests: packages by role, each importing only the roles below it (the
folder layout is the architecture), no import cycles, and the public names a user can guess."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "sparkml_mnist"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
# The package's top: the public face (lazy exports) and what every role shares. Nothing else lives there.
TOP_MODULES = {"__init__", "errors", "lazy", "redact"}
SHARED = "shared"
# Which role may import which (besides itself and the shared top). The launcher is a general tool: it
# knows nothing of the job, the training side, the data stage or the report. The CLI sits on top.
MAY_IMPORT = {
    "launcher": set(),
    "config": set(),
    "data": {"config"},
    "report": {"config", "launcher"},
    "training": {"launcher", "config", "data"},
    "job": {"launcher", "training", "config", "data", "report"},
    "cli": {"launcher", "training", "config", "data", "report", "job"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every package module ``path`` imports, at module level or inside functions (TYPE_CHECKING too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:  # "pkg.mod.Name" -> "pkg.mod"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    # Importing a submodule runs its parents' __init__ first; that is not an edge of the design.
    return {target for target in found if not name.startswith(target + ".")}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def role(module: str) -> str:
    """``sparkml_mnist.job.run`` -> "job"; the top's modules -> "shared"."""
    parts = module.split(".")
    return SHARED if len(parts) == 1 or parts[1] in TOP_MODULES else parts[1]


def layout_breaches(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} ({role(module)}) imports {target} ({role(target)})"
        for module, targets in graph.items() for target in targets
        if role(target) not in {role(module), SHARED} and role(target) not in MAY_IMPORT.get(role(module), set())
    )


def test_every_package_imports_only_the_roles_below_it() -> None:
    assert layout_breaches(import_graph()) == []


def test_the_layout_check_catches_a_launcher_that_imports_the_job() -> None:
    graph = {f"{PACKAGE}.launcher.runner": {f"{PACKAGE}.job.run", f"{PACKAGE}.errors"}}
    assert layout_breaches(graph) == [f"{PACKAGE}.launcher.runner (launcher) imports {PACKAGE}.job.run (job)"]


def test_the_top_holds_only_the_public_face_and_every_module_has_a_role() -> None:
    top = {path.stem for path in ROOT.glob("*.py")}
    assert top <= TOP_MODULES, f"modules at the package top without a role: {sorted(top - TOP_MODULES)}"
    roles = {role(module) for module in modules()} - {SHARED}
    assert roles <= set(MAY_IMPORT), f"packages without a place in the layout: {sorted(roles - set(MAY_IMPORT))}"


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    graph = import_graph()
    assert f"{PACKAGE}.launcher.rank.callbacks" in graph[f"{PACKAGE}.training.loop"]  # imported inside a function
    assert f"{PACKAGE}.launcher.backends.horovod" in graph[f"{PACKAGE}.launcher.backends"]


def test_the_public_api_has_the_names_a_user_guesses() -> None:
    import sparkml_mnist
    from sparkml_mnist import HorovodRunner, SparkMnistError, load_run, plan_job, run_job
    from sparkml_mnist.data import load_libsvm, read_libsvm, shard_frame

    assert all(callable(f) for f in (HorovodRunner, run_job, plan_job, load_run, read_libsvm, load_libsvm, shard_frame))
    assert issubclass(SparkMnistError, Exception)
    assert set(sparkml_mnist.__all__) >= {"HorovodRunner", "get_context", "log_to_driver", "LogCallback", "run_job"}
    with pytest.raises(AttributeError):
        sparkml_mnist.no_such_name  # noqa: B018


def test_importing_the_package_imports_neither_spark_nor_tensorflow() -> None:
    import subprocess
    import sys

    code = "import sys, sparkml_mnist; print(sorted(m for m in ('pyspark', 'tensorflow') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
