"""The Databricks Asset Bundle (databricks.yml + resources/*.yml) is valid and can run the job.

The Databricks CLI cannot be installed here, so the bundle is checked the way ``databricks bundle
validate`` would see it: the files are merged as the CLI merges its includes, validated against the
bundle JSON schema the CLI publishes (``../shared/schemas/databricks-bundle.schema.json``), and then,
per target with the variables filled in (and prod's service principal given as a deployer gives it,
``--var``), checked for what the schema cannot know: that the entry point exists, that the task's
parameters, with the job parameters' defaults filled in, are ones ``sparkml-mnist train`` accepts,
that ``np`` fits the cluster's GPU slots (else Spark waits ~10 minutes for a barrier stage, then
fails), that the cluster cannot autoscale and is dedicated, that outputs go to a path the report
writer can write, that prod runs as and is managed by a service principal. Mutated bundles show that
each check reports what it should.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import os
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from bundle_loader import Bundle, BundleError, fill_job_parameters, job_parameter_defaults, load_bundle, resolve_target
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from sparkml_mnist.cli.commands import build_parser
from sparkml_mnist.config import load_data_spec, load_run
from sparkml_mnist.errors import SparkMnistError
from sparkml_mnist.config.platform import load_platform_settings

REPO = Path(__file__).resolve().parents[1]
BUNDLE_FILE = REPO / "databricks.yml"
SETUP_FILE = REPO / "setup.py"
SHARED_ENV = "SPARKML_MNIST_SHARED"  # the shared folder (holds schemas/); default ../shared
SCHEMA_IN_SHARED = Path("schemas") / "databricks-bundle.schema.json"

JOB_KEY = "mnist_training"
TARGET_MODES = {"dev": "development", "prod": "production"}
DEFAULT_TARGET = "dev"
TRAIN_COMMAND = "train"
GPU_ML_RUNTIME = re.compile(r"-gpu-ml-")
TASK_GPU_CONF = "spark.task.resource.gpu.amount"
EXECUTOR_GPU_CONF = "spark.executor.resource.gpu.amount"
DYNAMIC_ALLOCATION_CONF = "spark.dynamicAllocation.enabled"
FUSE_ROOTS = ("/Volumes/", "/dbfs/")  # the report writer writes through the local filesystem
RUN_ID_REFERENCE = "{{job.run_id}}"  # a fresh report folder per run: a non-empty --output is refused
WHEEL_FOLDER = "dist"
# What the job needs on the cluster and no ML runtime ships (README / docs/databricks.md say so).
REQUIRED_PYPI = {"tensorflow": "2.21.0", "tf-keras": "2.21.0"}
DEDICATED_ACCESS = ("DATA_SECURITY_MODE_DEDICATED", "SINGLE_USER")  # SINGLE_USER: its legacy name
PRODUCTION_MODE = "production"
MANAGE = "CAN_MANAGE"
# What docs/databricks.md tells a deployer to pass for each target (--var); an application ID's shape.
EXAMPLE_APPLICATION_ID = "9f0b4c4e-1d2a-4b7e-8c3f-5a6d7e8f9a0b"
DEPLOY_VARIABLES = {"prod": {"service_principal": EXAMPLE_APPLICATION_ID}}


# ---------------------------------------------------------------------------------------------
# The checks the schema cannot make


def console_scripts(setup_file: Path = SETUP_FILE) -> tuple[str, dict[str, str]]:
    """The distribution name and console scripts declared in setup.py, read without running it."""
    tree = ast.parse(setup_file.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            name = ast.literal_eval(keywords["name"])
            entry_points = ast.literal_eval(keywords.get("entry_points", ast.Constant({})))
            scripts = dict(line.split("=", 1) for line in entry_points.get("console_scripts", []))
            return name, {key.strip(): value.strip() for key, value in scripts.items()}
    raise BundleError(f"{setup_file}: no setup(...) call")


def parse_train_arguments(parameters: list[Any]) -> tuple[Any | None, str | None]:
    """The parameters as ``sparkml-mnist`` parses them: (namespace, None) or (None, argparse's message)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args([str(value) for value in parameters]), None
    except SystemExit:
        return None, stderr.getvalue().strip().splitlines()[-1]


def gpu_amount(spark_conf: dict[str, Any], key: str, problems: list[str], where: str) -> float | None:
    if key not in spark_conf:
        problems.append(f"{where}: spark_conf has no {key}: Spark would not give each rank a GPU")
        return None
    try:
        amount = float(spark_conf[key])
    except (TypeError, ValueError):
        problems.append(f"{where}: spark_conf {key}={spark_conf[key]!r} is not a number")
        return None
    if amount <= 0:
        problems.append(f"{where}: spark_conf {key}={spark_conf[key]!r} must be positive")
        return None
    return amount


def cluster_problems(cluster: dict[str, Any], np: int, where: str) -> list[str]:
    """A training cluster: GPU ML runtime, fixed size, GPU scheduling, enough barrier slots for ``np``."""
    problems: list[str] = []
    if cluster.get("data_security_mode") not in DEDICATED_ACCESS:
        problems.append(
            f"{where}: data_security_mode {cluster.get('data_security_mode')!r} is not dedicated access "
            f"({' or '.join(DEDICATED_ACCESS)}), which ML runtimes need"
        )
    if not GPU_ML_RUNTIME.search(str(cluster.get("spark_version", ""))):
        problems.append(f"{where}: spark_version {cluster.get('spark_version')!r} is not a GPU ML runtime")
    if "autoscale" in cluster:
        problems.append(f"{where}: autoscale is set; barrier mode needs a fixed num_workers")
    workers = cluster.get("num_workers")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        problems.append(f"{where}: num_workers must be a fixed positive integer, got {workers!r}")
        workers = None
    spark_conf = cluster.get("spark_conf") or {}
    if str(spark_conf.get(DYNAMIC_ALLOCATION_CONF, "")).lower() != "false":
        problems.append(f"{where}: {DYNAMIC_ALLOCATION_CONF} must be \"false\" (the launcher refuses it)")
    per_task = gpu_amount(spark_conf, TASK_GPU_CONF, problems, where)
    per_executor = gpu_amount(spark_conf, EXECUTOR_GPU_CONF, problems, where)
    if workers is not None and per_task and per_executor:
        slots = workers * int(per_executor // per_task)
        if np > slots:
            problems.append(
                f"{where}: np={np} barrier tasks but only {slots} GPU slots "
                f"({workers} workers x {per_executor:g} GPUs / {per_task:g} per task)"
            )
    return problems


def library_problems(bundle: Bundle, job: str, libraries: list[dict[str, Any]], where: str) -> list[str]:
    """The task installs the bundle's own wheel (path relative to its file) and TF 2.21 + tf_keras."""
    problems: list[str] = []
    defined_in = bundle.job_files.get(job, BUNDLE_FILE).parent
    wheels = [entry["whl"] for entry in libraries if "whl" in entry]
    wheel_dir = (bundle.root / WHEEL_FOLDER).resolve()
    if not any(Path(os.path.normpath(defined_in / wheel)).parent == wheel_dir for wheel in wheels):
        problems.append(
            f"{where}: no whl library points at {wheel_dir} (paths are relative to "
            f"{defined_in.relative_to(bundle.root) or '.'}/), got {wheels}"
        )
    pinned: dict[str, Requirement] = {}
    for entry in libraries:
        if "pypi" in entry:
            try:
                requirement = Requirement(entry["pypi"]["package"])
            except InvalidRequirement as error:
                problems.append(f"{where}: pypi {entry['pypi']['package']!r}: {error}")
                continue
            pinned[canonicalize_name(requirement.name)] = requirement
    for name, version in REQUIRED_PYPI.items():
        requirement = pinned.get(canonicalize_name(name))
        if requirement is None or not requirement.specifier.contains(version):
            problems.append(f"{where}: needs a pypi library {name} that allows {version}, got {requirement}")
    return problems


def task_problems(bundle: Bundle, config: dict[str, Any], job: str, task: dict[str, Any]) -> list[str]:
    where = f"resources.jobs.{job}.tasks[{task.get('task_key')}]"
    wheel_task = task.get("python_wheel_task")
    if wheel_task is None:
        return []
    problems: list[str] = []
    distribution, scripts = console_scripts()
    if canonicalize_name(str(wheel_task.get("package_name"))) != canonicalize_name(distribution):
        problems.append(f"{where}: package_name {wheel_task.get('package_name')!r} is not {distribution!r}")
    if wheel_task.get("entry_point") not in scripts:
        problems.append(
            f"{where}: entry_point {wheel_task.get('entry_point')!r} is not a console script in setup.py "
            f"({sorted(scripts)})"
        )
    job_settings = config["resources"]["jobs"][job]
    try:
        parameters = fill_job_parameters(wheel_task.get("parameters") or [], job_parameter_defaults(job_settings))
    except BundleError as error:
        return problems + [f"{where}: {error}"]
    args, error = parse_train_arguments(parameters)
    if args is None:
        return problems + [f"{where}: parameters rejected by sparkml-mnist: {error}"]
    if args.command != TRAIN_COMMAND:
        return problems
    try:
        np = args.np if args.np is not None else load_run(args.run_config).np
    except SparkMnistError as error:
        return problems + [f"{where}: --run-config {args.run_config!r}: {error}"]
    if np < 1:
        problems.append(f"{where}: np={np} runs on the driver only; a GPU job cluster needs np >= 1")
    if not args.output or not args.output.startswith(FUSE_ROOTS):
        problems.append(f"{where}: --output {args.output!r} must be a FUSE path under {' or '.join(FUSE_ROOTS)}")
    elif RUN_ID_REFERENCE not in args.output:
        problems.append(f"{where}: --output {args.output!r} has no {RUN_ID_REFERENCE}: a second run is refused")
    job_clusters = job_settings.get("job_clusters") or []
    clusters = {entry.get("job_cluster_key"): entry for entry in job_clusters}
    cluster_key = task.get("job_cluster_key")
    if cluster_key not in clusters or "new_cluster" not in clusters[cluster_key]:
        problems.append(f"{where}: training needs a job cluster (job_cluster_key with new_cluster)")
    else:
        problems += cluster_problems(clusters[cluster_key]["new_cluster"], np, f"{where} cluster {cluster_key}")
    problems += library_problems(bundle, job, task.get("libraries") or [], where)
    return problems


def job_parameter_problems(job: str, settings: dict[str, Any]) -> list[str]:
    """Every job parameter reaches a task: a parameter that nothing reads would make --params a no-op."""
    tasks = "\n".join(str(value) for task in settings.get("tasks") or [] for value in task_parameters(task))
    return [
        f"resources.jobs.{job}: job parameter {name!r} is used by no task ({{{{job.parameters.{name}}}}})"
        for name in job_parameter_defaults(settings) if f"{{{{job.parameters.{name}}}}}" not in tasks
    ]


def task_parameters(task: dict[str, Any]) -> list[Any]:
    return ((task.get("python_wheel_task") or {}).get("parameters")) or []


def run_as_problems(config: dict[str, Any], target: str, mode: str) -> list[str]:
    """A production deployment runs as a service principal, which also manages the job."""
    if mode != PRODUCTION_MODE:
        return []
    principal = (config.get("run_as") or {}).get("service_principal_name")
    if not principal:
        return [f"targets.{target}: run_as must name a service principal (service_principal_name), got {config.get('run_as')!r}"]
    managers = [p for p in config.get("permissions") or [] if p.get("level") == MANAGE]
    if not any(p.get("service_principal_name") == principal for p in managers):
        return [f"targets.{target}: permissions give {MANAGE} to {managers}, not to the run_as service principal"]
    return []


def artifact_problems(bundle: Bundle) -> list[str]:
    """An artifact builds this project's wheel into the folder the task installs it from."""
    for name, artifact in (bundle.document.get("artifacts") or {}).items():
        if (bundle.root / str(artifact.get("path", "."))).resolve() != SETUP_FILE.parent:
            continue
        build = shlex.split(str(artifact.get("build", "")))
        if artifact.get("type") == "whl" and not build:
            return []  # the CLI's own build writes to <path>/dist
        if "wheel" in build and "-w" in build and build[build.index("-w") + 1] == WHEEL_FOLDER:
            return []
        return [f"artifacts.{name}: build {artifact.get('build')!r} does not write the wheel to {WHEEL_FOLDER}/"]
    return [f"no artifact builds the wheel of {SETUP_FILE.parent}"]


def target_problems(document: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    targets = document.get("targets") or {}
    for target, mode in TARGET_MODES.items():
        actual = (targets.get(target) or {}).get("mode")
        if actual != mode:
            problems.append(f"targets.{target}: mode must be {mode!r}, got {actual!r}")
    defaults = [name for name, settings in targets.items() if (settings or {}).get("default")]
    if defaults != [DEFAULT_TARGET]:
        problems.append(f"targets: exactly {DEFAULT_TARGET!r} should be the default, got {defaults}")
    return problems


def bundle_problems(bundle: Bundle) -> list[str]:
    """Everything wrong with the bundle that its schema cannot see, for every target."""
    problems = artifact_problems(bundle) + target_problems(bundle.document)
    for target in TARGET_MODES:
        try:
            config = resolve_target(bundle.document, target, DEPLOY_VARIABLES.get(target))
        except BundleError as error:
            problems.append(f"target {target}: {error}")
            continue
        problems += run_as_problems(config, target, TARGET_MODES[target])
        for job, settings in ((config.get("resources") or {}).get("jobs") or {}).items():
            problems += [f"target {target}: {p}" for p in job_parameter_problems(job, settings)]
            for task in settings.get("tasks") or []:
                problems += [f"target {target}: {p}" for p in task_problems(bundle, config, job, task)]
    return problems


# ---------------------------------------------------------------------------------------------
# The published schema, with \p{L} patterns


def schema_path() -> Path:
    shared = os.environ.get(SHARED_ENV)
    return (Path(shared) if shared else REPO.parent / "shared") / SCHEMA_IN_SHARED


@pytest.fixture(scope="module")
def bundle_validator():
    """A Draft 7 validator whose ``pattern`` uses the ``regex`` package.

    The schema comes from the Go CLI and uses ``\\p{L}``-style classes that Python's ``re`` cannot
    compile (``re.error: bad escape \\p``); ``regex`` understands them.
    """
    path = schema_path()
    if not path.is_file():
        pytest.skip(f"bundle schema not found at {path} (set {SHARED_ENV} to the folder holding schemas/)")
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with the [test] extra")
    regex = pytest.importorskip("regex", reason="regex comes with the [test] extra")
    import json

    compile_pattern = lru_cache(maxsize=None)(regex.compile)

    def pattern(validator, expected: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
        if validator.is_type(instance, "string") and not compile_pattern(expected).search(instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {expected!r}")

    validator_class = jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": pattern})
    return validator_class(json.loads(path.read_text(encoding="utf-8")))


def leaf_errors(validator, document: dict[str, Any]) -> list[tuple[str, str]]:
    """(JSON path, message) of the innermost errors, deepest first: a oneOf's own error says only
    "not valid", and its shallow branches (a whole mapping "is not of type 'string'") say little."""
    leaves: list[tuple[str, str]] = []

    def walk(error) -> None:
        if error.context:
            for inner in error.context:
                walk(inner)
        else:
            leaves.append((error.json_path, error.message))

    for error in validator.iter_errors(document):
        walk(error)
    return sorted(leaves, key=lambda leaf: (-leaf[0].count(".") - leaf[0].count("["), leaf))


def schema_report(validator, document: dict[str, Any], shown: int = 10) -> str:
    return "\n".join(f"{where}: {message[:200]}" for where, message in leaf_errors(validator, document)[:shown])


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.fixture
def bundle() -> Bundle:
    return load_bundle(BUNDLE_FILE)


def test_every_resource_file_is_included(bundle):
    patterns = bundle.document.get("include") or []
    included = {path for pattern in patterns for path in REPO.glob(pattern)}
    assert sorted(REPO.glob("resources/*.yml")), "resources/ holds no .yml file"
    assert set(REPO.glob("resources/*.yml")) <= included, f"resources/*.yml not matched by include {patterns}"
    assert JOB_KEY in bundle.document["resources"]["jobs"]
    assert bundle.job_files[JOB_KEY].parent == REPO / "resources"


def test_bundle_matches_the_published_schema(bundle, bundle_validator):
    assert bundle_validator.is_valid(bundle.document), schema_report(bundle_validator, bundle.document)


@pytest.mark.parametrize("target", TARGET_MODES)
def test_each_target_with_variables_filled_in_matches_the_schema(bundle, bundle_validator, target):
    config = resolve_target(bundle.document, target, DEPLOY_VARIABLES.get(target))
    assert bundle_validator.is_valid(config), schema_report(bundle_validator, config)


def test_schema_reports_a_worker_count_that_is_not_a_number(bundle, bundle_validator):
    mutated = copy.deepcopy(bundle.document)
    mutated["resources"]["jobs"][JOB_KEY]["job_clusters"][0]["new_cluster"]["num_workers"] = "two"
    paths = {where for where, _ in leaf_errors(bundle_validator, mutated)}
    assert f"$.resources.jobs.{JOB_KEY}.job_clusters[0].new_cluster.num_workers" in paths


def test_schema_reports_a_misspelt_task_field(bundle, bundle_validator):
    mutated = copy.deepcopy(bundle.document)
    wheel_task = mutated["resources"]["jobs"][JOB_KEY]["tasks"][0]["python_wheel_task"]
    wheel_task["entrypoint"] = wheel_task.pop("entry_point")
    messages = [m for where, m in leaf_errors(bundle_validator, mutated) if where.endswith(".python_wheel_task")]
    assert any("entrypoint" in m for m in messages) and any("entry_point" in m for m in messages), messages


# Mutations of the new fields the schema itself must catch: (mutate, the JSON path of the error).
SCHEMA_MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "job parameter without a default": (
        lambda d: d["resources"]["jobs"][JOB_KEY]["parameters"][0].pop("default"),
        f"$.resources.jobs.{JOB_KEY}.parameters[0]",
    ),
    "unknown access mode": (
        lambda d: d["resources"]["jobs"][JOB_KEY]["job_clusters"][0]["new_cluster"].update(data_security_mode="DEDICATED"),
        f"$.resources.jobs.{JOB_KEY}.job_clusters[0].new_cluster.data_security_mode",
    ),
    "run_as with a misspelt field": (
        lambda d: d["targets"]["prod"]["run_as"].update(service_principal="x"),
        "$.targets.prod.run_as",
    ),
    "a permission level jobs do not have": (
        lambda d: d["targets"]["prod"]["permissions"][1].update(level="CAN_RUN_EVERYTHING"),
        "$.targets.prod.permissions[1].level",
    ),
}


@pytest.mark.parametrize("mutation", SCHEMA_MUTATIONS)
def test_schema_reports_a_broken_new_field(bundle, bundle_validator, mutation):
    mutate, path = SCHEMA_MUTATIONS[mutation]
    mutated = copy.deepcopy(bundle.document)
    mutate(mutated)
    assert path in {where for where, _ in leaf_errors(bundle_validator, mutated)}, schema_report(bundle_validator, mutated)


def test_bundle_has_no_problems_the_schema_cannot_see(bundle):
    assert bundle_problems(bundle) == []


def test_data_default_is_the_databricks_dataset(bundle):
    assert bundle.document["variables"]["data_dir"]["default"] == load_data_spec().databricks_data_dir
    job = bundle.document["resources"]["jobs"][JOB_KEY]
    parameters = job["tasks"][0]["python_wheel_task"]["parameters"]
    assert parameters[parameters.index("--data") + 1] == "{{job.parameters.data}}"
    assert job_parameter_defaults(job)["data"] == "${var.data_dir}"


def test_run_time_parameters_reach_the_command_line(bundle):
    # databricks bundle run -t dev mnist_training --params variants=variant3,epochs=2,seed=7
    job = resolve_target(bundle.document, DEFAULT_TARGET)["resources"]["jobs"][JOB_KEY]
    parameters = job["tasks"][0]["python_wheel_task"]["parameters"]
    args, error = parse_train_arguments(fill_job_parameters(parameters, job_parameter_defaults(job)))
    assert error is None
    assert (args.variant, args.np, args.epochs, args.seed) == (["all"], 2, None, None)  # the lab's epochs and seed
    given = {**job_parameter_defaults(job), "variants": "variant3", "epochs": "2", "seed": "7"}
    args, error = parse_train_arguments(fill_job_parameters(parameters, given))
    assert error is None
    assert (args.variant, args.np, args.epochs, args.seed) == (["variant3"], 2, 2, 7)
    assert args.output == "/dbfs/tmp/sparkml-mnist/run-{{job.run_id}}"


def test_the_job_logs_every_run_to_the_bundles_mlflow_experiment(bundle):
    config = resolve_target(bundle.document, DEFAULT_TARGET)
    experiments = config["resources"]["experiments"]
    assert list(experiments) == ["mnist_training"] and experiments["mnist_training"]["name"].endswith("experiment")
    job = config["resources"]["jobs"][JOB_KEY]
    parameters = job["tasks"][0]["python_wheel_task"]["parameters"]
    assert "--mlflow" in parameters
    assert parameters[parameters.index("--mlflow-experiment") + 1] == "${resources.experiments.mnist_training.name}"
    args, error = parse_train_arguments(fill_job_parameters(parameters, job_parameter_defaults(job)))
    assert error is None and args.mlflow is True


def test_prod_cannot_be_deployed_without_its_service_principal(bundle):
    assert resolve_target(bundle.document, "prod", DEPLOY_VARIABLES["prod"])["run_as"] == {
        "service_principal_name": EXAMPLE_APPLICATION_ID
    }
    with pytest.raises(BundleError, match=r"variable 'service_principal' has no value in target 'prod'.*--var"):
        resolve_target(bundle.document, "prod")
    assert "run_as" not in resolve_target(bundle.document, "dev")  # dev runs as the deploying user


def test_output_default_agrees_with_the_platform_default(bundle):
    default = bundle.document["variables"]["output_dir"]["default"]
    assert default.startswith(FUSE_ROOTS)
    assert default == load_platform_settings().databricks_output_root


def test_every_variant_is_trained(bundle):
    config = resolve_target(bundle.document, DEFAULT_TARGET)
    tasks = config["resources"]["jobs"][JOB_KEY]["tasks"]
    defaults = job_parameter_defaults(config["resources"]["jobs"][JOB_KEY])
    trained = []
    for task in tasks:
        args, error = parse_train_arguments(fill_job_parameters(task["python_wheel_task"]["parameters"], defaults))
        assert error is None
        variants = ",".join(args.variant) if args.variant else None
        trained.extend(load_run(args.run_config).with_overrides(variants=variants).variants)
    assert sorted(trained) == [f"variant{i}" for i in range(1, 5)]


# Mutations of the merged bundle, each with the words its problem must contain.
def _cluster(document: dict[str, Any]) -> dict[str, Any]:
    return document["resources"]["jobs"][JOB_KEY]["job_clusters"][0]["new_cluster"]


def _task(document: dict[str, Any]) -> dict[str, Any]:
    return document["resources"]["jobs"][JOB_KEY]["tasks"][0]


def _parameter(document: dict[str, Any], flag: str, value: str) -> None:
    parameters = _task(document)["python_wheel_task"]["parameters"]
    parameters[parameters.index(flag) + 1] = value


MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "autoscale": (lambda d: _cluster(d).update(autoscale={"min_workers": 1, "max_workers": 4}), "autoscale"),
    "too few workers": (lambda d: d["variables"]["num_workers"].update(default=1), "only 1 GPU slots"),
    "np above slots": (lambda d: d["variables"]["np"].update(default="3"), "np=3 barrier tasks"),
    "prod too small": (lambda d: d["targets"]["prod"].update(variables={"num_workers": 1}), "target prod"),
    "worker count not a number": (lambda d: d["variables"]["num_workers"].update(default="two"), "num_workers"),
    "no task GPU": (lambda d: _cluster(d)["spark_conf"].pop(TASK_GPU_CONF), TASK_GPU_CONF),
    "dynamic allocation": (
        lambda d: _cluster(d)["spark_conf"].update({DYNAMIC_ALLOCATION_CONF: "true"}),
        "dynamicAllocation",
    ),
    "CPU runtime": (lambda d: d["variables"]["spark_version"].update(default="17.3.x-scala2.13"), "GPU ML runtime"),
    "unknown entry point": (lambda d: _task(d)["python_wheel_task"].update(entry_point="mnist"), "console script"),
    "other package": (lambda d: _task(d)["python_wheel_task"].update(package_name="mnist"), "package_name"),
    "bad argument": (lambda d: _task(d)["python_wheel_task"]["parameters"].append("--bogus"), "--bogus"),
    "driver only": (lambda d: d["variables"]["np"].update(default="-2"), "driver only"),
    "dbfs URI output": (lambda d: d["variables"]["output_dir"].update(default="dbfs:/tmp/x"), "FUSE path"),
    "same output every run": (lambda d: _parameter(d, "--output", "${var.output_dir}/latest"), "job.run_id"),
    "wheel path not relative to its file": (lambda d: _task(d)["libraries"][0].update(whl="./dist/*.whl"), "no whl"),
    "no tf_keras": (lambda d: _task(d)["libraries"].pop(2), "tf-keras"),
    "old TensorFlow": (
        lambda d: d["variables"]["tensorflow_requirement"].update(default="tensorflow==2.15.*"),
        "tensorflow",
    ),
    "undefined variable": (lambda d: _parameter(d, "--np", "${var.gpus}"), "${var.gpus}"),
    "prod not production": (lambda d: d["targets"]["prod"].update(mode="development"), "targets.prod"),
    "no default target": (lambda d: d["targets"]["dev"].pop("default"), "default"),
    "wheel built elsewhere": (
        lambda d: d["artifacts"]["sparkml_mnist_wheel"].update(build="python -m pip wheel -w out ."),
        "artifacts",
    ),
    "undefined job parameter": (lambda d: _parameter(d, "--np", "{{job.parameters.gpus}}"), "no parameter 'gpus'"),
    "job parameter nothing reads": (
        lambda d: d["resources"]["jobs"][JOB_KEY]["parameters"].append({"name": "batch", "default": "64"}),
        "'batch' is used by no task",
    ),
    "epochs default not a number": (lambda d: _job_parameter(d, "epochs").update(default="ten"), "--epochs"),
    "np parameter above slots": (lambda d: _job_parameter(d, "np").update(default="4"), "np=4 barrier tasks"),
    "shared access mode": (lambda d: _cluster(d).update(data_security_mode="USER_ISOLATION"), "dedicated access"),
    "prod runs as a person": (
        lambda d: d["targets"]["prod"].update(run_as={"user_name": "someone@example.com"}),
        "run_as must name a service principal",
    ),
    "prod's principal cannot manage the job": (
        lambda d: d["targets"]["prod"]["permissions"].pop(0),
        "not to the run_as service principal",
    ),
}


def _job_parameter(document: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [p for p in document["resources"]["jobs"][JOB_KEY]["parameters"] if p["name"] == name]
    return entry


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_broken_bundle_is_reported(bundle, mutation):
    mutate, expected = MUTATIONS[mutation]
    assert bundle_problems(bundle) == []
    mutate(bundle.document)
    problems = bundle_problems(bundle)
    assert any(expected in problem for problem in problems), problems


def test_the_same_resource_in_two_files_is_refused(tmp_path):
    job = {"resources": {"jobs": {JOB_KEY: {"name": "a"}}}}
    (tmp_path / "resources").mkdir()
    root = {"bundle": {"name": "b"}, "include": ["resources/*.yml"], **job}
    (tmp_path / "databricks.yml").write_text(yaml.safe_dump(root))
    (tmp_path / "resources" / "job.yml").write_text(yaml.safe_dump(job))
    with pytest.raises(BundleError, match="already defined"):
        load_bundle(tmp_path / "databricks.yml")


def test_an_include_that_matches_nothing_is_refused(tmp_path):
    (tmp_path / "databricks.yml").write_text(yaml.safe_dump({"bundle": {"name": "b"}, "include": ["jobs/*.yml"]}))
    with pytest.raises(BundleError, match="matches no file"):
        load_bundle(tmp_path / "databricks.yml")
