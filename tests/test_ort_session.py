"""onnxruntime sessions over lowered detectors: DETR / Deformable DETR parity with the fake-quant graph on real
images, dynamic input sizes, and the session's errors.

Measured (random weights, COCO fixture images resized to 160–256 px, ORT 1.32 CPU, "all" optimizations):
per-quantizer numerics are exact; float reassociation in conv/matmul flips a few rounding decisions that
propagate, giving max |Δ logits| 0.018 (DETR, |logits| ≤ 1.7) and 0.052 (Deformable DETR, |logits| ≤ 5.9),
max |Δ boxes| ≤ 7e-4 (Deformable DETR's boxes are exact: its last box layer is zero-initialised), top-10
detections with the same labels, boxes within 0.85 px and scores within 1.1e-3; at most one near-tie swaps at
the top-10 boundary. The bounds below leave about 2× margin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA
from detections import TOP_K, assert_same_detections

import fxq
from fxq.backends import OrtSession, available_providers, lower_to_onnx
from fxq.data import CocoDetection, collate, eval_transforms
from fxq.evaluation import postprocess
from fxq.passes.calibrate import calibrate
from fxq.passes.fold_bn import fold_batchnorm
from fxq.passes.insert_quant import insert_quantizers
from fxq.passes.policy import annotate_policy
from fxq.passes.remove_dropout import remove_dropout

# Bounds for randomly initialised tiny models (about twice the differences measured on them): the detector
# tests pin pretrained=False. Trained weights give larger logits and larger float-reassociation differences.
LOGIT_BOUND = {"detr_tiny": 0.05, "deformable_detr_tiny": 0.1}
BOX_BOUND = 2e-3  # normalised (cx, cy, w, h)
HEADS = {"detr_tiny": "softmax", "deformable_detr_tiny": "sigmoid"}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = CocoDetection.from_folder(DATA / "coco-val2017-fixture", transforms=eval_transforms(160, 256))
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate)
    it = iter(loader)
    return [(images, torch.stack([t["orig_size"] for t in targets])) for images, _, targets in
            (next(it), next(it))]


@pytest.fixture(scope="module")
def batches():
    return _batches()


@pytest.fixture(scope="module", params=[("detr_tiny", "W8A8"), ("detr_tiny", "W4A8"),
                                        ("deformable_detr_tiny", "W8A8"), ("deformable_detr_tiny", "W4A8")],
                ids=lambda p: "-".join(p))
def lowered(request, batches, tmp_path_factory):
    """(name, calibrated graph, ONNX path, report) for one model and policy; calibrated on the first batch."""
    name, policy = request.param
    torch.manual_seed(0)
    gm = fxq.trace(fxq.models.build(name, pretrained=False).eval(), torch.randn(1, 3, 160, 160))
    remove_dropout(gm)
    fold_batchnorm(gm)
    annotate_policy(gm, policy)
    insert_quantizers(gm)
    calibrate(gm, [batches[0][0]], progress=False)
    path = tmp_path_factory.mktemp(name) / f"{name}-{policy}.onnx"
    report = lower_to_onnx(gm, torch.randn(1, 3, 160, 160), path)
    return name, gm, path, report


def test_detector_parity_on_real_images(lowered, batches):
    name, gm, path, _ = lowered
    session = OrtSession(path, threads=1)
    images, sizes = batches[1]  # not the calibration batch; padded, so H×W differs from the export's 160×160
    with torch.no_grad():
        ref = gm(images)
    got = session.run(images)
    assert set(got) == {"pred_logits", "pred_boxes"}
    assert (got["pred_logits"] - ref["pred_logits"]).abs().max() <= LOGIT_BOUND[name]
    assert (got["pred_boxes"] - ref["pred_boxes"]).abs().max() <= BOX_BOUND
    head = HEADS[name]
    for r, g in zip(postprocess(ref, sizes, head, TOP_K), postprocess(got, sizes, head, TOP_K), strict=True):
        assert_same_detections(r, g)


def test_detector_runs_at_other_sizes_and_batches(lowered):
    name, gm, path, _ = lowered
    session = OrtSession(path, threads=1)
    for shape in [(1, 3, 96, 128), (3, 3, 224, 160)]:
        images = torch.randn(shape)
        with torch.no_grad():
            ref = gm(images)
        got = session.run(images)
        assert got["pred_logits"].shape == ref["pred_logits"].shape
        assert (got["pred_boxes"] - ref["pred_boxes"]).abs().max() <= BOX_BOUND * 5


def test_detector_report(lowered):
    name, gm, path, report = lowered
    weights = sum(n.meta.get("fxq.quantizer", {}).get("kind") == "weight" for n in gm.graph.nodes)
    activations = sum(n.meta.get("fxq.quantizer", {}).get("kind") in ("activation", "attention")
                      for n in gm.graph.nodes)
    assert sum(report.weights.values()) == weights and sum(report.qdq_pairs.values()) == activations
    assert set(report.weights) <= {"int8", "int4"}
    assert report.file_bytes == path.stat().st_size
    assert report.float_bytes > 3 * report.file_bytes  # int8 weights: ~3.5× smaller; int4: ~6×


# -- the session's errors ----------------------------------------------------------------------------------


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a protobuf")
    with pytest.raises(fxq.InputError, match="is not an ONNX model") as err:
        OrtSession(bad)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(fxq.InputError, match="does not exist"):
        OrtSession(tmp_path / "nothing.onnx")


@pytest.mark.parametrize("provider", ["cuda", "tensorrt", "no-such-provider"])
def test_missing_provider_lists_the_available_ones(tmp_path, provider):
    if provider in available_providers():
        pytest.skip(f"{provider} is installed here")
    with pytest.raises(fxq.InputError, match=r"not available.*available: cpu\b.*provider='cpu'"):
        OrtSession(tmp_path / "any.onnx", provider=provider)


@pytest.mark.parametrize("kwargs, message", [({"threads": 0}, "threads=0"), ({"optimization": "max"}, "max")])
def test_bad_session_options(tmp_path, kwargs, message):
    with pytest.raises(fxq.InputError, match=message):
        OrtSession(tmp_path / "any.onnx", **kwargs)


def test_run_needs_a_batched_image_tensor(lowered):
    _, _, path, _ = lowered
    session = OrtSession(path, threads=1)
    with pytest.raises(fxq.InputError, match=r"\[B, 3, H, W\]"):
        session.run(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(fxq.InputError, match="could not run"):
        session.run(torch.zeros(1, 4, 64, 64))


@pytest.mark.parametrize("flags, machine, expected", [
    ("fpu sse2 avx2 fma", "x86_64", True),  # AVX2 without VNNI: u8×s8 pair sums saturate
    ("fpu avx2 avx512f avx512_vnni", "x86_64", False),
    ("fpu avx2 avx_vnni", "AMD64", False),
    ("fp asimd", "aarch64", False),  # the option is x86-only
])
def test_the_exact_int8_option_is_set_only_on_x86_cpus_without_vnni(flags, machine, expected):
    from fxq.backends.session import EXACT_INT8_OPTION, needs_exact_int8, session_options

    cpuinfo = f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert needs_exact_int8(cpuinfo, machine) is expected
    forced = session_options(exact_int8=True).get_session_config_entry(EXACT_INT8_OPTION)
    auto = session_options().get_session_config_entry(EXACT_INT8_OPTION)
    assert forced == "1" and auto == ("1" if needs_exact_int8() else "0")
