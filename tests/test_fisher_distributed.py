"""The Fisher analysis and Hutchinson traces under torchrun (2 gloo processes) equal one process's over the
same batches; ``fxq allocate`` under torchrun writes its analysis once.

The per-rank worker is tests/fisher_worker.py; its cases (objectives, per-sample, odd and single batch
counts) run here again in one process as the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fisher_worker import CASES, CLI, graph, nan_batch_error, run_case, train_set

from fxq.cli import main
from fxq.data import write_synthetic

WORKER = Path(__file__).with_name("fisher_worker.py")
NUMERIC = ("overall", "critical", "combined")


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory) -> tuple[Path, dict, dict, str]:
    """The synthetic set, both ranks' results and torchrun's stdout."""
    tmp = tmp_path_factory.mktemp("fisher_ddp")
    write_synthetic(tmp / "synth", seed=1, train=6, val=3, size=64)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp / "synth"), str(tmp / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp / "out" / f"rank{r}.json").read_text()) for r in range(2))
    return tmp, rank0, rank1, proc.stdout


def assert_same_records(got: dict[str, dict], expected: dict[str, dict]) -> None:
    assert got.keys() == expected.keys()
    for name, record in expected.items():
        assert got[name].keys() == record.keys(), name
        for key, value in record.items():
            if key in NUMERIC:
                assert got[name][key] == pytest.approx(value, rel=1e-5, abs=0), (name, key)
            else:
                assert got[name][key] == value, (name, key)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_give_the_single_process_traces(torchrun, case):
    tmp, rank0, rank1, _ = torchrun
    assert rank0[case] == rank1[case]  # every rank ends with the same records
    spec = CASES[case]
    single = run_case(graph(), train_set(tmp / "synth"), spec)
    assert_same_records(rank0[case], single)
    batches = spec.get("num_batches") or -(-6 // spec["batch_size"])
    first = next(iter(rank0[case].values()))
    assert first["batches"] == batches and first["samples"] == min(6, batches * spec["batch_size"])
    keys = {"overall": {"overall"}, "critical": {"critical"}, "combined": set(NUMERIC)}[spec["objective"]]
    assert keys <= first.keys()
    # a share-only result (no reduction, or probes drawn per rank) would not match: the traces are not trivial
    assert sum(r[k] != 0 for r in single.values() for k in keys) > 50


def test_an_error_on_one_rank_is_raised_on_both(torchrun):
    tmp, rank0, rank1, _ = torchrun
    single = nan_batch_error(graph(), train_set(tmp / "synth"))
    assert single is not None and "batch 1" in single and "NaN" in single
    assert rank1["nan_error"] == single  # rank 1 analysed batch 1: its own error
    assert rank0["nan_error"].startswith("rank 1 of 2 failed in the analysis: InputError: ")
    assert single in rank0["nan_error"]


def test_cli_allocate_under_torchrun_writes_once_and_matches_one_process(torchrun, capsys):
    tmp, rank0, rank1, stdout = torchrun
    assert rank0["cli_status"] == rank1["cli_status"] == 0
    assert not (tmp / "out" / "rank1").exists()  # rank 1 writes nothing
    assert stdout.count("avg_bits budget 6") == 1  # the table printed once
    single = tmp / "single.json"
    assert main([*CLI, "--data", str(tmp / "synth"), "--out", str(single)]) == 0
    capsys.readouterr()
    got = json.loads((tmp / "out" / "rank0" / "analysis.json").read_text())
    expected = json.loads(single.read_text())
    fisher = {n: r["fxq.fisher"] for n, r in expected["nodes"].items() if "fxq.fisher" in r}
    assert len(fisher) > 50 and next(iter(fisher.values()))["batches"] == 3
    assert_same_records({n: r["fxq.fisher"] for n, r in got["nodes"].items() if "fxq.fisher" in r}, fisher)
    qspecs = {n: r.get("fxq.qspec") for n, r in expected["nodes"].items()}
    assert {n: r.get("fxq.qspec") for n, r in got["nodes"].items()} == qspecs
