"""A Databricks Asset Bundle read the way the Databricks CLI reads it: ``databricks.yml`` with its
``include``d files merged, a target's settings laid over the top-level ones, ``${var.x}`` filled in.

The CLI cannot be installed here (it is not on the package registries CI reaches), so
tests/test_databricks_bundle.py checks what it would deploy through this model of it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VAR_REFERENCE = re.compile(r"\$\{var\.([A-Za-z][\w-]*)\}")
# Sequences that targets override item by item (matched on this key), as the CLI does.
SEQUENCE_KEYS = {"tasks": "task_key", "job_clusters": "job_cluster_key"}


class BundleError(ValueError):
    """The bundle's files cannot be merged or resolved the way the Databricks CLI would."""


# ---------------------------------------------------------------------------------------------
# Loading and merging, as the Databricks CLI does


@dataclass
class Bundle:
    document: dict[str, Any]  # databricks.yml with every included file merged in
    root: Path  # the folder of databricks.yml: paths there are relative to it
    job_files: dict[str, Path] = field(default_factory=dict)  # job key -> the file that defines it


def read_yaml(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise BundleError(f"{path}: expected a mapping at the top level")
    return document


def merge_include(into: dict[str, Any], other: dict[str, Any], where: str) -> None:
    """Merge an included file: mappings recursively, sequences appended, a changed value is an error.

    The CLI refuses a resource key defined in two files; any other conflict is refused here too.
    """
    for key, value in other.items():
        if key not in into:
            into[key] = copy.deepcopy(value)
        elif isinstance(into[key], dict) and isinstance(value, dict):
            merge_include(into[key], value, f"{where}.{key}")
        elif isinstance(into[key], list) and isinstance(value, list):
            into[key].extend(copy.deepcopy(value))
        elif into[key] != value:
            raise BundleError(f"{where}.{key} is defined twice with different values")


def load_bundle(bundle_file: Path) -> Bundle:
    root = bundle_file.parent
    document = read_yaml(bundle_file)
    bundle = Bundle(document=copy.deepcopy(document), root=root)
    for job in (document.get("resources") or {}).get("jobs") or {}:
        bundle.job_files[job] = bundle_file
    for pattern in document.get("include") or []:
        matches = sorted(root.glob(pattern))
        if not matches:
            raise BundleError(f"include pattern {pattern!r} matches no file under {root}")
        for path in matches:
            included = read_yaml(path)
            for resource_type, resources in (included.get("resources") or {}).items():
                known = (bundle.document.get("resources") or {}).get(resource_type) or {}
                for key in resources or {}:
                    if key in known:
                        raise BundleError(f"{path}: resources.{resource_type}.{key} is already defined")
                    if resource_type == "jobs":
                        bundle.job_files[key] = path
            merge_include(bundle.document, included, str(path.relative_to(root)))
    return bundle


def override(base: Any, update: Any) -> Any:
    """A target's settings over the top-level ones: mappings recursively, keyed sequences by key."""
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for key, value in update.items():
            if key in SEQUENCE_KEYS and isinstance(base.get(key), list) and isinstance(value, list):
                merged[key] = override_keyed(base[key], value, SEQUENCE_KEYS[key])
            else:
                merged[key] = override(base.get(key), value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(update)


def override_keyed(base: list[Any], update: list[Any], key: str) -> list[Any]:
    merged = [copy.deepcopy(item) for item in base]
    positions = {item.get(key): i for i, item in enumerate(merged) if isinstance(item, dict)}
    for item in update:
        if isinstance(item, dict) and item.get(key) in positions:
            merged[positions[item[key]]] = override(merged[positions[item[key]]], item)
        else:
            merged.append(copy.deepcopy(item))
    return merged


def variable_values(document: dict[str, Any]) -> dict[str, Any]:
    values = {}
    for name, spec in (document.get("variables") or {}).items():
        if not isinstance(spec, dict) or "default" not in spec:
            raise BundleError(f"variable {name!r} has no default: every deploy would have to set it")
        values[name] = spec["default"]
    return values


def substitute(node: Any, values: dict[str, Any]) -> Any:
    """Replace ``${var.x}``: a string that is only the reference takes the value with its type."""
    if isinstance(node, dict):
        return {key: substitute(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [substitute(value, values) for value in node]
    if not isinstance(node, str):
        return node

    def lookup(name: str) -> Any:
        if name not in values:
            raise BundleError(f"${{var.{name}}} is used but the variable is not defined")
        return values[name]

    whole = VAR_REFERENCE.fullmatch(node)
    if whole:
        return lookup(whole.group(1))
    return VAR_REFERENCE.sub(lambda match: str(lookup(match.group(1))), node)


def resolve_target(document: dict[str, Any], target: str) -> dict[str, Any]:
    """The configuration ``databricks bundle deploy -t target`` deploys, variables filled in."""
    settings = (document.get("targets") or {}).get(target)
    if not isinstance(settings, dict):
        raise BundleError(f"target {target!r} is not defined")
    resolved = {key: copy.deepcopy(value) for key, value in document.items() if key != "targets"}
    for key, value in settings.items():
        if key not in ("mode", "default", "variables"):
            resolved[key] = override(resolved.get(key), value)
    variables = resolved.setdefault("variables", {})
    for name, value in (settings.get("variables") or {}).items():
        if name not in variables:
            raise BundleError(f"target {target!r} sets variable {name!r}, which is not defined")
        variables[name] = {**variables[name], "default": value["default"] if isinstance(value, dict) else value}
    values = variable_values(resolved)
    values = {name: substitute(value, values) for name, value in values.items()}  # defaults using others
    return substitute(resolved, values)
