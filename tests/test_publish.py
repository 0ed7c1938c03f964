"""Publishing a run as embedded weights: float16 tensors and a record whose command reproduces the run."""

from __future__ import annotations

import json

import torch

from fxq.cli import build_parser
from fxq.data import write_synthetic
from fxq.models.embedded import publish


def _run(folder, argv: dict, seconds: float, extra: str | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"argv": argv}))
    rows = [{"step": s, "loss": 10.0 / s, "time": seconds * s / 4} for s in range(1, 5)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if extra:
        (folder / extra).write_text("{}")


def test_record_names_the_training_and_pretraining_commands(tmp_path):
    pre, run, out = tmp_path / "pre", tmp_path / "run", tmp_path / "weights"
    pre_argv = vars(build_parser().parse_args(["pretrain", "detr_tiny", "--data", "d", "--out", str(pre)]))
    _run(pre, {k: v for k, v in pre_argv.items() if k != "func"}, 200.0)
    argv = vars(build_parser().parse_args(["train", "detr_tiny", "--data", "d", "--out", str(run), "--epochs", "3",
                                           "--backbone-from", str(pre / "backbone.pt"), "--resume",
                                           "--stop-after", "7", "--no-progress"]))
    _run(run, {k: v for k, v in argv.items() if k != "func"}, 1000.0, extra="eval.json")
    torch.save({"w": torch.ones(2, dtype=torch.float32), "n": torch.tensor(3)}, run / "model.pt")
    path = publish(run, "m", target=out)
    state = torch.load(path, weights_only=True)
    assert state["w"].dtype == torch.float16 and state["n"].dtype == torch.int64
    record = json.loads((out / "m.json").read_text())
    reparsed = vars(build_parser().parse_args(record["command"].split()[1:]))
    assert {k: reparsed[k] for k in argv if k not in ("func", "resume", "stop_after")} == {
        k: argv[k] for k in argv if k not in ("func", "resume", "stop_after")}
    assert not reparsed["resume"] and reparsed["stop_after"] is None
    assert record["backbone_command"].split()[:3] == ["fxq", "pretrain", "detr_tiny"]
    assert (record["backbone_seconds"], record["train_seconds"], record["total_seconds"]) == (200, 1000, 1200)


def test_a_backbone_from_embedded_weights_is_recorded_with_their_command(tmp_path):
    import fxq.models.embedded as embedded

    run, out = tmp_path / "run", tmp_path / "weights"
    argv = vars(build_parser().parse_args(["train", "detr_tiny", "--data", "d", "--out", str(run),
                                           "--backbone-from", "deformable_detr_tiny"]))
    _run(run, {k: v for k, v in argv.items() if k != "func"}, 100.0, extra="eval.json")
    torch.save({"w": torch.ones(2)}, run / "model.pt")
    publish(run, "m", target=out)
    record = json.loads((out / "m.json").read_text())
    made = json.loads(embedded.embedded_weights("deformable_detr_tiny").with_suffix(".json").read_text())
    assert record["backbone_command"] == made["command"]
    assert record["total_seconds"] == made["train_seconds"] + 100


def test_the_data_command_rewrites_the_run_s_synthetic_set(tmp_path):
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "weights"
    write_synthetic(data, seed=2, train=3, val=2, size=96, variant="fine64")
    argv = vars(build_parser().parse_args(["train", "deformable_detr_tiny_fine64", "--data", str(data), "--out",
                                           str(run)]))
    _run(run, {k: v for k, v in argv.items() if k != "func"}, 10.0, extra="eval.json")
    torch.save({"w": torch.ones(2)}, run / "model.pt")
    publish(run, "m", target=out)
    command = json.loads((out / "m.json").read_text())["data_command"].split()
    again = tmp_path / "again"
    command[command.index("--out") + 1] = str(again)
    assert command[:3] == ["fxq", "data", "synth"]
    args = build_parser().parse_args(command[1:])
    assert args.func(args) == 0
    for name in ("annotations/instances_train.json", "annotations/instances_val.json", "val/000002.png"):
        assert (again / name).read_bytes() == (data / name).read_bytes(), name
