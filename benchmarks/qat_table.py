"""QAT results table (issues 13 and 14): fp32, the best PTQ at 4-4-8 and every finished `fxq qat` run of each tiny
model, with paired bootstrap intervals over validation images for the differences.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qat_table.py [--reuse]
(≈ 2 min per row: evaluation on the validation and the training images, and the bootstrap; writes
benchmarks/results/qat.json). The runs are those of benchmarks/qat_runs.sh, under runs/qat/<model>/<row>/.

Rows: fp32; PTQ at 4-4-8 with lp:3 (see BEST_PTQ), calibrated on the first 32 training images; each finished
run folder (known names first).
Columns: AP, AP50 and critical AP (supercategory person) on the first 250 validation images; most-hurt AP, the mean
AP of the 5 categories (of all 24) whose AP drops most from fp32 to PTQ (listed under the table); fr_set_AP, the mean
AP of the categories the _fr_hurt runs' regularizer was computed on (their config; "-" without such a run); the
critical AP
on the first 250 training images the run's sampler drew (epoch 0, in order; fp32 and PTQ: those of the seed-0
runs); minutes (QAT: the run log's last "time"; PTQ: calibration). Differences, each with a paired bootstrap
interval over validation images (fxq.evaluation.bootstrap_metrics; all rows share the draws): every 4-4-8 QAT
row vs PTQ (AP; the w4a8_ / w2a4_ rows have no PTQ row at their policy), +FR (_fr_person: L_F on the person
supercategory; _fr_hurt: on the 5 most-hurt categories) vs the same run without it (AP, critical AP, most-hurt
AP), and each distillation row (_kd, _kdfg, _drd, _aq and their combinations) vs plain qat of the same seed and
policy (AP, AP50, critical AP, most-hurt AP).

Under the tables: the overfitting analysis (issue 15, deliverable 6), per category group and per category, AP on
the training vs the validation images for fp32, PTQ and the seed-0 QAT rows, each row's change of the train − val
gap against fp32 with a paired bootstrap interval (training and validation images resampled independently).

Each row's detections are cached in runs/qat/<model>/table_cache/<row>.json, not in qat.json (100 detections
per image: about 3 MB per row and split); --reuse takes a cached row when its inputs are unchanged.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, loader, markdown, save, synthetic_root
from torch.utils.data import DataLoader, Subset

import fxq
from fxq.data import CocoDetection, collate, eval_transforms, resolve_categories
from fxq.evaluation import bootstrap_metrics, category_mean, compare, evaluate, evaluate_model
from fxq.ptq import float_graph, quantize_ptq
from fxq.qat import load_run
from fxq.train.sampler import EpochBatchSampler

#: lp:3 for both: the best fast method at 4-4-8 (RESULTS.md: detr_tiny lp:3 0.439; deformable_detr_tiny lp:3
#: 0.765, DetPTQ 0.774 but 5 min of calibration, too slow for this table's budget).
BEST_PTQ = {"detr_tiny": "lp:3", "deformable_detr_tiny": "lp:3"}
RUN_ORDER = ["qat", "qat_kd", "qat_kdfg", "qat_drd", "qat_drd_stage125", "qat_drdw0", "qat_drdw0.3", "qat_aq",
             "qat_drd_aq", "qat_drd_aq_stage125", "qat_drd_aq_fr_person_every8", "qat_fr_person", "qat_kd_fr_person",
             "qat_fr_hurt", "qat_kd_fr_hurt", "qat_seed1", "qat_fr_person_seed1", "qat_fr_hurt_seed1",
             "qat_fr_hurt_every8_seed1", "qat_kd_seed1", "qat_kd_fr_hurt_seed1", "qat_aq_seed1", "qat_kdfg_seed1",
             "qat_kdfg_fr_hurt_every8_seed1", "w4a8_qat", "w4a8_qat_fr_person", "w4a8_qat_fr_hurt", "w2a4_qat",
             "w2a4_qat_kd", "w2a4_qat_drd", "w2a4_qat_aq", "w2a4_qat_drd_aq", "w2a4_qat_fr_person", "w2a4_qat_fr_hurt"]
METRICS = {"AP": "AP", "AP50": "AP50", "critical_AP": "critical_mAP"}  # + most_hurt_AP, per model
HURT = 5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(BEST_PTQ))
    p.add_argument("--runs", default=str(ROOT / "runs" / "qat"), help="folder of <model>/<row>/ QAT runs")
    p.add_argument("--critical", nargs="+", default=["person"], help="critical categories (names/supercategories)")
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--val-images", type=int, default=250)
    p.add_argument("--train-images", type=int, default=250)
    p.add_argument("--reps", type=int, default=200, help="bootstrap replicates")
    p.add_argument("--reuse", action="store_true", help="take cached detections of unchanged rows")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qat.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    val = loader("val", args.val_images)
    train_set = CocoDetection.from_folder(synthetic_root(), "train", transforms=eval_transforms(160))
    critical = resolve_categories(val.dataset.dataset.ann_file, args.critical)
    rows, notes = [], []
    for model in args.models:
        model_rows, note = _model_table(model, Path(args.runs) / model, val, train_set, critical, args)
        rows += model_rows
        notes.append(note)
    table = "\n\n".join([markdown(rows, ["model", "row", "AP", "AP50", "critical_AP", "most_hurt_AP", "fr_set_AP",
                                         "train_critical_AP", "minutes"]), *notes, _diff_table(rows),
                          _overfit_tables(rows)])
    save(Path(args.out), rows, table, "python benchmarks/qat_table.py " + " ".join(sys.argv[1:]))


def _model_table(model: str, runs: Path, val, train_set, critical: list[int], args) -> tuple[list[dict], str]:
    """The rows of one model (with their differences) and the note listing its most-hurt categories."""
    val_gt, val_ids = val.dataset.dataset.coco, _loader_ids(val)
    detections = _row_detections(model, runs, val, train_set, args)
    per_row = {name: evaluate(val_gt, d["val"], critical, image_ids=val_ids) for name, d in detections.items()}
    hurt = _most_hurt(per_row["fp32"], per_row["ptq"], critical, val_gt)
    trained = _fr_set(runs)
    metrics = {**METRICS, "most_hurt_AP": category_mean(hurt)}
    if trained:
        metrics["fr_set_AP"] = category_mean(trained)
    boot = {name: bootstrap_metrics(val_gt, d["val"], val_ids, metrics, critical, args.reps, seed=0)
            for name, d in detections.items()}
    rows = []
    for name, d in detections.items():
        train_m = evaluate(train_set.coco, d["train"], critical, image_ids=d["train_ids"])
        m = per_row[name]
        rows.append({"model": model, "row": f"PTQ 4-4-8 {BEST_PTQ[model]}" if name == "ptq" else name, "key": name,
                     "AP": m["AP"], "AP50": m["AP50"], "critical_AP": m["critical_mAP"],
                     "most_hurt_AP": boot[name]["point"]["most_hurt_AP"],
                     "fr_set_AP": boot[name]["point"].get("fr_set_AP", "-"),
                     "train_critical_AP": train_m["critical_mAP"], "minutes": round(d["seconds"] / 60, 1),
                     "train_images": len(d["train_ids"]), "val_images": len(val_ids), "most_hurt_categories": hurt,
                     "differences": _differences(name, list(detections), boot)})
    rows[0]["overfitting"] = _overfitting(model, detections, hurt, val, train_set, critical, args)
    notes_fr = f"; the _fr_hurt runs' L_F set (fr_set_AP): {', '.join(trained)}" if trained else ""
    note = f"{model}{notes_fr}: most-hurt categories (fp32 → PTQ AP on the validation images): " + ", ".join(
        f"{n} ({per_row['fp32']['per_category'][n]:.3f} → {per_row['ptq']['per_category'][n]:.3f})" for n in hurt)
    return rows, note


#: Rows of the overfitting table (issue 15, deliverable 6), when finished: seed 0, so they share fp32's training images.
OVERFIT_ROWS = ("fp32", "ptq", "qat", "qat_kd", "qat_fr_person", "qat_fr_hurt", "qat_kd_fr_hurt")


def _overfitting(model: str, detections: dict, hurt: list[str], val, train_set, critical: list[int], args) -> dict:
    """Per-category and per-group AP on the training vs the validation images, and each row's change of the
    train − val gap against fp32 with a paired bootstrap interval (train and val images resampled apart)."""
    val_gt, val_ids = val.dataset.dataset.coco, _loader_ids(val)
    names = [c["name"] for c in val_gt.cats.values()]
    person = [val_gt.cats[i]["name"] for i in critical]
    groups = {"most-hurt": hurt, "person": person, "other": [n for n in names if n not in hurt and n not in person]}
    metrics = {g: category_mean(members) for g, members in groups.items()}
    fp_ids = detections["fp32"]["train_ids"]
    rows = [r for r in OVERFIT_ROWS if r in detections and detections[r]["train_ids"] == fp_ids]
    per_category, gap = {}, {}
    for name in rows:
        d = detections[name]
        v = bootstrap_metrics(val_gt, d["val"], val_ids, metrics, critical, args.reps, seed=0)
        t = bootstrap_metrics(train_set.coco, d["train"], d["train_ids"], metrics, critical, args.reps, seed=1)
        gap[name] = {g: (t["point"][g], v["point"][g], t["replicates"][g] - v["replicates"][g]) for g in groups}
        val_pc = evaluate(val_gt, d["val"], critical, image_ids=val_ids)["per_category"]
        train_pc = evaluate(train_set.coco, d["train"], critical, image_ids=d["train_ids"])["per_category"]
        per_category[name] = {n: {"val": val_pc[n], "train": train_pc[n]} for n in names}
    summary = []
    for name in rows:
        for g in groups:
            train_ap, val_ap, reps = gap[name][g]
            row = {"model": model, "row": name, "group": g, "val_AP": val_ap, "train_AP": train_ap,
                   "gap": train_ap - val_ap, "gap change vs fp32 [95%]": "-"}
            if name != "fp32":
                change = reps - gap["fp32"][g][2]
                change = change[~np.isnan(change)]
                lo, hi = np.percentile(change, [2.5, 97.5])
                row["gap change vs fp32 [95%]"] = (f"{row['gap'] - (gap['fp32'][g][0] - gap['fp32'][g][1]):+.3f} "
                                                   f"[{lo:+.3f}, {hi:+.3f}]")
            summary.append(row)
    return {"groups": groups, "summary": summary, "per_category": per_category}


def _overfit_tables(rows: list[dict]) -> str:
    """The markdown of every model's overfitting summary and per-category train/val AP."""
    parts = []
    for row in rows:
        o = row.get("overfitting")
        if not o:
            continue
        parts.append(f"Overfitting, {row['model']} (AP by category group on the first 250 training images the "
                     "seed-0 runs drew vs the 250 validation images):\n\n"
                     + markdown(o["summary"], ["model", "row", "group", "val_AP", "train_AP", "gap",
                                               "gap change vs fp32 [95%]"]))
        shown = list(o["per_category"])
        table = [{"category": n, **{f"{r} val/train": f"{o['per_category'][r][n]['val']:.3f} / "
                                                        f"{o['per_category'][r][n]['train']:.3f}" for r in shown}}
                 for n in o["per_category"]["fp32"]]
        parts.append(f"Per category, {row['model']} (val / train AP):\n\n" + markdown(table, list(table[0])))
    return "\n\n".join(parts)


def _row_detections(model: str, runs: Path, val, train_set, args) -> dict[str, dict]:
    """Row key -> cached or fresh detections of fp32, PTQ and each finished run."""
    finished = _finished_runs(runs)
    seed0 = next((r for r in finished if _config(r)["options"]["seed"] == 0), None)
    order = _train_order(train_set, args.train_images, _config(seed0) if seed0 else None)
    fgm = float_graph(fxq.models.build(model))
    method, stamp = BEST_PTQ[model], {"val": args.val_images, "train": order}
    out = {"fp32": _cached(runs, "fp32", stamp, args.reuse, lambda: (fgm, 0.0), val, train_set, order),
           "ptq": _cached(runs, "ptq", {**stamp, "method": method, "calib": args.calib_images}, args.reuse,
                          lambda: _ptq(fgm, method, args.calib_images), val, train_set, order)}
    for run in finished:
        order = _train_order(train_set, args.train_images, _config(run))
        weights = (run / "qat_model.pt").stat()
        stamp = {"val": args.val_images, "train": order, "weights": [weights.st_size, weights.st_mtime_ns]}
        out[run.name] = _cached(runs, run.name, stamp, args.reuse, lambda run=run: _qat(run), val, train_set, order)
    return out


def _differences(name: str, names: list[str], boot: dict) -> list[dict]:
    """The comparisons with ``name`` as b: QAT vs PTQ (AP); +FR vs the same run without it; a lazy FR run
    (_every<K>) vs the run without it and vs the every-step one; a two-stage run (_stage<N>) vs the same run
    without the float stage; a distillation row vs plain qat of its seed."""
    if name in ("fp32", "ptq"):
        return []
    pairs = [] if re.match(r"w\da\d_", name) else [("ptq", ["AP"])]  # the PTQ row is at 4-4-8
    without_fr = re.sub(r"_fr_(person|hurt)(_every\d+)?", "", name)
    every_step = re.sub(r"_every\d+", "", name)
    keys = ["AP", "critical_AP", "most_hurt_AP"] + (["fr_set_AP"] if "_fr_hurt" in name else [])
    pairs += [(base, keys) for base in dict.fromkeys([without_fr, every_step]) if base != name and base in names]
    without_stage = re.sub(r"_stage\d+", "", name)  # Q-DETR's two-stage schedule vs the same run without it
    if without_stage != name and without_stage in names:
        pairs.append((without_stage, ["AP", "AP50", "critical_AP", "most_hurt_AP"]))
    # qat_drd_aq_seed1 -> qat_seed1, w2a4_qat_aq -> w2a4_qat, qat_drdw0.3 -> qat
    plain = re.sub(r"_(kd|kdfg|drd|aq|drdw[0-9.]+)(?=_|$)", "", name)
    if plain != name and without_fr == name and plain in names:
        pairs.append((plain, ["AP", "AP50", "critical_AP", "most_hurt_AP"]))
    out = []
    for base, keys in pairs:
        result = compare(boot[base], boot[name])
        out += [{"vs": base, "metric": k, **result[k]} for k in keys]
    return out


def _diff_table(rows: list[dict]) -> str:
    flat = []
    for row in rows:
        for d in row["differences"]:
            interval = "-" if d["lo"] is None else f"[{d['lo']:+.3f}, {d['hi']:+.3f}]"
            flat.append({"model": row["model"], "comparison": f"{row['key']} − {d['vs']}", "metric": d["metric"],
                         "a": d["a"], "b": d["b"], "diff": d["diff"], f"{round(100 * d['level'])}% interval": interval,
                         "P(diff > 0)": d["p_positive"]})
    if not flat:
        return "(no QAT runs: no differences)"
    return "Paired bootstrap over validation images (b − a):\n\n" + markdown(flat, list(flat[0]))


def _fr_set(runs: Path) -> list[str]:
    """The critical categories the first finished _fr_hurt run trained its L_F on ([] without one)."""
    for run in _finished_runs(runs):
        if "_fr_hurt" in run.name:
            return list(_config(run)["options"]["critical"])
    return []


def _most_hurt(fp32: dict, ptq: dict, critical: list[int], gt) -> list[str]:
    """The HURT categories (of all, with ground truth) whose AP drops most from fp32 to PTQ: issue 13's critical
    set (a). ``critical`` is unused: the person set is its own column."""
    names = [c["name"] for c in gt.cats.values()]
    names = [n for n in names if fp32["per_category"][n] >= 0]
    return sorted(names, key=lambda n: ptq["per_category"][n] - fp32["per_category"][n])[:HURT]


def _cached(runs: Path, name: str, stamp: dict, reuse: bool, build, val, train_set, order: list[int]) -> dict:
    """The row's detections (val, train), train image ids and minutes: from the cache when reusing and the
    stamp matches, else evaluated (``build() -> (graph, seconds)``) and cached."""
    path = runs / "table_cache" / f"{name}.json"
    if reuse and path.is_file():
        cached = json.loads(path.read_text())
        if cached["stamp"] == stamp:
            print(f"reusing {path}", flush=True)
            return cached
    start = time.perf_counter()
    gm, seconds = build()
    train = DataLoader(Subset(train_set, order), batch_size=16, collate_fn=collate)
    result = {"stamp": stamp, "seconds": seconds,
              "val": evaluate_model(gm, val, val.dataset.dataset.coco, progress=False)["detections"],
              "train": evaluate_model(gm, train, train_set.coco, progress=False)["detections"],
              "train_ids": _loader_ids(train)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, separators=(",", ":")))
    print(f"{runs.name}/{name}: evaluated in {time.perf_counter() - start:.0f} s", flush=True)
    return result


def _ptq(fgm, method: str, calib_images: int):
    start = time.perf_counter()
    gm = quantize_ptq(fgm, loader("train", calib_images, batch_size=8), "4-4-8", method, progress=False)
    return gm, time.perf_counter() - start


def _qat(run: Path):
    _, student = load_run(run)
    lines = (run / "log.jsonl").read_text().splitlines()
    last = next(json.loads(line) for line in reversed(lines) if '"time"' in line)
    return student, float(last["time"])


def _finished_runs(runs: Path) -> list[Path]:
    """Run folders with a trained student (qat_model.pt), the known names first."""
    if not runs.is_dir():
        return []
    found = {p.name: p for p in runs.iterdir() if (p / "qat_model.pt").is_file() and (p / "config.json").is_file()}
    for p in runs.iterdir():
        if p.is_dir() and p.name not in found and p.name != "table_cache":
            print(f"skipping {p}: no qat_model.pt (unfinished run)", flush=True)
    return [found[n] for n in RUN_ORDER if n in found] + [found[n] for n in sorted(found) if n not in RUN_ORDER]


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def _train_order(train_set, images: int, config: dict | None) -> list[int]:
    """Dataset indices of the first ``images`` training images the run drew (epoch 0's batches in order);
    without a run, those of seed 0 and batch size 8 (benchmarks/qat_runs.sh)."""
    options = config["options"] if config else {"seed": 0, "batch_size": 8, "steps": None}
    sampler = EpochBatchSampler(len(train_set), options["batch_size"], options["seed"], epoch=0)
    seen = [i for batch in sampler for i in batch]
    if options.get("steps"):
        seen = seen[: options["steps"] * options["batch_size"]]
    return seen[:images]


def _loader_ids(data: DataLoader) -> list[int]:
    """The image ids of a loader over a Subset of a CocoDetection, in order."""
    subset = data.dataset
    return [int(subset.dataset.ids[i]) for i in subset.indices]


if __name__ == "__main__":
    main()
