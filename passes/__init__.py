"""Graph passes (imported as ``fxq.passes``): analysis passes write ``node.meta``, transform passes rewrite.

Each pass is ``pass(gm, ...) -> PassResult`` and states in its module docstring the ``node.meta`` keys it
reads and writes.
"""

from fxq.passes.calibrate import calibrate
from fxq.passes.detptq import detptq
from fxq.passes.fold_bn import fold_batchnorm
from fxq.passes.insert_quant import insert_quantizers, quantizers
from fxq.passes.pass_manager import PassError, PassManager, PassResult
from fxq.passes.policy import DEFAULT_OVERRIDES, annotate_policy, quantizable_nodes
from fxq.passes.prepare_qat import keep_qparams_valid, prepare_qat, qat_structure, quantized_weights
from fxq.passes.remove_dropout import remove_dropout
from fxq.passes.runtime_prep import insert_output_quantizers, quantize_biases

__all__ = [
    "DEFAULT_OVERRIDES",
    "PassError",
    "PassManager",
    "PassResult",
    "annotate_policy",
    "calibrate",
    "detptq",
    "fold_batchnorm",
    "insert_output_quantizers",
    "insert_quantizers",
    "keep_qparams_valid",
    "prepare_qat",
    "qat_structure",
    "quantizable_nodes",
    "quantize_biases",
    "quantized_weights",
    "quantizers",
    "remove_dropout",
]
