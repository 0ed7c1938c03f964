"""Quantization IR building blocks: QSpec, the ONNX-exact fake quantizer, calibration observers."""

from fxq.quant.calibration import (
    clip_ratios,
    lp_error,
    lsq_init_scale,
    minmax_qparams,
    mse_error,
    percentile_range,
    search_clip_qparams,
)
from fxq.quant.fake_quant import FakeQuantizer, QuantMode
from fxq.quant.numerics import SUPPORTED_BITS, IntRange, channel_view, fake_quantize, round_ste
from fxq.quant.observers import (
    ClipSearchObserver,
    LSQInitObserver,
    MinMaxObserver,
    Observer,
    PercentileObserver,
    make_observer,
    observer_fields,
    parse_method,
)
from fxq.quant.policy_strings import format_policy, parse_policy
from fxq.quant.qspec import QSpec
from fxq.quant.statistics import Reservoir, RunningAbsMean, RunningMinMax

__all__ = [
    "SUPPORTED_BITS",
    "ClipSearchObserver",
    "FakeQuantizer",
    "IntRange",
    "LSQInitObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QSpec",
    "QuantMode",
    "Reservoir",
    "RunningAbsMean",
    "RunningMinMax",
    "channel_view",
    "clip_ratios",
    "fake_quantize",
    "format_policy",
    "lp_error",
    "lsq_init_scale",
    "make_observer",
    "minmax_qparams",
    "mse_error",
    "observer_fields",
    "parse_method",
    "parse_policy",
    "percentile_range",
    "round_ste",
    "search_clip_qparams",
]
