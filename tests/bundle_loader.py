"""A Databricks Asset Bundle read the way the Databricks CLI reads it: ``databricks.yml`` with its
``include``d files merged, a target's settings laid over the top-level ones, ``${var.x}`` filled in
(from defaults, the target's values and ``--var``); and a task's parameters as a run sees them, with
``{{job.parameters.x}}`` filled in.

The CLI cannot be installed here (it is not on the package registries CI reaches), so
tests/test_databricks_bundle.py checks what it would deploy through this model of it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

VAR_REFERENCE = re.compile(r"\$\{var\.([A-Za-z][\w-]*)\}")
JOB_PARAMETER_REFERENCE = re.compile(r"\{\{job\.parameters\.([\w.-]+)\}\}")
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


def variable_values(document: dict[str, Any], target: str) -> dict[str, Any]:
    values = {}
    for name, spec in (document.get("variables") or {}).items():
        if not isinstance(spec, dict) or "default" not in spec:
            raise BundleError(
                f"variable {name!r} has no value in target {target!r}, so the CLI stops there: give it a default, "
                f'a value in targets.{target}.variables, or deploy with --var="{name}=..."'
            )
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


def resolve_target(
    document: dict[str, Any], target: str, deploy_variables: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The configuration ``databricks bundle deploy -t target --var=...`` deploys, variables filled in."""
    settings = (document.get("targets") or {}).get(target)
    if not isinstance(settings, dict):
        raise BundleError(f"target {target!r} is not defined")
    resolved = {key: copy.deepcopy(value) for key, value in document.items() if key != "targets"}
    for key, value in settings.items():
        if key not in ("mode", "default", "variables"):
            resolved[key] = override(resolved.get(key), value)
    variables = resolved.setdefault("variables", {})
    given = {name: value["default"] if isinstance(value, dict) else value for name, value in (settings.get("variables") or {}).items()}
    for name, value in {**given, **(deploy_variables or {})}.items():
        if name not in variables:
            raise BundleError(f"target {target!r} sets variable {name!r}, which is not defined")
        variables[name] = {**variables[name], "default": value}
    values = variable_values(resolved, target)
    values = {name: substitute(value, values) for name, value in values.items()}  # defaults using others
    return substitute(resolved, values)


def job_parameter_defaults(job: dict[str, Any]) -> dict[str, str]:
    """A job's parameters (name -> default), what a run gets unless ``--params`` says otherwise."""
    return {str(entry.get("name")): entry.get("default") for entry in job.get("parameters") or [] if isinstance(entry, dict)}


def fill_job_parameters(values: list[Any], parameters: Mapping[str, Any]) -> list[str]:
    """A task's parameters as a run passes them: ``{{job.parameters.x}}`` replaced by the run's value of x."""

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in parameters:
            raise BundleError(f"{match.group(0)} is used but the job defines no parameter {name!r}")
        return str(parameters[name])

    return [JOB_PARAMETER_REFERENCE.sub(lookup, str(value)) for value in values]
