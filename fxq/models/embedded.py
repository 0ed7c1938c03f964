"""The weights fxq ships: tiny models trained by the project (``fxq/weights/<name>.pt``, float16 state_dicts
to stay small; they load into float32 models) with ``<name>.json`` recording the command that made them."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def embedded_weights(name: str) -> Path | None:
    """Path of the embedded weights of model ``name``, or None when fxq ships none."""
    path = Path(str(resources.files("fxq") / "weights" / f"{name}.pt"))
    return path if path.is_file() else None


def publish(run_dir: str | Path, name: str, target: str | Path | None = None) -> Path:
    """Copy a finished ``fxq train`` run's weights into fxq/weights/<name>.pt (float16) with <name>.json
    (the training command, its final metrics and a summary of its log; with the command and seconds that made
    its backbone when ``--backbone-from`` named one on record). ``target``: another folder than fxq's own
    weights."""
    import json

    import torch

    from fxq.io import write_atomic, write_json

    run = Path(run_dir)
    state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    target = Path(str(resources.files("fxq") / "weights")) if target is None else Path(target)
    write_atomic(target / f"{name}.pt", lambda f: torch.save(half, f), mode="wb")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "loss": round(r["loss"], 3)} for r in log[:: max(1, len(log) // 20)]]
    argv = json.loads((run / "config.json").read_text())["argv"]
    record = {
        "data_command": _data_command(Path(argv["data"])),
        "command": _command("train", argv), "seed": argv["seed"], "steps": log[-1]["step"],
        "train_seconds": round(log[-1]["time"]), "eval_full_precision": json.loads((run / "eval.json").read_text()),
        "loss_curve": curve, "storage": "float16 state_dict, loaded into float32 models"}
    write_json(target / f"{name}.json", {**record, **_backbone_record(argv.get("backbone_from"), record)})
    return target / f"{name}.pt"


def _data_command(data: Path) -> str | None:
    """The ``fxq data synth`` command that writes the synthetic set ``data`` (from its annotation files); None
    when the set is not there any more."""
    import json

    if not all((data / "annotations" / f"instances_{s}.json").is_file() for s in ("train", "val")):
        return None
    splits = {s: json.loads((data / "annotations" / f"instances_{s}.json").read_text()) for s in ("train", "val")}
    info, images = splits["train"].get("info", {}), splits["train"]["images"]
    variant = info.get("variant")
    return (f"fxq data synth --out {data} --seed {info.get('seed', 0)} --train {len(images)} "
            f"--val {len(splits['val']['images'])} --size {images[0]['width']}"
            + (f" --variant {variant}" if variant else ""))


def _backbone_record(source: str | None, record: dict) -> dict:
    """Where ``--backbone-from`` came from (fxq's embedded weights of a model, or a run folder's file): the
    command that trained it, its seconds and the total with this run; empty when that is not on record."""
    import json

    if not source:
        return {}
    embedded = embedded_weights(source)
    if embedded is not None:
        made = json.loads(embedded.with_suffix(".json").read_text())
        command, seconds = made["command"], made["train_seconds"]
    else:
        config = Path(source).parent / "config.json"
        if not config.is_file():
            return {}
        argv = json.loads(config.read_text())["argv"]
        log = (config.parent / "log.jsonl").read_text().splitlines()
        command, seconds = _command(argv["command"], argv), round(json.loads(log[-1])["time"])
    return {"backbone_from": source, "backbone_command": command, "backbone_seconds": seconds,
            "total_seconds": seconds + record["train_seconds"]}


def _command(command: str, argv: dict) -> str:
    """The command line that reproduces a run (without the flags that only decide how it was run in slices)."""
    skip = ("model", "command", "resume", "stop_after")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in argv.items()
                     if k not in skip and v is not None and not isinstance(v, bool))
    switches = " ".join(f"--{k.replace('_', '-')}" for k, v in argv.items() if v is True and k not in skip)
    return f"fxq {command} {argv['model']} {flags} {switches}".strip()


if __name__ == "__main__":
    import sys

    print(publish(sys.argv[1], sys.argv[2]))
