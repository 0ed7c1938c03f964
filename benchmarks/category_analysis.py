"""Category sensitivity and Fisher of the tiny trained models (issue 15, deliverables 1-3).

1. Per-category AP (pycocotools AP@[.5:.95]) at fp32 and under uniform PTQ at each --policies entry, with the
   calibration method the PTQ table (benchmarks/results/ptq.json) found best for that model and policy among the
   fixed methods (DetPTQ left out: minutes per model for <= 0.006 AP; min-max where the table has no row), and a
   paired bootstrap over the validation images for each category's AP drop. Category attributes from the train
   annotations: count, mean box side sqrt(area), share of small (< 32^2) boxes, fine-grained pair membership
   (fxq/data/synth.py's pairs), supercategory.
2. Per-category Fisher: the Fisher trace sum_l E_batch ||dL_F/dW_l||^2 over the quantized layers (policy
   annotation of W4A8: heads, sampling offsets and reference points float) of FQ-DETR's critical objective with
   C = {c}, for every category and supercategory, on the first --fisher-images training images (batches of 8),
   split into its class term and box terms; Spearman between the per-category trace and AP drop, with a
   percentile bootstrap over categories.
3. Why Fisher-Critical ~ Fisher-Overall: share of each weighted term (2 focal, 5 L1, 2 GIoU) in the trace, and
   Spearman between layer rankings (s_l = trace / numel, quantized layers) of each term and of L_A; plus the
   variant "box terms on critical objects only" (benchmarks/category_fisher.py) and its ranking vs L_A's.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/category_analysis.py --models detr_tiny deformable_detr_tiny \
         --out benchmarks/results/category_analysis.json
and on the 64-category set (issue 15, deliverable 4) with 2000 validation images (the same first 64 training
images; `fxq data synth --out runs/synth64_val2k --variant fine64 --seed 0 --train 64 --val 2000 --size 160`):
     OMP_NUM_THREADS=1 .venv/bin/python benchmarks/category_analysis.py --models deformable_detr_tiny_fine64 \
         --data runs/synth64_val2k --val-images 2000 --methods-of deformable_detr_tiny \
         --out benchmarks/results/category_analysis_fine64_val2k.json
Deterministic (fixed seeds, ordered loaders, per-batch Fisher). Plots: benchmarks/results/category_fisher_<model>.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from category_fisher import multi_fisher
from common import ROOT, loader, markdown, save
from scipy.stats import spearmanr

import fxq
from fxq.data.synth import variant_classes
from fxq.evaluation import bootstrap_metrics, category_mean, compare, evaluate_model
from fxq.passes import annotate_policy
from fxq.ptq import float_graph, quantize_ptq

RESULTS = ROOT / "benchmarks" / "results"
RELATED = [{"triangle", "inverted triangle"}, {"cross", "x"}]


def fine_grained(cls, classes) -> bool:
    """Has a sibling of the same colour differing only in fill or orientation (cross/x), or is the red/orange
    circle pair (fxq/data/synth.py's documented fine-grained pairs, and the same rule applied to all classes)."""
    if cls.name in ("red circle", "orange circle"):
        return True
    return any(o.name != cls.name and o.colour == cls.colour and
               (o.shape == cls.shape or any({o.shape, cls.shape} <= r for r in RELATED)) for o in classes)


def category_attributes(ann_file: Path) -> dict[int, dict]:
    data = json.loads(ann_file.read_text())
    classes = variant_classes(data.get("info", {}).get("variant", "shapes24"))
    fine = {c.name for c in classes if fine_grained(c, classes)}
    out = {}
    for cat in data["categories"]:
        areas = np.array([a["area"] for a in data["annotations"] if a["category_id"] == cat["id"]])
        out[cat["id"]] = {"name": cat["name"], "supercategory": cat["supercategory"], "train_count": len(areas),
                          "mean_side": float(np.sqrt(areas).mean()), "small_share": float((areas < 32**2).mean()),
                          "fine_grained": cat["name"] in fine}
    return out


def best_method(model: str, policy: str) -> str:
    path = RESULTS / "ptq.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = [r for r in rows if r["model"] == model and r["policy"] == policy and r["method"] != "detptq"]
    return max(rows, key=lambda r: r["AP"])["method"] if rows else "minmax"


def spearman_ci(x, y, reps: int, seed: int) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # a constant column: no rank correlation
        return {"rho": float("nan"), "p": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": len(x)}
    rho, p = spearmanr(x, y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(reps):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boots.append(spearmanr(x[i], y[i])[0])
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (float("nan"), float("nan"))
    return {"rho": float(rho), "p": float(p), "lo": float(lo), "hi": float(hi), "n": len(x)}


def layer_rho(a, b) -> float:
    return float(spearmanr(a, b)[0])


def evaluate_policies(name, fgm, args, val, calib, gt, cats):
    """Per-category AP at fp32 and each policy, and image-bootstrap intervals of each drop."""
    ids = sorted(cats)
    images = sorted(int(i) for i in gt.getImgIds())[: args.val_images]
    runs, boots, metrics = {}, {}, {}
    for policy in ["fp32", *args.policies]:
        start = time.perf_counter()
        method = "-" if policy == "fp32" else (args.method or best_method(args.methods_of or name, policy))
        gm = fgm if policy == "fp32" else quantize_ptq(fgm, calib, policy, method, progress=False)
        m = evaluate_model(gm, val, gt, progress=False)
        ap = {row["id"]: row["AP"] for row in m["categories"]}
        runs[policy] = {"method": method, "AP": m["AP"], "per_category": {c: ap[c] for c in ids}}
        if policy == "fp32":  # categories with ground truth in these images
            ids = [c for c in ids if ap[c] >= 0]
            runs["present"] = ids
            metrics = {cats[c]["name"]: category_mean([cats[c]["name"]]) for c in ids}
        if args.boot_reps:
            boots[policy] = bootstrap_metrics(gt, m["detections"], images, metrics, reps=args.boot_reps,
                                              seed=args.seed)
        print(f"  {name} {policy} {method}: AP {m['AP']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    for policy in args.policies:
        drops = {c: runs["fp32"]["per_category"][c] - runs[policy]["per_category"][c] for c in ids}
        runs[policy]["drop"] = drops
        if args.boot_reps:
            cmp = compare(boots["fp32"], boots[policy])
            runs[policy]["drop_ci"] = {c: [-cmp[cats[c]["name"]]["hi"], -cmp[cats[c]["name"]]["lo"]] for c in ids}
    return runs


def fisher_analysis(fgm, args, fisher_loader, cats, supers, runs):
    analysed = copy.deepcopy(fgm)
    annotate_policy(analysed, "W4A8")  # marks which layers are quantized (DEFAULT_OVERRIDES keep heads float)
    sets = {f"cat:{c}": [c] for c in sorted(cats)} | {f"super:{s}": ids for s, ids in supers.items()}
    start = time.perf_counter()
    fis = multi_fisher(analysed, fisher_loader, sets, analysed.num_classes)
    seconds = time.perf_counter() - start
    q = np.array(fis["quantized"])
    numel = np.array(fis["numel"])[q]
    tr = {k: {s: np.array(v)[q] for s, v in d.items()} for k, d in fis["traces"].items()}
    per_cat = {c: {s: float(tr[f"cat:{c}"][s].sum()) for s in tr[f"cat:{c}"]} for c in sorted(cats)}
    per_super = {s: {k: float(v.sum()) for k, v in tr[f"super:{s}"].items()} for s in supers}
    ids = runs["present"]
    corr = {}
    for policy in args.policies:
        drop = [runs[policy]["drop"][c] for c in ids]
        for stat in ("total", "ce", "box", "variant", "box_crit"):
            corr[f"{policy}|fisher {stat}"] = spearman_ci([per_cat[c][stat] for c in ids], drop, args.cat_reps,
                                                         args.seed)
        for attr in ("train_count", "mean_side", "small_share"):
            corr[f"{policy}|{attr}"] = spearman_ci([cats[c][attr] for c in ids], drop, args.cat_reps, args.seed)
    overall = {s: v / numel for s, v in tr["overall"].items()}
    decomposition = []
    for key in ["overall", *sets]:
        t = tr[key]
        parts = sum(float(t[s].sum()) for s in ("ce", "bbox", "giou"))
        s_l = {s: v / numel for s, v in t.items()}
        row = {"objective": key, "share_ce": float(t["ce"].sum()) / parts, "share_bbox": float(t["bbox"].sum()) / parts,
               "share_giou": float(t["giou"].sum()) / parts, "total_over_terms": float(t["total"].sum()) / parts,
               "layers_box_gt_ce": float((t["box"] > t["ce"]).mean()),
               "rho_total_vs_LA": layer_rho(s_l["total"], overall["total"]),
               "rho_ce_vs_LA": layer_rho(s_l["ce"], overall["total"]),
               "rho_box_vs_LA": layer_rho(s_l["box"], overall["total"]),
               "rho_ce_vs_LA_ce": layer_rho(s_l["ce"], overall["ce"]),
               "rho_box_vs_LA_box": layer_rho(s_l["box"], overall["box"]),
               "rho_ce_vs_total": layer_rho(s_l["ce"], s_l["total"]),
               "rho_box_vs_total": layer_rho(s_l["box"], s_l["total"])}
        if "variant" in t:
            row["share_ce_variant"] = float(t["ce"].sum()) / (float(t["ce"].sum()) + float(t["box_crit"].sum()))
            row["rho_variant_vs_LA"] = layer_rho(s_l["variant"], overall["total"])
            row["rho_variant_vs_total"] = layer_rho(s_l["variant"], s_l["total"])
        decomposition.append(row)
    return {"seconds": round(seconds, 1), "images": fis["images"], "batches": fis["batches"],
            "quantized_layers": int(q.sum()), "per_category": per_cat, "per_supercategory": per_super,
            "correlations": corr, "decomposition": decomposition,
            "layers": {"nodes": [n for n, k in zip(fis["nodes"], q, strict=True) if k], "numel": numel.tolist(),
                       "traces": {k: {s: v.tolist() for s, v in d.items()} for k, d in tr.items()
                                  if k == "overall" or k.startswith("super:")}}}


def plot(name, cats, runs, fisher, policies, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    ids = runs["present"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, stat, label in zip(axes, ("total", "ce"), ("L_F (C = {c}) Fisher trace", "class-term Fisher trace"),
                               strict=True):
        x = [fisher["per_category"][c][stat] for c in ids]
        for policy, colour in zip(policies, ("tab:blue", "tab:red", "tab:green"), strict=False):
            y = [runs[policy]["drop"][c] for c in ids]
            rho = fisher["correlations"][f"{policy}|fisher {stat}"]["rho"]
            ax.scatter(x, y, c=colour, s=18, label=f"{policy} (Spearman {rho:.2f})")
        for c, xi in zip(ids, x, strict=True):
            ax.annotate(cats[c]["name"], (xi, runs[policies[-1]]["drop"][c]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (quantized layers)")
        ax.set_ylabel("AP drop vs fp32")
        ax.axhline(0, c="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}: per-category Fisher vs PTQ AP drop")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def tables(result: dict, policies: list[str]) -> str:
    out = []
    for name, res in result["models"].items():
        cats, runs, fis = result["categories"], res["runs"], res["fisher"]
        methods = ", ".join(f"{p}: {runs[p]['method']}" for p in policies)
        rows = []
        for c in sorted(runs["present"], key=lambda c: -runs[policies[-1]]["drop"][c]):
            a = cats[c]
            row = {"category": a["name"], "super": a["supercategory"], "train n": a["train_count"],
                   "side px": round(a["mean_side"], 1), "fine": "y" if a["fine_grained"] else "",
                   "fp AP": runs["fp32"]["per_category"][c]}
            for p in policies:
                ci = runs[p].get("drop_ci", {}).get(c)
                row[f"drop {p}"] = f"{runs[p]['drop'][c]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            f = fis["per_category"][c]
            row |= {"F(L_F)": f"{f['total']:.3g}", "F(class)": f"{f['ce']:.3g}", "F(variant)": f"{f['variant']:.3g}"}
            rows.append(row)
        out.append(f"### {name}: per category (sorted by the {policies[-1]} drop; methods {methods}; "
                   f"AP fp32 {runs['fp32']['AP']:.3f}, " + ", ".join(f"{p} {runs[p]['AP']:.3f}" for p in policies)
                   + ")\n\n" + markdown(rows, list(rows[0])))
        crow = [{"x (per category)": k.split("|")[1], "policy": k.split("|")[0], "Spearman vs drop": v["rho"],
                 "95% CI (categories)": f"[{v['lo']:.2f}, {v['hi']:.2f}]", "p": v["p"]}
                for k, v in fis["correlations"].items()]
        title = f"### {name}: Spearman of per-category x vs AP drop (n = {len(runs['present'])} categories)"
        out.append(title + "\n\n" + markdown(crow, list(crow[0])))
        srows = []
        for s, ids in result["supercategories"].items():
            r = {"supercategory": s}
            for p in policies:
                r[f"mean drop {p}"] = float(np.mean([runs[p]["drop"][c] for c in ids if c in runs[p]["drop"]]))
            f = fis["per_supercategory"][s]
            r |= {"F(L_F)": f"{f['total']:.3g}", "F(class)": f"{f['ce']:.3g}", "F(variant)": f"{f['variant']:.3g}"}
            srows.append(r)
        out.append(f"### {name}: per supercategory\n\n" + markdown(srows, list(srows[0])))
        dec = [d for d in fis["decomposition"] if not d["objective"].startswith("cat:")]
        single = [d for d in fis["decomposition"] if d["objective"].startswith("cat:")]
        med = {k: float(np.median([d[k] for d in single])) for k in single[0] if k != "objective"}
        dec.append({"objective": f"cat:* (median of {len(single)})", **med})
        cols = ["objective", "share_ce", "share_bbox", "share_giou", "total_over_terms", "layers_box_gt_ce",
                "rho_total_vs_LA", "rho_ce_vs_LA", "rho_box_vs_LA", "rho_ce_vs_LA_ce", "rho_box_vs_LA_box",
                "share_ce_variant", "rho_variant_vs_LA"]
        dec = [{c: d.get(c, "-") for c in cols} for d in dec]
        out.append(f"### {name}: trace decomposition ({fis['quantized_layers']} quantized layers, "
                   f"{fis['images']} images; rho = Spearman of layer s_l)\n\n" + markdown(dec, cols))
    return "\n\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["detr_tiny", "deformable_detr_tiny"])
    p.add_argument("--policies", nargs="+", default=["W4A8", "W4A4", "4-4-8"])
    p.add_argument("--method", default=None, help="one PTQ method for every policy (default: best in ptq.json)")
    p.add_argument("--methods-of", default=None, metavar="MODEL",
                   help="take the best PTQ methods of MODEL's rows in ptq.json (a model without its own rows)")
    p.add_argument("--val-images", type=int, default=250)
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--fisher-images", type=int, default=32)
    p.add_argument("--boot-reps", type=int, default=50, help="image-bootstrap replicates per drop (0: none)")
    p.add_argument("--cat-reps", type=int, default=2000, help="category-bootstrap replicates per Spearman")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, help="a synthetic set's folder (default runs/synth)")
    p.add_argument("--out", default=str(RESULTS / "category_analysis.json"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    val = loader("val", args.val_images, root=args.data)
    calib = loader("train", args.calib_images, batch_size=8, root=args.data)
    fisher_loader = loader("train", args.fisher_images, batch_size=8, root=args.data)
    gt = val.dataset.dataset.coco
    cats = category_attributes(Path(fisher_loader.dataset.dataset.ann_file))
    supers: dict[str, list[int]] = {}
    for c in sorted(cats):
        supers.setdefault(cats[c]["supercategory"], []).append(c)
    plain_args = {**vars(args), "data": None if args.data is None else str(args.data)}
    result = {"args": plain_args, "categories": cats, "supercategories": supers, "models": {}}
    start = time.perf_counter()
    for name in args.models:
        fgm = float_graph(fxq.models.build(name))
        runs = evaluate_policies(name, fgm, args, val, calib, gt, cats)
        fisher = fisher_analysis(fgm, args, fisher_loader, cats, supers, runs)
        png = "skipped (--no-plot)" if args.no_plot else plot(
            name, cats, runs, fisher, args.policies, Path(args.out).parent / f"category_fisher_{name}.png")
        result["models"][name] = {"runs": runs, "fisher": fisher, "plot": png}
        print(f"  {name} done ({time.perf_counter() - start:.0f} s)", flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    command = "python benchmarks/category_analysis.py " + " ".join(sys.argv[1:])
    text = tables(result, args.policies)
    save(Path(args.out), [result], text, command)
    print(f"total {result['seconds']} s")


if __name__ == "__main__":
    main()
