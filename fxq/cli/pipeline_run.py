"""The stages of ``fxq pipeline``, what each reads and writes, and the run that executes those not yet done.

Stages, in order: ``data`` (a synthetic set when --data is not given), ``model`` (trace; model.json),
``eval_fp32``, ``fisher`` (fisher.json), ``allocate`` (frontier.json, and allocation.json with --budget),
``quantize`` (PTQ, or with --qat-steps an ``fxq qat`` run in OUT/qat that an interrupted pipeline continues;
quantized.pt), ``eval_quant``, ``export`` (both ONNX files, export.json), ``parity``,
``latency`` (unless --latency-runs 0). :mod:`fxq.cli.stages` decides which are done; the in-memory values a
stage needs (the float graph, the loaders, the quantized graph) are built on first use, the quantized graph
from quantized.pt when PTQ itself is done.
"""

from __future__ import annotations

import argparse
import time
from functools import cached_property
from pathlib import Path

from fxq.cli.run_artifacts import (
    ALLOCATION,
    EVAL_FP32,
    EVAL_QUANT,
    EXPORT,
    FISHER,
    FRONTIER,
    LATENCY,
    MODEL,
    ONNX_FP32,
    ONNX_QUANT,
    PARITY,
    QUANT_STATE,
)
from fxq.cli.stages import Stage

DATA = ("data", "seed", "calib_images", "val_images", "size")
#: The QAT run folder inside the pipeline's (an ``fxq qat`` run: checkpoints, log, the trained state).
QAT_RUN = "qat"
#: QAT's batch size (fewer when the training split, the calibration images, has fewer images).
QAT_BATCH = 8


def stage_plan(args: argparse.Namespace) -> list[Stage]:
    """The stages of a run with these options, in run order."""
    synthetic = () if args.data else ("data",)
    allocated = ("allocate",) if args.budget is not None else ()
    qat_options = ("qat_steps", "fisher_reg", "distill", "critical", "seed") if args.qat_steps else ()
    trained = (QAT_RUN,) if args.qat_steps else ()
    stages = [
        Stage("data", DATA, artifacts=synthetic, files=("data",)),
        Stage("model", ("model", "checkpoint", "size"), artifacts=(MODEL,), files=("checkpoint",)),
        Stage("eval_fp32", ("critical",), ("data", "model"), (EVAL_FP32,)),
        Stage("fisher", ("critical",), ("data", "model"), (FISHER,)),
        Stage("allocate", ("policy", "budget", "budget_kind", "latency_table", "objective", "candidates"),
              ("fisher",), (FRONTIER, *((ALLOCATION,) if allocated else ())), files=("latency_table",)),
        Stage("quantize", ("policy", "allocation", "method", "runtime", *qat_options), ("data", "model", *allocated),
              (QUANT_STATE, *trained), files=("allocation",), resumable=trained),
        Stage("eval_quant", ("critical",), ("data", "quantize"), (EVAL_QUANT,)),
        Stage("export", ("runtime",), ("model", "quantize"), (ONNX_FP32, ONNX_QUANT, EXPORT)),
        Stage("parity", ("critical", "threads"), ("data", "quantize", "export"), (PARITY,)),
    ]
    if args.latency_runs:
        stages.append(Stage("latency", ("latency_runs", "threads"), ("export",), (LATENCY,)))
    return stages


class PipelineRun:
    """One invocation's run: the stage functions and the values they share, each built on first use."""

    def __init__(self, args: argparse.Namespace, run_id: str = "") -> None:
        self.args, self.out, self.run_id = args, Path(args.out), run_id
        self.progress = not args.no_progress
        self.runtime = None if args.runtime == "none" else args.runtime

    def check_inputs(self) -> None:
        """InputError, before any stage runs, for critical categories the data set lacks and an allocation
        file made for another model or input size (the float graph is traced to check it)."""
        from fxq.data import resolve_categories
        from fxq.data.synth import synth_categories
        from fxq.passes.precision import annotated_copy

        if self.args.data:
            self.critical  # noqa: B018 - resolving the names is the check
        else:  # the synthetic set's categories are known before it is written
            resolve_categories({"categories": synth_categories()}, self.args.critical)
        if self.args.allocation:
            annotated_copy(self.fgm, None, self.args.allocation)

    # -- shared values ---------------------------------------------------------------------------------------

    @cached_property
    def root(self) -> Path:
        return Path(self.args.data) if self.args.data else self.out / "data"

    @cached_property
    def model(self):
        from fxq.models import build

        return build(self.args.model, checkpoint=self.args.checkpoint)

    @cached_property
    def fgm(self):
        from fxq.ptq import float_graph

        return float_graph(self.model, (self.args.size, self.args.size))

    @cached_property
    def val(self):
        return _loader(self.root, "val", self.args.val_images, self.args.size, 16)

    @cached_property
    def calib(self):
        return _loader(self.root, "train", self.args.calib_images, self.args.size, 8)[0]

    @cached_property
    def critical(self) -> list[int]:
        from fxq.data import resolve_categories

        return resolve_categories(self.val[1].ann_file, self.args.critical)

    @cached_property
    def allocation(self) -> str | None:
        if self.args.budget is not None:
            return str(self.out / ALLOCATION)
        return self.args.allocation

    @cached_property
    def qgm(self):
        import torch

        from fxq.ptq import ptq_structure
        from fxq.qat import load_run

        if self.args.qat_steps:
            return load_run(self.out / QAT_RUN)[1]
        state = torch.load(self.out / QUANT_STATE, map_location="cpu", weights_only=True)
        return ptq_structure(self.fgm, state, self._policy, self.runtime, self.allocation)

    @property
    def _policy(self) -> str | None:
        return None if self.allocation else self.args.policy

    # -- stages ----------------------------------------------------------------------------------------------

    def data(self) -> None:
        from fxq.data import write_synthetic

        a = self.args
        write_synthetic(self.root, seed=a.seed, train=a.calib_images, val=a.val_images, size=a.size, overwrite=True)

    def model_stage(self) -> None:
        from fxq.costs import role_summary
        from fxq.io import write_json

        roles = role_summary(self.fgm)
        write_json(self.out / MODEL, {
            "run_id": self.run_id, "model": self.args.model, "checkpoint": self.args.checkpoint,
            "size": [self.args.size, self.args.size], "parameters": sum(p.numel() for p in self.model.parameters()),
            "macs": sum(r["macs"] for r in roles.values()), "graph_nodes": sum(r["nodes"] for r in roles.values()),
            "roles": roles})

    def eval_fp32(self) -> None:
        self._evaluate(self.out / EVAL_FP32, {"graph": "fp32 (FX graph)", "seconds": 0.0}, self.fgm)

    def fisher(self) -> None:
        from fxq.cli.pipeline_analysis import fisher_stage

        loader = _loader(self.root, "train", self.args.calib_images, self.args.size, 2)[0]
        fisher_stage(self.out, self.fgm, loader, self.critical, self.progress)

    def allocate(self) -> None:
        from fxq.cli.pipeline_analysis import allocate_stage

        a = self.args
        allocate_stage(self.out, self.run_id, self.fgm, {
            "policy": a.policy, "candidates": a.candidates, "budget": a.budget, "budget_kind": a.budget_kind,
            "latency_table": a.latency_table, "objective": a.objective})

    def quantize(self) -> None:
        import torch

        from fxq.io import write_atomic
        from fxq.ptq import quantize_ptq

        start = time.perf_counter()
        if self.args.qat_steps:
            self.qgm = self._qat()
        else:
            self.qgm = quantize_ptq(self.fgm, self.calib, self._policy, self.args.method, progress=self.progress,
                                    target=self.runtime, allocation=self.allocation)
        self.quantize_seconds = round(time.perf_counter() - start, 1)
        write_atomic(self.out / QUANT_STATE, lambda f: torch.save(self.qgm.state_dict(), f), mode="wb")

    def _qat(self):
        """``fxq qat`` on the run's training split into OUT/qat (continuing an interrupted one); the student."""
        from fxq.cli import build_parser
        from fxq.cli.qat import run as run_qat
        from fxq.qat import load_run

        a, folder = self.args, self.out / QAT_RUN
        argv = ["qat", a.model, "--data", str(self.root), "--out", str(folder), "--size", str(a.size),
                "--steps", str(a.qat_steps), "--calib-images", str(a.calib_images), "--init", a.method,
                "--batch-size", str(min(QAT_BATCH, a.calib_images)), "--epochs", str(a.qat_steps),  # --steps ends it
                "--seed", str(a.seed), "--fisher-reg", str(a.fisher_reg), "--distill", a.distill,
                "--critical", *a.critical, *(["--allocation", self.allocation] if self.allocation else
                                             ["--policy", a.policy]),
                *(["--runtime", self.runtime] if self.runtime else []),
                *(["--checkpoint", a.checkpoint] if a.checkpoint else []),
                *(["--resume"] if (folder / "checkpoint.pt").is_file() else []),
                *([] if self.progress else ["--no-progress"])]
        run_qat(build_parser().parse_args(argv))
        return load_run(folder)[1]

    def eval_quant(self) -> None:
        from fxq.roles import quantizer_nodes

        a = self.args
        precision = (f"{a.budget_kind}≤{a.budget:g}" if a.budget is not None
                     else "allocation" if a.allocation else a.policy)
        how = f"QAT {a.qat_steps} steps" if a.qat_steps else a.method
        record = {"graph": f"{precision} {how}", "seconds": getattr(self, "quantize_seconds", None),
                  "policy": a.policy, "method": a.method, "allocation": self.allocation, "runtime": self.runtime,
                  "quantizers": len(quantizer_nodes(self.qgm))}
        self._evaluate(self.out / EVAL_QUANT, record, self.qgm)

    def export(self) -> None:
        from fxq.cli.pipeline_deploy import export_stage

        export_stage(self.out, self.run_id, self.fgm, self.qgm, self.args.size, self.runtime)

    def parity(self) -> None:
        from fxq.cli.pipeline_deploy import parity_stage

        loader, dataset = self.val
        parity_stage(self.out, self.run_id, self.qgm, loader, dataset, self.critical, self.args.threads,
                     self.progress)

    def latency(self) -> None:
        from fxq.cli.pipeline_deploy import latency_stage

        latency_stage(self.out, self.run_id, self.args.size, self.args.latency_runs, self.args.threads)

    def stage(self, name: str):
        """The function that runs stage ``name``."""
        return self.model_stage if name == "model" else getattr(self, name)

    def _evaluate(self, path: Path, record: dict, gm) -> None:
        from fxq.cli.run_artifacts import write_eval
        from fxq.evaluation import evaluate_model

        loader, dataset = self.val
        start = time.perf_counter()
        metrics = evaluate_model(gm, loader, dataset.coco, critical_ids=self.critical, progress=self.progress)
        write_eval(path.parent, path.name, {"run_id": self.run_id, **record,
                                            "eval_seconds": round(time.perf_counter() - start, 1)}, metrics)


def _loader(root: Path, split: str, images: int, size: int, batch_size: int):
    from torch.utils.data import DataLoader, Subset

    from fxq.data import CocoDetection, collate, eval_transforms

    ds = CocoDetection.from_folder(root, split, transforms=eval_transforms(size))
    return DataLoader(Subset(ds, range(min(images, len(ds)))), batch_size=batch_size, collate_fn=collate), ds
