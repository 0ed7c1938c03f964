"""``fxq inspect MODEL``: trace a model and print its per-role node counts, parameters and MACs."""

from __future__ import annotations

import argparse

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="trace a model and print per-role nodes, parameters and MACs",
                       description="Trace MODEL at batch 1 and print per-role node counts, parameters and MACs.")
    p.add_argument("model", help="model name (see `fxq inspect --list`)", nargs="?")
    p.add_argument("--size", nargs=2, type=int, default=(512, 512), metavar=("H", "W"), help="input size")
    p.add_argument("--checkpoint", help="weights to load (official {'model': ...} file or plain state_dict)")
    p.add_argument("--json", help="also write the table as JSON to this file")
    p.add_argument("--list", action="store_true", help="list the known model names and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fxq.costs import format_summary, role_summary
    from fxq.errors import InputError
    from fxq.io import write_json
    from fxq.models import build, model_names
    from fxq.tracing import trace

    if args.list or args.model is None:
        print("\n".join(model_names()))
        return 0
    h, w = args.size
    if h < 32 or w < 32:
        raise InputError(f"--size {h} {w} is too small: DETR backbones downsample by 32, use at least 32 32")
    from fxq.cli.checks import check_checkpoint, check_output_file

    check_checkpoint(args.checkpoint)
    check_output_file(args.json, "--json")
    model = build(args.model, checkpoint=args.checkpoint)
    gm = trace(model, torch.zeros(1, 3, h, w))
    summary = role_summary(gm)
    print(format_summary(summary, f"{args.model} at 1x3x{h}x{w}"))
    if args.json:
        write_json(args.json, {"model": args.model, "size": [h, w], "roles": summary})
    return 0
