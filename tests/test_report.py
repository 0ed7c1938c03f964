"""``fxq pipeline``'s recipe and run-folder artifacts, and ``fxq report``'s page, checked in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shlex
import shutil
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from browser import find_chromium, is_blank, page_check, screenshot

from fxq.cli import build_parser, main
from fxq.cli.pipeline import recipe_options
from fxq.cli.recipe import effective_recipe

KEYS = ["model", "checkpoint", "data", "policy", "allocation", "budget", "budget_kind", "objective", "candidates",
        "latency_table", "method", "qat_steps", "fisher_reg", "distill", "critical", "calib_images", "val_images",
        "size", "runtime", "latency_runs", "threads", "out", "seed"]
ARTIFACTS = ["recipe.yaml", "environment.json", "stages.json", "model.json", "eval_fp32.json", "eval_quant.json"]
ANALYSIS = ["fisher.json", "frontier.json"]
DEPLOYED = ["export.json", "parity.json", "latency.json", "model_fp32.onnx", "model_quant.onnx"]


def parsed_recipe(argv: list[str]) -> dict:
    """The recipe options of ``fxq pipeline ARGV`` as argparse alone gives them (no recipe file read)."""
    return effective_recipe(build_parser().parse_args(["pipeline", *argv]), recipe_options())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A small pipeline run: the recipe file says 12 validation images at 64 px, the flag says 8 (the flag wins)."""
    root = tmp_path_factory.mktemp("pipeline")
    recipe = root / "small.yaml"
    recipe.write_text(yaml.safe_dump({"size": 64, "calib_images": 4, "val_images": 12, "out": str(root / "run")}))
    assert main(["pipeline", "--recipe", str(recipe), "--val-images", "8"]) == 0
    return root / "run"


def read(run: Path, name: str) -> dict:
    return json.loads((run / name).read_text())


# --- recipe -------------------------------------------------------------------------------------------------------


def test_print_recipe_prints_the_parsers_defaults(capsys):
    assert main(["pipeline", "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert list(printed) == KEYS
    assert printed == parsed_recipe([])
    assert printed["model"] == "deformable_detr_tiny" and printed["val_images"] == 100 and printed["data"] is None


def test_a_recipe_sets_options_and_the_flags_override_it(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("policy: W4A8\nseed: 5\ncritical: [car, 3]\nval_images: 10\n")
    assert main(["pipeline", "--recipe", str(recipe), "--seed", "7", "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == {**parsed_recipe([]), "policy": "W4A8", "seed": 7, "critical": ["car", "3"], "val_images": 10}


def test_an_unknown_recipe_key_is_one_error_before_any_work(tmp_path, capsys):
    recipe, out = tmp_path / "r.yaml", tmp_path / "out"
    recipe.write_text("policy: W4A8\ncalib-images: 4\n")
    assert main(["pipeline", "--recipe", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "unknown key 'calib-images'" in err and str(recipe) in err and "did you mean calib_images" in err
    assert "known keys are " + ", ".join(KEYS) in err
    assert not out.exists()


@pytest.mark.parametrize("line, expected", [
    ("val_images: ten", "val_images is 'ten'; expected an integer"),
    ("size: true", "size is True; expected an integer"),
    ("critical: person", "critical is 'person'; expected a list of strings (at least one)"),
    ("policy: null", "policy is None; expected a string"),
    ("- policy", "not a mapping"),
    ("policy: [W8", "is not valid YAML"),
])
def test_a_bad_recipe_value_names_the_key_and_the_expected_type(tmp_path, capsys, line, expected):
    recipe, out = tmp_path / "r.yaml", tmp_path / "out"
    recipe.write_text(line + "\n")
    assert main(["pipeline", "--recipe", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(recipe) in err and not out.exists()


def test_a_missing_recipe_file_is_named(tmp_path, capsys):
    assert main(["pipeline", "--recipe", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml is missing" in capsys.readouterr().err


# --- run-folder artifacts -----------------------------------------------------------------------------------------


def test_the_run_folder_holds_each_stages_artifact(run):
    assert all((run / name).is_file() for name in [*ARTIFACTS, *ANALYSIS, *DEPLOYED, "summary.json", "report.html"])
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe == {**parsed_recipe([]), "size": 64, "calib_images": 4, "val_images": 8, "out": str(run)}
    fp32, quant = read(run, "eval_fp32.json"), read(run, "eval_quant.json")
    assert fp32["num_images"] == quant["num_images"] == 8  # the flag's 8, not the recipe file's 12
    assert read(run, "model.json")["size"] == [64, 64]
    for record in (fp32, quant):
        assert "detections" not in record
        assert set(record["per_category"]) == {row["name"] for row in record["categories"]}
    rows = read(run, "summary.json")["rows"]
    assert [r["graph"] for r in rows] == [fp32["graph"], quant["graph"]] == ["fp32 (FX graph)", "W8A8 minmax"]
    for row, record in zip(rows, (fp32, quant), strict=True):
        assert (row["AP"], row["AP50"], row["critical_AP"]) == (record["AP"], record["AP50"], record["critical_mAP"])
    assert quant["quantizers"] > 0


def test_environment_records_the_versions_and_a_command_that_reproduces_the_recipe(run):
    env = read(run, "environment.json")
    for name in ("torch", "onnxruntime", "onnx", "numpy"):
        assert env["packages"][name] == metadata.version(name)
    assert env["cpu_count"] >= 1 and env["python"].count(".") == 2 and env["platform"]
    words = shlex.split(env["command"])
    assert words[:2] == ["fxq", "pipeline"]
    assert parsed_recipe(words[2:]) == yaml.safe_load((run / "recipe.yaml").read_text())


# --- the report ---------------------------------------------------------------------------------------------------


class Tables(HTMLParser):
    """{table id: rows of (tr class, [cell texts])} of an HTML page."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: dict[str, list] = {}
        self._table = self._row = self._cell = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = (attrs.get("class"), [])
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row[1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None


def shown(value: float | None) -> str:
    return "—" if value is None else "n/a" if value < 0 else f"{value:.3f}"


def test_the_report_shows_the_artifacts_numbers(run):
    page = (run / "report.html").read_text()
    tables = Tables(page).tables
    fp32, quant, env = read(run, "eval_fp32.json"), read(run, "eval_quant.json"), read(run, "environment.json")
    accuracy = [cells for _, cells in tables["accuracy"][1:3]]
    for cells, record in zip(accuracy, (fp32, quant), strict=True):
        assert cells[:5] == [record["graph"], *(shown(record[k]) for k in ("AP", "AP50", "critical_mAP",
                                                                            "rest_mAP"))]
    assert tables["accuracy"][3][1][1] == f"{quant['AP'] - fp32['AP']:+.3f}"
    rows = {cells[0]: (cls, cells) for cls, cells in tables["per-category"][1:]}
    quant_ap = {row["name"]: row["AP"] for row in quant["categories"]}
    assert list(rows) == [row["name"] for row in fp32["categories"]]
    for row in fp32["categories"]:
        cls, cells = rows[row["name"]]
        assert cells[1:4] == [str(row["num_gt"]), shown(row["AP"]), shown(quant_ap[row["name"]])]
        assert (cls == "critical") == row["critical"]
    assert any(row["critical"] for row in fp32["categories"])
    packages = {cells[0]: cells[1] for _, cells in tables["packages"][1:]}
    assert packages["torch"] == env["packages"]["torch"] and packages["onnxruntime"] == env["packages"]["onnxruntime"]
    command = html.unescape(re.search(r"<pre id=\"command\">(.*?)</pre>", page, re.S).group(1))
    # the shown command, its backslash-newlines joined as a shell joins them, is the recorded one
    assert shlex.split(command.replace("\\\n", "")) == shlex.split(env["command"])


def test_parity_is_onnxruntime_on_the_evaluated_images(run):
    """parity.json's AP is what onnxruntime's own outputs on the run's validation images score (recomputed here
    from model_quant.onnx), and its |Δ| is small against the fake-quant graph's AP difference."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from fxq.backends import OrtSession
    from fxq.data import CocoDetection, collate, eval_transforms
    from fxq.evaluation import evaluate, postprocess, to_coco_results

    parity, quant = read(run, "parity.json"), read(run, "eval_quant.json")
    ds = CocoDetection.from_folder(run / "data", "val", transforms=eval_transforms(64))
    session, detections = OrtSession(run / "model_quant.onnx"), []
    for images, _, targets in DataLoader(Subset(ds, range(parity["num_images"])), batch_size=3, collate_fn=collate):
        sizes = torch.stack([t["orig_size"] for t in targets])
        detections += to_coco_results(postprocess(session.run(images), sizes, "sigmoid", 100),
                                      [int(t["image_id"]) for t in targets])
    ids = [ds.ids[i] for i in range(parity["num_images"])]
    assert evaluate(ds.coco, detections, image_ids=ids)["AP"] == pytest.approx(parity["AP"], abs=1e-9)
    assert parity["max_abs_diff"]["pred_boxes"] < 0.05 and abs(parity["AP"] - quant["AP"]) < 0.05


def test_latency_and_export_records_agree_with_the_files(run):
    latency, export = read(run, "latency.json"), read(run, "export.json")
    rows = latency["rows"]
    assert latency["speedup"] == pytest.approx(rows["fp32"]["median_ms"] / rows["quantized"]["median_ms"], rel=1e-2)
    assert rows["fp32"]["runs"] == rows["quantized"]["runs"] == 20
    assert export["quant_bytes"] == (run / "model_quant.onnx").stat().st_size < export["fp32_bytes"]
    page = (run / "report.html").read_text()
    layers = Tables(page).tables["layers"]
    assert [cells[0] for _, cells in layers[1:]] == [n["node"] for n in export["report"]["nodes"]]
    parity = read(run, "parity.json")
    assert f"AP {shown(parity['AP'])}" in html.unescape(page) and f"{latency['speedup']:.2f}×" in page


def test_the_report_is_self_contained(run):
    page = (run / "report.html").read_text()
    lowered = page.lower()
    for needle in ("<script", "<link", "<iframe", "<object", "<embed", "<img", "@import", " src="):
        assert needle not in lowered, needle
    references = re.findall(r"href=\"([^\"]*)\"", page) + re.findall(r"url\(\s*['\"]?([^)'\"]*)", page)
    assert references and all(r.startswith("#") for r in references)  # glyphs and clip paths inside the page
    web = re.findall(r"([\w:-]+)=\"https?://", page)
    assert page.count("http") == len(web) and all(name.startswith("xmlns") for name in web), web  # namespaces only
    assert page.count("<svg") == 3 and page.count("<figure") == 3  # per-category AP, Fisher, frontier


def test_fxq_report_rebuilds_the_same_page_from_the_artifacts_alone(run, tmp_path, capsys):
    copy = tmp_path / "again" / run.name
    copy.mkdir(parents=True)
    for name in [*ARTIFACTS, *ANALYSIS, *DEPLOYED[:3]]:  # no data, model or ONNX file: only the JSON/YAML ones
        shutil.copy(run / name, copy / name)
    assert main(["report", str(copy)]) == 0
    assert f"report: {copy / 'report.html'}" in capsys.readouterr().out
    assert (copy / "report.html").read_bytes() == (run / "report.html").read_bytes()


def _edit(path: Path, key: str, value=None) -> None:
    """Set ``key`` of a JSON artifact to ``value``, or drop it when ``value`` is None."""
    record = json.loads(path.read_text())
    if value is None:
        del record[key]
    else:
        record[key] = value
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("damage, expected", [
    (lambda folder: (folder / "eval_quant.json").unlink(), "has no eval_quant.json"),
    (lambda folder: (folder / "eval_fp32.json").write_text('{"AP": 0.'), "eval_fp32.json is damaged (not valid JSON"),
    (lambda folder: _edit(folder / "eval_fp32.json", "categories"), "eval_fp32.json lacks categories"),
    (lambda folder: _edit(folder / "eval_quant.json", "run_id", "an-earlier-run"),
     "eval_quant.json is not the one"),
    (lambda folder: (folder / "recipe.yaml").write_text("a: [b"), "recipe.yaml is damaged (not valid YAML)"),
    (lambda folder: [(folder / n).unlink() for n in ARTIFACTS], "has no " + ", ".join(ARTIFACTS)),
    (lambda folder: shutil.rmtree(folder), "is missing: give the --out folder of an `fxq pipeline` run"),
])
def test_a_missing_or_damaged_artifact_is_one_error_naming_the_file(run, tmp_path, capsys, damage, expected):
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ARTIFACTS:
        shutil.copy(run / name, copy / name)
    damage(copy)
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err and str(copy) in err
    if not expected.startswith("is missing"):
        assert "`fxq pipeline " in err and f"--out {copy}`" in err
    assert not (copy / "report.html").exists()


def test_the_chart_highlights_the_critical_categories_only():
    from fxq.cli.report_chart import CRITICAL_COLORS, category_ap_svg

    rows = [{"name": n, "AP": ap, "critical": False} for n, ap in (("a", 0.5), ("b", 0.25), ("c", -1.0))]
    plain = category_ap_svg(rows, rows, "W8A8")
    marked = category_ap_svg([{**rows[0], "critical": True}, *rows[1:]], rows, "W8A8")
    assert plain.startswith("<svg") and marked.startswith("<svg")
    legend = plain.count(CRITICAL_COLORS[0])  # the legend's patch alone
    assert legend >= 1 and marked.count(CRITICAL_COLORS[0]) >= legend + 2  # also the bar and the tick label


# --- in a real browser ----------------------------------------------------------------------------------------------

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install "
                                                               "chromium)")


@needs_chromium
def test_the_report_renders_in_chromium_without_errors(run, tmp_path):
    from PIL import Image

    png = screenshot(CHROMIUM, run / "report.html", tmp_path / "report.png", tmp_path)
    assert Image.open(png).size == (1200, 1600) and not is_blank(png)
    check = page_check(CHROMIUM, run / "report.html", tmp_path)
    assert check["problems"] == [] and check["console"] == []
    assert check["figures"] and all(tag == "svg" and w > 100 and h > 100 for tag, w, h in check["figures"])


@needs_chromium
def test_the_browser_check_catches_errors_and_empty_figures(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head></head><body><svg width='0' height='0'></svg>"
                    "<script>console.error('boom'); notDefined();</script></body></html>")
    check = page_check(CHROMIUM, page, tmp_path)
    assert ["svg", 0, 0] in check["figures"]
    assert "error: boom" in check["problems"] and any("notDefined" in p for p in check["problems"])
    assert any("notDefined" in line for line in check["console"])


def test_a_one_colour_screenshot_is_blank(tmp_path):
    from PIL import Image

    Image.new("RGB", (120, 160), "white").save(tmp_path / "white.png")
    assert is_blank(tmp_path / "white.png")
