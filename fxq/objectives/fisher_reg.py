"""The Fisher-trace regularizer of FQ-DETR (eq. 12): R = tr(Î_F) ≈ Σ_θ (∂L_F/∂θ)² on the minibatch.

Î_F is the empirical Fisher of the loss it is given — FQ-DETR's L_F, the critical-category loss
(:class:`fxq.objectives.CriticalObjective`); :class:`fxq.objectives.QATLoss` passes L_A when no critical set is
given. The inner gradient is taken with ``create_graph=True``, so R is a differentiable function of θ (double
backprop): ∂R/∂θ = 2·H·g reaches the weights and, through the straight-through fake quantizers, their scales.
(A public reimplementation detaches the inner gradient; its term then sends no gradient at all.)

Parameter set θ: the caller's. The default, :func:`fxq.passes.prepare_qat.quantized_weights`, is the weight
parameters of the fake-quantized conv/linear nodes (whole ``in_proj_weight`` for q/k/v; no biases, no quantizer
scales, no weights of float islands such as the heads). Parameters with ``requires_grad=False`` are skipped;
a parameter the loss does not reach contributes 0.

Weight: λ_t = λ·min(1, step / warmup_steps) (a linear warm-up from 0; λ_t = λ from step 0 when
``warmup_steps`` = 0). While λ_t = 0 the trace is still computed, for logging, without the second-order graph.

Lazy regularization (``every`` = K > 1, StyleGAN2's name for R1 applied every 16 minibatches): the term is
computed only at steps divisible by K, with weight K·λ_t, so its gradient summed over K steps matches
K regularized steps in expectation, at 1/K of the double backward's cost. Steps between return no terms. The
match is exact in expectation for plain SGD only: gradient clipping and Adam's normalisation act per step, so
under them lazy regularization is an approximation whose effect has to be measured (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from fxq.errors import InputError


def fisher_trace(loss: Tensor, params: Iterable[Tensor], create_graph: bool = True) -> Tensor:
    """Σ over ``params`` of the squared gradient of ``loss`` (differentiable when ``create_graph``).

    The graph of ``loss`` is retained, so ``loss`` (or a total containing it) can be backpropagated afterwards.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise InputError("the Fisher trace has no parameter to differentiate (none requires grad); pass the "
                         "weights to regularize, e.g. fxq.passes.prepare_qat.quantized_weights(gm)")
    if not loss.requires_grad:
        raise InputError("the loss of the Fisher trace does not depend on any parameter (no grad_fn); compute "
                         "it from the model's outputs with gradients enabled")
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, retain_graph=True, allow_unused=True)
    used = [g for g in grads if g is not None]
    if not used:
        raise InputError("the loss does not reach any of the Fisher trace's parameters; pass the parameters "
                         "of the graph that produced the loss")
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return sum(g.square().sum() for g in used)
    return _global_trace(used)


def _global_trace(grads: list[Tensor]) -> Tensor:
    """Under torchrun: each rank's ``loss`` is its slice's share of the global minibatch loss, so the global
    gradient is ḡ = mean over ranks of g_r and tr = Σ ḡ². Returned per rank as 2·<g_r, ḡ> − Σ ḡ² (ḡ detached):
    its mean over ranks equals Σ ḡ², and the mean of its gradients (what DDP applies) equals ∂(Σ ḡ²)/∂θ,
    so 2 processes train as 1 process on the whole minibatch."""
    flat = torch.cat([g.detach().reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    mean_grads = flat.split([g.numel() for g in grads])
    inner = sum((g * m.view_as(g)).sum() for g, m in zip(grads, mean_grads, strict=True))
    return 2 * inner - flat.square().sum()


class FisherTraceRegularizer:
    """λ_t·tr(Î_F) over a fixed parameter set, every ``every`` steps; call as ``reg(loss, step) -> dict`` of
    tensors: ``fisher_trace`` (R), ``fisher_lambda`` (the applied weight) and ``loss_fisher`` (what to add to the
    loss)."""

    def __init__(self, params: Mapping[str, Tensor] | Iterable[Tensor], weight: float,
                 warmup_steps: int = 0, every: int = 1) -> None:
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise InputError(f"Fisher-trace weight λ={weight!r} must be a finite number >= 0 (FQ-DETR's "
                             "reimplementation used 1e-3 to 5e-3; 0 turns the regularizer off)")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise InputError(f"warmup_steps={warmup_steps!r} must be an integer >= 0")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"every={every!r} must be an integer >= 1 (1: the regularizer at every step)")
        self.params = list(params.values() if isinstance(params, Mapping) else params)
        if not self.params:
            raise InputError("the Fisher-trace regularizer got an empty parameter set; pass the weights to "
                             "regularize, e.g. fxq.passes.prepare_qat.quantized_weights(gm)")
        self.weight, self.warmup_steps, self.every = float(weight), warmup_steps, every

    def config(self) -> dict:
        """Plain-type settings (for fingerprints and logs)."""
        config = {"weight": self.weight, "warmup_steps": self.warmup_steps,
                  "parameters": sum(p.numel() for p in self.params)}
        if self.every != 1:  # runs made before lazy regularization keep their fingerprint
            config["every"] = self.every
        return config

    def weight_at(self, step: int) -> float:
        """λ_t at optimiser step ``step`` (from 0)."""
        if step < 0:
            raise InputError(f"step={step} must be >= 0")
        if self.warmup_steps == 0:
            return self.weight
        return self.weight * min(1.0, step / self.warmup_steps)

    def __call__(self, loss: Tensor, step: int = 0) -> dict[str, Tensor]:
        """The terms at ``step``; empty at the steps a lazy regularizer skips. ``fisher_lambda`` is the weight
        applied (K·λ_t when lazy)."""
        if step % self.every:
            return {}
        lam = self.weight_at(step) * self.every
        trace = fisher_trace(loss, self.params, create_graph=lam > 0)
        return {"fisher_trace": trace if lam > 0 else trace.detach(),
                "fisher_lambda": torch.tensor(lam, device=trace.device),
                "loss_fisher": lam * trace}
