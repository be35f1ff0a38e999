"""The report folder: complete or absent, every section in report.json, plots that show something."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from matplotlib.figure import Figure

from sparkml_mnist.report import folder as report_folder
from sparkml_mnist.errors import SparkMnistError
from sparkml_mnist.job.metrics import evaluate
from sparkml_mnist.report import (
    COMPARISON_PNG,
    REPORT_JSON,
    REPORT_MD,
    Evaluation,
    ReportError,
    VariantResult,
    format_summary_table,
    write_report,
)

CLASSES = 10
EXAMPLES = 300
EPOCHS = 3
CONFIG = {"run": "test", "global_batch": 128, "data": Path("/data/mnist"), "split": (0.9, 0.1)}
TIMINGS = {"spark_start": 3.5, "read": 1.25}


def make_evaluation(hit_rate: float, seed: int) -> Evaluation:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, EXAMPLES)
    favoured = np.where(rng.random(EXAMPLES) < hit_rate, labels, rng.integers(0, CLASSES, EXAMPLES))
    logits = rng.normal(0.0, 1.0, (EXAMPLES, CLASSES))
    logits[np.arange(EXAMPLES), favoured] += 6.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return evaluate(labels, probs)


def make_result(name: str, seed: int, tmp_path: Path, reference: float | None = 0.95) -> VariantResult:
    model = tmp_path / "models-in" / name / "model.keras"
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(f"weights of {name}".encode())
    return VariantResult(
        name=name,
        description=f"{name}: conv | pool | dense",  # a pipe, which report.md must escape
        np=2,
        epochs=EPOCHS,
        history={
            "loss": [0.5, 0.2, 0.1],
            "accuracy": [0.85, 0.93, 0.96],
            "val_loss": [0.3, 0.15, 0.12],
            "val_accuracy": [0.9, 0.95, 0.96],
        },
        evaluation=make_evaluation(0.95, seed),
        parameter_count=149_010 + seed,
        rank_records=[
            {"rank": rank, "host": "127.0.0.1", "pid": 100 + rank, "steps": 30, "error": None} for rank in range(2)
        ],
        seconds={"train": 12.5, "evaluate": 1.5, "total": 14.0},
        lab_reference_accuracy=reference,
        model_files=[model],
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[VariantResult]]:
    """One complete report of two variants, shared by the read-only checks (drawing plots is the slow part)."""
    base = tmp_path_factory.mktemp("report")
    results = [make_result("variant1", 1, base), make_result("variant3", 3, base, reference=None)]
    folder = write_report(base / "run-1", results, config=CONFIG, versions={"extra": "1.0"}, timings=TIMINGS)
    return folder, results


def test_every_file_is_written(written):
    folder, results = written
    expected = {REPORT_JSON, REPORT_MD, COMPARISON_PNG, "models"}
    for r in results:
        expected |= {f"{r.name}-loss.png", f"{r.name}-confusion.png"}
    assert {p.name for p in folder.iterdir()} == expected
    for r in results:
        copied = folder / "models" / r.name / "model.keras"
        assert copied.read_bytes() == r.model_files[0].read_bytes()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_report_json_round_trips_and_holds_every_section(written):
    folder, results = written
    data = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
    assert {"config", "versions", "timings", "variants", "created", "schema_version"} <= set(data)
    assert data["config"] == {"run": "test", "global_batch": 128, "data": "/data/mnist", "split": [0.9, 0.1]}
    assert data["timings"] == TIMINGS
    assert data["versions"]["extra"] == "1.0" and data["versions"]["numpy"] == np.__version__
    assert [v["name"] for v in data["variants"]] == [r.name for r in results]
    for entry, result in zip(data["variants"], results):
        assert entry["history"] == result.history
        assert Evaluation.from_dict(entry["test"]) == result.evaluation
        assert np.array_equal(entry["test"]["confusion_matrix"], result.evaluation.confusion_matrix)
        assert entry["rank_records"] == result.rank_records
        assert entry["seconds"] == result.seconds
        assert entry["parameter_count"] == result.parameter_count
        assert entry["lab_reference_accuracy"] == result.lab_reference_accuracy
        assert entry["files"]["models"] == [f"models/{result.name}/model.keras"]


TAB_BLUE, TAB_ORANGE, TAB_RED, DARKEST_BLUE = (31, 119, 180), (255, 127, 14), (214, 39, 40), (8, 48, 107)


@pytest.mark.parametrize(
    "name,colours",
    [
        (COMPARISON_PNG, [TAB_BLUE, TAB_RED]),  # the bars and the lab's reference marks
        ("variant1-loss.png", [TAB_BLUE, TAB_ORANGE]),  # training and validation loss
        ("variant3-confusion.png", [DARKEST_BLUE]),  # the diagonal
    ],
)
def test_plots_open_and_are_not_blank(written, name, colours):
    folder, _ = written
    with Image.open(folder / name) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB")).astype(np.int64)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.var() > 0
    packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    assert len(np.unique(packed)) > 2  # more than a background and one colour
    for red, green, blue in colours:  # what was plotted is there, not just empty axes
        assert np.count_nonzero(packed == (red << 16) | (green << 8) | blue) > 100, (red, green, blue)


def test_report_md_has_the_table_and_links_that_resolve(written):
    folder, results = written
    text = (folder / REPORT_MD).read_text(encoding="utf-8")
    assert "| variant | np | epochs | params | test accuracy | test loss | lab reference | vs lab | wall time |" in text
    for r in results:
        accuracy = f"{r.evaluation.accuracy * 100:.2f}%"
        assert f"| {r.name} | 2 | 3 | {r.parameter_count:,} | {accuracy} |" in text
        assert f"## {r.name}" in text
        assert r"conv \| pool \| dense" in text
    links = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if "](" in line]
    assert COMPARISON_PNG in links and "variant3-confusion.png" in links
    for link in links:
        assert (folder / link).is_file(), link


def test_console_table_lists_every_variant_in_aligned_columns(written):
    _, results = written
    lines = format_summary_table(results).splitlines()
    assert lines[0].split() == [
        "variant", "np", "epochs", "params", "test", "accuracy", "test", "loss", "lab", "reference", "vs", "lab",
        "wall", "time",
    ]
    assert set(lines[1]) == {"-", " "}
    assert [line.split()[0] for line in lines[2:]] == ["variant1", "variant3"]
    assert lines[2].split()[6:9] == ["95.00%", "{:+.2f}".format((results[0].evaluation.accuracy - 0.95) * 100), "pt"]
    assert lines[3].split()[6:8] == ["-", "-"]  # no lab figure for this one
    assert lines[2].index("14.0 s") == lines[3].index("14.0 s")


def test_a_crash_while_plotting_leaves_no_folder_at_all(tmp_path, monkeypatch):
    results = [make_result("variant1", 1, tmp_path), make_result("variant2", 2, tmp_path)]
    out = tmp_path / "out"
    out.mkdir()
    drawn = []

    def confusion_then_crash(result):
        if drawn:
            raise RuntimeError("plotting failed")
        drawn.append(result.name)
        return real_confusion(result)

    real_confusion = report_folder.confusion_figure
    monkeypatch.setattr(report_folder, "confusion_figure", confusion_then_crash)
    with pytest.raises(RuntimeError, match="plotting failed"):
        write_report(out / "run", results)
    assert drawn == ["variant1"]  # files had been written when it crashed
    assert list(out.iterdir()) == []


def test_a_crash_while_overwriting_keeps_the_old_report(tmp_path, monkeypatch):
    results = [make_result("variant1", 1, tmp_path)]
    folder = write_report(tmp_path / "out" / "run", results)
    before = (folder / REPORT_JSON).read_bytes()

    def crash(result):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report_folder, "loss_figure", crash)
    with pytest.raises(RuntimeError):
        write_report(folder, results, overwrite=True)
    assert (folder / REPORT_JSON).read_bytes() == before
    assert [p.name for p in folder.parent.iterdir()] == ["run"]


def _no_plots(monkeypatch) -> None:
    for slow in ("loss_figure", "confusion_figure", "comparison_figure"):  # the plots are checked above
        monkeypatch.setattr(report_folder, slow, lambda *args: Figure())


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_a_non_empty_folder_is_refused_unless_overwrite(tmp_path, monkeypatch):
    _no_plots(monkeypatch)
    results = [make_result("variant1", 1, tmp_path)]
    folder = tmp_path / "run"
    write_report(folder, results)
    with pytest.raises(ReportError, match="output folder exists and is not empty") as caught:
        write_report(folder, results)
    assert isinstance(caught.value, SparkMnistError) and str(folder) in str(caught.value)

    earlier = json.loads((folder / REPORT_JSON).read_text())
    (folder / REPORT_JSON).write_text(json.dumps({**earlier, "created": "the earlier run"}))
    write_report(folder, results, overwrite=True)  # this tool's report and nothing else: replaced
    assert json.loads((folder / REPORT_JSON).read_text())["created"] != "the earlier run"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_report_json_says_which_tool_wrote_it(written):
    folder, _ = written
    text = (folder / REPORT_JSON).read_text(encoding="utf-8")
    assert text.startswith('{\n  "generator": "sparkml-mnist",')
    assert report_folder.foreign_entry(folder) is None  # a pure report: --overwrite may replace it


@pytest.mark.parametrize(
    "plant,named",
    [
        ({"notes.txt": "mine"}, "'notes.txt'"),  # a user's folder: nothing of this tool's in it
        ({"report.json": '{"variants": []}', "data.csv": "x"}, "'report.json' (not a sparkml-mnist report)"),
    ],
)
def test_overwrite_refuses_a_folder_that_holds_no_report_of_this_tool(tmp_path, plant, named):
    folder = tmp_path / "run"
    folder.mkdir()
    for name, text in plant.items():
        (folder / name).write_text(text)
    before = _tree(folder)
    with pytest.raises(ReportError) as caught:
        write_report(folder, [make_result("variant1", 1, tmp_path)], overwrite=True)
    message = str(caught.value)
    assert message == (f"{folder}: --overwrite replaces only a folder holding a sparkml-mnist report and nothing else, "
                       f"and this one holds {named}; move that away, or choose another --output")
    assert _tree(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["models-in", "run"]


@pytest.mark.parametrize("extra,named", [("notes.txt", None), (".git", None), ("models/notes.txt", None),
                                         ("models/variant1/notes.txt", None),
                                         ("models/variant9/model.keras", "models/variant9")])
def test_overwrite_refuses_a_report_folder_holding_a_user_file_too(tmp_path, monkeypatch, extra, named):
    _no_plots(monkeypatch)
    results = [make_result("variant1", 1, tmp_path)]
    folder = write_report(tmp_path / "run", results)
    (folder / extra).parent.mkdir(parents=True, exist_ok=True)
    (folder / extra).write_text("mine")
    before = _tree(folder)
    with pytest.raises(ReportError, match=f"and this one holds '{named or extra}'; move that away"):
        write_report(folder, results, overwrite=True)
    assert _tree(folder) == before


def test_overwrite_is_refused_at_plan_time_with_exit_2_nothing_touched(tmp_path):
    from sparkml_mnist.cli.commands import EXIT_USAGE, exit_code
    from sparkml_mnist.config import load_run
    from sparkml_mnist.errors import ConfigError
    from sparkml_mnist.job.plan import plan_job

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds 'notes.txt'") as caught:
        plan_job(load_run("sample").with_overrides(output=str(tmp_path)), overwrite=True)
    assert exit_code(caught.value) == EXIT_USAGE == 2
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_report_of_an_earlier_version_without_the_marker(tmp_path, monkeypatch):
    _no_plots(monkeypatch)
    results = [make_result("variant1", 1, tmp_path)]
    folder = write_report(tmp_path / "run", results)
    report = json.loads((folder / REPORT_JSON).read_text())
    del report["generator"]
    (folder / REPORT_JSON).write_text(json.dumps(report))
    assert report_folder.foreign_entry(folder) is None
    write_report(folder, results, overwrite=True)
    assert json.loads((folder / REPORT_JSON).read_text())["generator"] == "sparkml-mnist"


def test_a_file_put_in_the_report_folder_while_the_run_writes_is_not_deleted(tmp_path, monkeypatch):
    _no_plots(monkeypatch)
    results = [make_result("variant1", 1, tmp_path)]
    folder = write_report(tmp_path / "run", results)
    real_write = report_folder._write_contents

    def user_saves_notes_meanwhile(partial, *args):
        real_write(partial, *args)
        (folder / "notes.txt").write_text("mine")

    monkeypatch.setattr(report_folder, "_write_contents", user_saves_notes_meanwhile)
    with pytest.raises(ReportError, match="holds 'notes.txt'"):
        write_report(folder, results, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / REPORT_JSON).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_empty_folder_or_a_missing_parent_is_fine(tmp_path):
    results = [make_result("variant1", 1, tmp_path)]
    (tmp_path / "empty").mkdir()
    assert (write_report(tmp_path / "empty", results) / REPORT_JSON).is_file()
    assert (write_report(tmp_path / "a" / "b" / "run", results) / REPORT_JSON).is_file()


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ReportError, match="exists and is not a folder"):
        write_report(tmp_path / "run", [make_result("variant1", 1, tmp_path)], overwrite=True)


def test_nan_in_history_becomes_null_in_json(tmp_path, monkeypatch):
    result = make_result("variant1", 1, tmp_path)
    result.history["loss"][1] = math.nan
    for slow in ("loss_figure", "confusion_figure", "comparison_figure"):  # the plots are checked above
        monkeypatch.setattr(report_folder, slow, lambda *args: Figure())
    folder = write_report(tmp_path / "run", [result])
    data = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
    assert data["variants"][0]["history"]["loss"] == [0.5, None, 0.1]


def test_the_final_rename_never_replaces_a_report_that_appeared(tmp_path, monkeypatch):
    results = [make_result("variant1", 1, tmp_path)]
    target = tmp_path / "run"
    real_write = report_folder._write_contents

    def someone_else_wrote_meanwhile(folder, *args):
        real_write(folder, *args)
        target.mkdir()
        (target / "report.json").write_text("theirs")  # another run's report, just before the rename

    for slow in ("loss_figure", "confusion_figure", "comparison_figure"):  # the plots are checked above
        monkeypatch.setattr(report_folder, slow, lambda *args: Figure())
    monkeypatch.setattr(report_folder, "_write_contents", someone_else_wrote_meanwhile)
    with pytest.raises(ReportError, match="another report appeared there while this run was writing"):
        write_report(target, results)
    assert [p.name for p in target.iterdir()] == ["report.json"] and (target / "report.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


def test_the_loss_plot_title_names_only_the_losses_it_draws(tmp_path):
    from dataclasses import replace

    from sparkml_mnist.report.figures import loss_figure

    with_validation = make_result("variant1", 1, tmp_path)
    without = replace(with_validation, history={"loss": [0.5, 0.2, 0.1]})  # a variant without a validation split
    assert loss_figure(with_validation).axes[0].get_title() == "variant1: training and validation loss per epoch"
    assert loss_figure(without).axes[0].get_title() == "variant1: training loss per epoch"
