"""``fxq pipeline``'s stages: the Fisher and allocation stages, skipping stages whose inputs did not change,
``--from``, an interrupted run continuing, and the errors raised before any stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fxq.cli import main
from fxq.cli.stages import Stage, StageBook

SMALL = ["--model", "detr_tiny", "--size", "64", "--calib-images", "4", "--val-images", "6", "--latency-runs", "2",
         "--no-progress"]


def pipeline(out: Path, *extra: str) -> int:
    return main(["pipeline", *SMALL, "--out", str(out), *extra])


def stages(out: Path) -> dict:
    return json.loads((out / "stages.json").read_text())["stages"]


def ran(out: Path, captured: str) -> list[str]:
    """The stages the last invocation ran, by its stdout's stage lines."""
    lines = [line for line in captured.splitlines() if line.startswith("[")]
    return [line.split("] ")[1] for line in lines if "kept" not in line]


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stages") / "run"
    assert pipeline(out, "--budget", "5", "--objective", "critical") == 0
    return out


# --- the stage book, alone ------------------------------------------------------------------------------------------


def test_a_changed_option_reruns_its_stage_and_those_downstream_only(tmp_path):
    plan = [Stage("a", ("x",), artifacts=("a.txt",)), Stage("b", ("y",), ("a",), ("b.txt",)),
            Stage("c", ("z",), (), ("c.txt",))]
    book = StageBook(tmp_path, plan, {"x": 1, "y": 2, "z": 3})
    assert book.prepare() == ["a", "b", "c"]
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(name)
        book.finish(name, "run-1", 0.1)
    assert StageBook(tmp_path, plan, {"x": 1, "y": 2, "z": 3}).prepare() == []
    assert StageBook(tmp_path, plan, {"x": 9, "y": 2, "z": 3}).prepare() == ["a", "b"]
    assert not (tmp_path / "a.txt").exists() and not (tmp_path / "b.txt").exists()  # stale files go first
    assert (tmp_path / "c.txt").read_text() == "c"


def test_a_missing_artifact_or_a_changed_input_file_makes_a_stage_not_done(tmp_path):
    source = tmp_path / "input.json"
    source.write_text("{}")
    plan = [Stage("a", ("path",), artifacts=("a.txt",), files=("path",))]
    recipe = {"path": str(source)}
    book = StageBook(tmp_path, plan, recipe)
    book.prepare()
    (tmp_path / "a.txt").write_text("a")
    book.finish("a", "run-1", 0.1)
    assert StageBook(tmp_path, plan, recipe).done("a")
    source.write_text('{"changed": 1}')  # the same path, other contents
    assert not StageBook(tmp_path, plan, recipe).done("a")
    source.write_text("{}")
    (tmp_path / "a.txt").unlink()
    assert not StageBook(tmp_path, plan, recipe).done("a")


# --- a pipeline run with an allocation ------------------------------------------------------------------------------


def test_the_budget_run_allocates_within_the_budget_and_ptq_uses_that_allocation(budget_run):
    frontier = json.loads((budget_run / "frontier.json").read_text())
    allocation = json.loads((budget_run / "allocation.json").read_text())
    chosen = frontier["chosen"]
    assert chosen["used"] <= 5 + 1e-6 and chosen["avg_bits"] == pytest.approx(chosen["used"])
    bits = allocation["allocation"]["bits"]
    assert set(bits.values()) - {2, 4, 8} == set() and len(set(bits.values())) > 1  # mixed, from the candidates
    # the frontier's Σ Ω never rises with the budget, and the chosen point is at most the frontier's at its budget
    omegas = [p["omega"] for p in frontier["points"]]
    assert all(b <= a + 1e-12 for a, b in zip(omegas, omegas[1:], strict=False))
    # the quantized graph follows the allocation: each allocated weight quantizer has the node's bits
    from fxq.models import build
    from fxq.ptq import float_graph, ptq_structure

    fgm = float_graph(build("detr_tiny"), (64, 64))
    state = torch.load(budget_run / "quantized.pt", weights_only=True)
    qgm = ptq_structure(fgm, state, None, "ort-cpu", budget_run / "allocation.json")
    nodes = {n.name: n for n in qgm.graph.nodes}
    for name, expected in bits.items():
        quantizer = nodes[nodes[name].meta["fxq.quantized_inputs"]["weight"]]
        assert qgm.get_submodule(quantizer.target).qrange.bits == expected, name


def test_fisher_records_both_objectives_for_every_layer(budget_run):
    nodes = json.loads((budget_run / "fisher.json").read_text())["nodes"]
    records = [r["fxq.fisher"] for r in nodes.values() if "fxq.fisher" in r]
    assert len(records) > 20
    assert all(r["overall"] >= 0 and r["critical"] >= 0 and r["samples"] == 4 for r in records)
    assert sum(r["overall"] > 0 and r["critical"] > 0 for r in records) >= len(records) - 2
    assert any(abs(r["critical"] - r["overall"]) > 1e-6 * r["overall"] for r in records)  # not one trace twice


def test_a_saved_ptq_state_rebuilds_the_same_graph(budget_run):
    """quantized.pt loaded into a blank structure gives the graph PTQ made: ORT's file of it matches."""
    from fxq.backends import OrtSession
    from fxq.models import build
    from fxq.ptq import float_graph, ptq_structure

    fgm = float_graph(build("detr_tiny"), (64, 64))
    state = torch.load(budget_run / "quantized.pt", weights_only=True)
    qgm = ptq_structure(fgm, state, None, "ort-cpu", budget_run / "allocation.json")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = qgm(images)
    ort = OrtSession(budget_run / "model_quant.onnx").run(images)
    assert float((ours["pred_boxes"] - ort["pred_boxes"]).abs().max()) < 0.1
    assert all(torch.equal(v, state[k]) for k, v in qgm.state_dict().items())


# --- skipping, --from, interruption ---------------------------------------------------------------------------------


def test_rerunning_skips_every_done_stage_and_changes_no_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert pipeline(out) == 0
    first = capsys.readouterr().out
    assert ran(out, first)[:3] == ["data", "model", "eval_fp32"]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix in (".json", ".onnx", ".pt")}
    assert pipeline(out) == 0
    second = capsys.readouterr().out
    assert ran(out, second) == []
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix in (".json", ".onnx", ".pt")}
    changed = sorted(name for name in before if before[name] != after.get(name))
    assert changed == ["environment.json", "summary.json"]  # this invocation's records only
    assert first.split("\n\n", 1)[1].split("stages:")[0] == second.split("\n\n", 1)[1].split("stages:")[0]

    assert pipeline(out, "--threads", "1") == 0  # parity and latency read --threads; nothing before them does
    assert ran(out, capsys.readouterr().out) == ["parity", "latency"]
    assert pipeline(out, "--threads", "1", "--from", "eval_quant") == 0
    assert ran(out, capsys.readouterr().out) == ["eval_quant", "export", "parity", "latency"]
    assert pipeline(out, "--threads", "1", "--method", "mse") == 0
    assert ran(out, capsys.readouterr().out) == ["quantize", "eval_quant", "export", "parity", "latency"]
    assert main(["report", str(out)]) == 0  # artifacts of four invocations, one consistent run


def test_an_interrupted_run_keeps_the_finished_stages_and_the_next_run_continues(tmp_path, capsys, monkeypatch):
    from fxq.cli.pipeline_run import PipelineRun

    out = tmp_path / "run"
    real_export = PipelineRun.export

    def interrupted(self):
        (self.out / "model_fp32.onnx").write_bytes(b"half")  # as if Ctrl-C came mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(PipelineRun, "export", interrupted)
    assert pipeline(out) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run the same command again to continue" in err
    assert list(stages(out)) == ["data", "model", "eval_fp32", "fisher", "allocate", "quantize", "eval_quant"]
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()
    monkeypatch.setattr(PipelineRun, "export", real_export)
    assert pipeline(out) == 0
    assert ran(out, capsys.readouterr().out) == ["export", "parity", "latency"]
    assert (out / "model_fp32.onnx").read_bytes() != b"half" and (out / "report.html").is_file()


# --- bad input, before any stage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, expected", [
    (["--budget", "4", "--allocation", "{alloc}"], "not both"),
    (["--budget", "0"], "--budget 0.0: give a finite number > 0"),
    (["--budget-kind", "latency", "--budget", "3"], "needs --latency-table"),
    (["--candidates", "0", "4"], "--candidates 0 4: give weight bit-widths 2..8"),
    (["--latency-runs", "0", "--from", "latency"], "this run has no latency stage"),
    (["--from", "nowhere"], "invalid choice: 'nowhere'"),
    (["--critical", "foo"], "unknown category 'foo'"),  # the synthetic set is not written yet
    (["--allocation", "{other}"], "node 'not_in_detr_tiny' does not exist here"),
])
def test_bad_stage_options_are_one_error_before_any_stage(tmp_path, capsys, extra, expected, budget_run):
    alloc, other = budget_run / "allocation.json", tmp_path / "other.json"
    record = json.loads(alloc.read_text())  # an allocation made for another model: a node detr_tiny lacks
    record["nodes"] = {"not_in_detr_tiny": next(iter(record["nodes"].values())), **record["nodes"]}
    other.write_text(json.dumps(record))
    args = [a.format(alloc=alloc, other=other) for a in extra]
    out = tmp_path / "run"
    if expected.startswith("invalid choice"):
        with pytest.raises(SystemExit):
            pipeline(out, *args)
    else:
        assert pipeline(out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and (len(err.splitlines()) == 1 or expected.startswith("invalid choice"))
    assert not out.exists()


def test_a_folder_holding_another_commands_run_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an fxq train run, say
    assert pipeline(out, "--latency-runs", "0") == 2
    assert "holds another command's run (config.json)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert pipeline(out, "--latency-runs", "0", "--overwrite") == 0
    assert not (out / "config.json").exists() and (out / "report.html").is_file()



def test_qat_as_the_quantize_stage_exports_with_parity_and_an_interrupted_one_continues(tmp_path, capsys,
                                                                                         monkeypatch):
    import fxq.cli.qat as qat_cli

    out, real = tmp_path / "run", qat_cli.run
    options = ["--qat-steps", "3", "--fisher-reg", "0.1", "--policy", "4-4-8", "--latency-runs", "0"]

    def interrupted_after_one_step(args):
        args.stop_after = 1
        real(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(qat_cli, "run", interrupted_after_one_step)
    assert pipeline(out, *options) == 130
    assert (out / "qat" / "checkpoint.pt").is_file() and "run_id" not in stages(out).get("quantize", {})
    monkeypatch.setattr(qat_cli, "run", real)
    assert pipeline(out, *options) == 0
    log = [json.loads(line) for line in (out / "qat" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "step" in r] == [1, 2, 3]  # continued from the checkpoint, not restarted
    assert all("loss_fisher" in r for r in log if "step" in r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][1]["graph"] == "4-4-8 QAT 3 steps"
    diff = json.loads((out / "parity.json").read_text())["max_abs_diff"]
    assert diff["pred_logits"] < 1e-3 and diff["pred_boxes"] < 1e-4  # onnxruntime runs the trained graph


def test_qat_options_without_qat_steps_are_refused(tmp_path, capsys):
    assert pipeline(tmp_path / "run", "--fisher-reg", "0.1") == 2
    assert "give --qat-steps N" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_nan_from_onnxruntime_in_parity_is_one_error_and_no_parity_file(tmp_path, capsys, monkeypatch):
    from fxq.backends import OrtSession

    real = OrtSession.run

    def nan_logits(self, images):
        outputs = real(self, images)
        outputs["pred_logits"][0, 0, 0] = float("nan")
        return outputs

    monkeypatch.setattr(OrtSession, "run", nan_logits)
    out = tmp_path / "run"
    assert pipeline(out, "--latency-runs", "0") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'pred_logits'" in err and "NaN/inf" in err
    assert "parity" not in stages(out) and not (out / "parity.json").exists()
    assert "export" in stages(out)  # the stages before it stay done
