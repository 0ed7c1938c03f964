"""Speed of the Fisher analysis (vs plain forward+backward) and of the bit-allocation MILP.

Run (CPU free):  .venv/bin/python benchmarks/fisher_ilp_speed.py --model detr_r50 --images 64 --size 512
Smoke test:      .venv/bin/python benchmarks/fisher_ilp_speed.py --model detr_tiny --images 4 --size 64

Random weights and random images/targets (timing only). Rows: N images as plain forward+backward in batches
and one image at a time, the empirical Fisher per batch and per sample over the same images (and optionally
Hutchinson), the MILP's construction (sensitivities included) and solve for the model's allocated nodes, and
the solve of a random instance of --ilp-nodes nodes × the candidates (target: ≤ 1 s for 150 × 3).
Prints a markdown table and writes JSON (default benchmarks/results/fisher_ilp_speed_<model>_<size>.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fxq
from fxq.io import write_json
from fxq.objectives import build_criterion
from fxq.passes.allocate import build_problem, solve_mckp
from fxq.passes.fisher import fisher_traces
from fxq.passes.hutchinson import hutchinson_traces
from fxq.passes.policy import annotate_policy
from fxq.passes.tie_groups import attention_groups
from fxq.ptq import float_graph

ROOT = Path(__file__).resolve().parents[1]


def batches(num_images: int, batch_size: int, size: int, num_classes: int, seed: int = 0) -> list:
    """Random (images, mask, targets) batches: 1–5 boxes per image with labels below ``num_classes``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        targets = []
        for _ in range(n):
            k = int(torch.randint(1, 6, (1,), generator=g))
            centres, sizes = torch.rand(k, 2, generator=g) * 0.6 + 0.2, torch.rand(k, 2, generator=g) * 0.3 + 0.05
            boxes = torch.cat([centres, sizes], 1)
            targets.append({"labels": torch.randint(0, num_classes, (k,), generator=g), "boxes": boxes})
        out.append((torch.randn(n, 3, size, size, generator=g), torch.zeros(n, size, size, dtype=torch.bool), targets))
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain(gm, data, per_image: bool) -> None:
    """Forward + backward of the DETR loss over ``data`` (per batch or one image at a time)."""
    criterion = build_criterion(gm.head, aux=False)
    for images, _, targets in data:
        units = [(images[i:i + 1], [t]) for i, t in enumerate(targets)] if per_image else [(images, targets)]
        for x, t in units:
            gm.zero_grad(set_to_none=True)
            criterion(gm(x), t)["loss"].backward()
    gm.zero_grad(set_to_none=True)


def ilp_rows(gm, args) -> list[dict]:
    rows = []
    ties = attention_groups(gm) if args.tie_qkv else None
    problem = None

    def build():
        nonlocal problem
        problem = build_problem(gm, args.candidates, "avg_bits", tie_groups=ties)

    build_s = timed(build)
    solves = [timed(lambda: problem.solve(args.budget)) for _ in range(args.ilp_repeats)]
    rows.append({"what": f"MILP build ({len(problem.groups)} groups, sensitivities included)", "seconds": build_s,
                 "per_image_ms": None, "vs_plain": None})
    rows.append({"what": f"MILP solve {len(problem.groups)}x{len(problem.candidates)} (median of "
                         f"{args.ilp_repeats})", "seconds": statistics.median(solves), "per_image_ms": None,
                 "vs_plain": None})
    rng = np.random.default_rng(0)
    bits = np.array(sorted(args.candidates), dtype=float)
    numel = rng.integers(1_000, 2_000_000, args.ilp_nodes)
    cost = rng.lognormal(-8, 3, (args.ilp_nodes, 1)) * (2.0 ** (-2 * bits))[None]
    resource = numel[:, None] * bits[None] / numel.sum()
    synth = [timed(lambda: solve_mckp(cost, resource, args.budget)) for _ in range(args.ilp_repeats)]
    rows.append({"what": f"MILP solve random {args.ilp_nodes}x{len(bits)} (median of {args.ilp_repeats})",
                 "seconds": statistics.median(synth), "per_image_ms": None, "vs_plain": None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="detr_tiny")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--candidates", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--budget", type=float, default=5.0, help="avg_bits budget of the MILP rows")
    p.add_argument("--tie-qkv", action="store_true", help="tie q/k/v projections of each attention")
    p.add_argument("--ilp-repeats", type=int, default=5)
    p.add_argument("--ilp-nodes", type=int, default=150, help="nodes of the random MILP instance")
    p.add_argument("--hutchinson-probes", type=int, default=0, help="also time Hutchinson with this many probes")
    p.add_argument("--no-per-sample", action="store_true", help="skip the per-image rows")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gm = float_graph(fxq.models.build(args.model), (args.size, args.size))
    annotate_policy(gm, "W8A8")
    data = batches(args.images, args.batch_size, args.size, gm.num_classes)
    plain(gm, data[:1], per_image=False)  # warm-up
    rows = []

    def add(what: str, seconds: float, base: float | None) -> None:
        rows.append({"what": what, "seconds": seconds, "per_image_ms": 1000 * seconds / args.images,
                     "vs_plain": seconds / base if base else None})
        print(rows[-1], flush=True)

    base = timed(lambda: plain(gm, data, per_image=False))
    add(f"plain fwd+bwd, batches of {args.batch_size}", base, None)
    add(f"Fisher per batch (batches of {args.batch_size})",
        timed(lambda: fisher_traces(gm, data, per_sample=False, progress=False)), base)
    if not args.no_per_sample:
        single = timed(lambda: plain(gm, data, per_image=True))
        add("plain fwd+bwd, one image at a time", single, None)
        add("Fisher per sample", timed(lambda: fisher_traces(gm, data, per_sample=True, progress=False)), single)
    if args.hutchinson_probes:
        add(f"Hutchinson, {args.hutchinson_probes} probes per batch",
            timed(lambda: hutchinson_traces(gm, data, num_probes=args.hutchinson_probes, progress=False)), base)
    rows += ilp_rows(gm, args)
    table = markdown(rows)
    nodes = sum(1 for n in gm.graph.nodes if n.meta.get("fxq.qspec") and n.meta["fxq.role"] in ("conv", "linear"))
    command = "python benchmarks/fisher_ilp_speed.py " + " ".join(sys.argv[1:])
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"fisher_ilp_speed_{args.model}_{args.size}.json")
    write_json(out, {"command": command, "torch": torch.__version__, "threads": args.threads, "model": args.model,
                     "size": args.size, "images": args.images, "allocated_nodes": nodes, "rows": rows})
    print(f"\n`{command}` ({args.model}, {nodes} allocated nodes, {args.threads} threads)\n\n{table}\n\nwrote {out}")


def markdown(rows: list[dict]) -> str:
    lines = ["| what | seconds | per image (ms) | × plain |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        per = f"{r['per_image_ms']:.1f}" if r["per_image_ms"] is not None else ""
        ratio = f"{r['vs_plain']:.2f}" if r["vs_plain"] is not None else ""
        lines.append(f"| {r['what']} | {r['seconds']:.3f} | {per} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
