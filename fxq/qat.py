"""Quantization-aware training of a traced detector: the recipe, the student/teacher pair and its objective.

A :class:`QATRecipe` names everything that fixes the quantized graph's structure (model, precision, initial
calibration, input size, target runtime); :func:`student_and_teacher` builds the float teacher
(:func:`fxq.ptq.float_graph`) and the student (:func:`fxq.passes.prepare_qat.prepare_qat` of it), and
:func:`rebuild_student` makes the same student again from a saved state_dict without calibrating, which is how
``fxq eval --qat`` and ``fxq export --qat`` read a finished run.

:class:`QATModule` is what the trainer trains: the student's forward, with the teacher's outputs on the same
images under ``"teacher"`` when distilling; the teacher is not a submodule (not in the state_dict, never
trained). :class:`QATCriterion` adapts :class:`fxq.objectives.QATLoss` to the trainer (it takes the step, for
the regularizer's warm-up). Observers stay off: every quantizer is in "quantize" mode for the whole run, but
for the encoder's and decoder's during a float stage (``float_stage`` steps; Q-DETR's two-stage schedule,
:class:`fxq.passes.float_stage.FloatStage`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from fxq.errors import InputError
from fxq.objectives import QATLoss
from fxq.tracing import DetectorGraph

TEACHER_KEY = "teacher"


@dataclass(frozen=True)
class QATRecipe:
    """What fixes a QAT student's graph: the model, its precision (a uniform ``policy`` or an ``allocation``
    file), the initial calibration method (``init``; None = the policy's default), the square input ``size``
    the graph is traced at, whether affine zero-points learn, the ``target`` runtime (None = plain QDQ) and
    whether Q-DETR's distribution alignment sits on the decoder's queries (``align_queries``; DRD)."""

    model: str
    policy: str | None = "4-4-8"
    allocation: str | None = None
    init: str | None = None
    size: int = 160
    learn_zero_point: bool = True
    target: str | None = None
    align_queries: bool = False

    def __post_init__(self) -> None:
        if (self.policy is None) == (self.allocation is None):
            raise InputError("a QAT recipe needs exactly one of policy (e.g. '4-4-8') and allocation (a file "
                             "written by fxq allocate --out)")
        if self.size < 32:
            raise InputError(f"size {self.size} is too small: DETR backbones downsample by 32, use at least 32")

    def to_dict(self) -> dict:
        """Plain-type fields (for config.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> QATRecipe:
        """The recipe of a ``to_dict`` result; InputError naming unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"QAT recipe keys {unknown} are unknown; the keys are {sorted(known)}")
        return cls(**values)


def teacher_graph(recipe: QATRecipe, checkpoint: str | None = None) -> DetectorGraph:
    """The float graph of the recipe's model (embedded weights unless ``checkpoint``): the QAT teacher."""
    from fxq.models import build
    from fxq.ptq import float_graph

    return float_graph(build(recipe.model, checkpoint=checkpoint, seed=0), (recipe.size, recipe.size))


def student_and_teacher(recipe: QATRecipe, calib: Iterable, checkpoint: str | None = None,
                        progress: bool = False) -> tuple[DetectorGraph, DetectorGraph, dict]:
    """(student, teacher, prepare_qat's info): the student calibrated on ``calib`` with learnable quantizers."""
    from fxq.passes.distribution_alignment import align_queries
    from fxq.passes.prepare_qat import prepare_qat
    from fxq.tracing import model_batch

    teacher = teacher_graph(recipe, checkpoint)
    result = prepare_qat(teacher, calib, recipe.policy, allocation=recipe.allocation, init=recipe.init,
                         learn_zero_point=recipe.learn_zero_point, target=recipe.target, progress=progress)
    if recipe.align_queries:
        result.info["aligned"] = align_queries(result.gm, model_batch(result.gm, next(iter(calib))).inputs)
    return result.gm, teacher, result.info


def rebuild_student(recipe: QATRecipe, state: Mapping[str, Tensor], init: str) -> DetectorGraph:
    """The student of ``recipe`` with the trained ``state`` (weights, scales, zero-points) loaded strictly."""
    from fxq.passes.distribution_alignment import PREFIX, align_queries
    from fxq.passes.prepare_qat import qat_structure

    aligned = {k: v for k, v in state.items() if k.startswith(PREFIX)}
    if aligned and not recipe.align_queries:
        raise InputError(f"the state holds distribution-alignment weights ({sorted(aligned)[0]}, ...) but the "
                         "recipe has align_queries=False: it comes from another run's config.json")
    gm = qat_structure(teacher_graph(recipe), {k: v for k, v in state.items() if k not in aligned}, recipe.policy,
                       allocation=recipe.allocation, init=init, learn_zero_point=recipe.learn_zero_point,
                       target=recipe.target)
    if recipe.align_queries:
        align_queries(gm)
        gm.load_state_dict(state, strict=True)
    return gm


class QATModule(nn.Module):
    """What the trainer trains: the student graph, plus the float teacher's outputs under ``"teacher"`` when
    ``teacher`` is given.

    In training mode with ``train_outputs`` (DRD, attention distillation) or ``query_groups`` > 1 (AQ-DETR's
    auxiliary queries) it runs the student's training graph (:func:`fxq.passes.training_graph.training_graph`:
    the same parameters, intermediate outputs, auxiliary groups), and the teacher's training graph alike; in
    eval mode it is the student. The auxiliary queries, ``group_query_embed``, start as copies of the trained
    queries plus Gaussian noise of 0.1 × their standard deviation (``seed``), and are not part of the student.
    """

    def __init__(self, student: DetectorGraph, teacher: DetectorGraph | None = None, *,
                 train_outputs: bool = False, query_groups: int = 1, seed: int = 0) -> None:
        from fxq.passes.training_graph import training_graph

        super().__init__()
        self.student, self.query_groups = student, query_groups
        views = train_outputs or query_groups > 1
        if query_groups > 1:
            self.group_query_embed = nn.Parameter(_auxiliary_queries(student, query_groups, seed))
        self._train_graph = (training_graph(student, query_groups=query_groups,
                                            group_embed=getattr(self, "group_query_embed", None)),) if views else None
        teacher = None if teacher is None else copy.deepcopy(teacher).eval().requires_grad_(False)
        self._teacher = None if teacher is None else (training_graph(teacher) if train_outputs else teacher,)

    @property
    def takes_mask(self) -> bool:
        """Whether the student's forward takes a padding mask (as the DetectorGraph it wraps)."""
        return self.student.takes_mask

    @property
    def teacher(self) -> DetectorGraph | None:
        """The float teacher (not a submodule: never trained, not saved)."""
        return None if self._teacher is None else self._teacher[0]

    def _apply(self, fn, recurse: bool = True):
        for held in (self._teacher, self._train_graph):
            if held is not None:
                held[0]._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, *inputs: Tensor) -> dict:
        from fxq.passes.training_graph import split_query_groups

        if self.training and self._train_graph is not None:
            outputs = split_query_groups(self._train_graph[0](*inputs), self.student.num_queries, self.query_groups)
        else:
            outputs = dict(self.student(*inputs))
        if self.teacher is not None:
            with torch.no_grad():
                outputs[TEACHER_KEY] = self.teacher(*inputs)
        return outputs


def _auxiliary_queries(student: DetectorGraph, groups: int, seed: int) -> Tensor:
    queries = student.get_parameter("query_embed.weight").detach()
    generator = torch.Generator().manual_seed(seed)
    copies = queries.repeat(groups - 1, 1)
    return copies + 0.1 * queries.std() * torch.randn(copies.shape, generator=generator).to(copies)


class QATCriterion:
    """The trainer's criterion for a :class:`QATModule`: ``crit(outputs, targets, step) -> dict`` of
    :class:`fxq.objectives.QATLoss` terms (the teacher's outputs are taken from ``outputs["teacher"]``)."""

    takes_step = True

    def __init__(self, loss: QATLoss) -> None:
        self.loss = loss

    def config(self) -> dict:
        """Plain-type settings (for the run fingerprint)."""
        return self.loss.config()

    def __call__(self, outputs: Mapping, targets: list[dict], step: int = 0) -> dict[str, Tensor]:
        student = {k: v for k, v in outputs.items() if k != TEACHER_KEY}
        return self.loss(student, targets, outputs.get(TEACHER_KEY), step=step)


class _OverallWithCritical:
    """The detection loss L_A for training, with L_F (``loss_critical``) alongside for the regularizer."""

    def __init__(self, critical) -> None:
        self.critical = critical

    def config(self) -> dict:
        return {"train_on": "loss_all", "critical_ids": list(self.critical.critical_ids)}

    def __call__(self, outputs: Mapping, targets: list[dict]) -> dict[str, Tensor]:
        terms = self.critical(outputs, targets)
        return {**terms, "loss": terms["loss_all"]}


def qat_loss(student: DetectorGraph, options: Mapping, critical_ids: list[int] | None) -> QATLoss:
    """L_A (+ the ``distill`` terms: KD, DRD, attention distillation) (+ λ·tr(Î_F) of L_F over the quantized
    conv/linear weights) for ``options``."""
    from fxq.objectives import CriticalObjective, build_criterion
    from fxq.objectives.attention_distill import AttentionDistillation
    from fxq.objectives.distill import DEFAULT_WEIGHTS, Distillation
    from fxq.objectives.drd import TAU, RectificationDistillation
    from fxq.objectives.fisher_reg import FisherTraceRegularizer
    from fxq.passes.prepare_qat import quantized_weights

    coef = options.get("cls_loss_coef")
    criterion = build_criterion(student.head, aux=False, weights={} if coef is None else {"loss_ce": coef})
    detection = criterion
    regularizer = None
    if options.get("fisher_reg", 0) > 0:
        critical = CriticalObjective(criterion, critical_ids, options.get("alpha", 1.0),
                                     num_classes=student.num_classes)
        detection = _OverallWithCritical(critical)
        regularizer = FisherTraceRegularizer(quantized_weights(student), options["fisher_reg"],
                                             options.get("fisher_warmup", 0), options.get("fisher_every", 1))
    methods = distill_methods(options.get("distill"))
    terms = []
    if "kd" in methods:
        scale = options.get("kd_weight", 1.0)
        terms.append(Distillation(student.head, {k: scale * w for k, w in DEFAULT_WEIGHTS.items()},
                                  boxes=options.get("kd_boxes", "foreground")))
    if "drd" in methods:
        terms.append(RectificationDistillation(options.get("drd_weight", DRD_WEIGHT), options.get("drd_tau", TAU)))
    if "aq" in methods:
        terms.append(AttentionDistillation(options.get("aq_weight", 1.0)))
    return QATLoss(detection, terms, regularizer)


#: The distillation methods ``--distill`` composes with "+": class/box KD, Q-DETR's DRD, AQ-DETR's auxiliary
#: queries with encoder attention distillation.
DISTILL_METHODS = ("kd", "drd", "aq")
#: λ_DRD: Q-DETR's unofficial code trains on 0.5·(L_GT + 3·L_DRD).
DRD_WEIGHT = 3.0


def distill_methods(spec: str | None) -> tuple[str, ...]:
    """The methods of a ``--distill`` value ("none", "kd", "drd+aq", ...), in DISTILL_METHODS order."""
    if spec in (None, "", "none"):
        return ()
    names = spec.split("+")
    unknown = [n for n in names if n not in DISTILL_METHODS]
    if unknown or len(set(names)) != len(names):
        raise InputError(f"--distill {spec!r}: {'unknown ' + str(unknown) if unknown else 'a repeated method'}; "
                         f"use none or methods of {list(DISTILL_METHODS)} joined by '+' (e.g. drd+aq)")
    return tuple(m for m in DISTILL_METHODS if m in names)


def trained_cls_loss_coef(model: str) -> float | None:
    """The ``--cls-loss-coef`` the embedded weights of ``model`` were trained with (None: the default)."""
    import json
    import shlex

    from fxq.models.embedded import embedded_weights

    path = embedded_weights(model)
    record = path.with_suffix(".json") if path is not None else None
    if record is None or not record.is_file():
        return None
    words = shlex.split(json.loads(record.read_text()).get("command", ""))
    if "--cls-loss-coef" not in words:
        return None
    return float(words[words.index("--cls-loss-coef") + 1])


def train_qat(recipe: QATRecipe, train_set, val_set, options: Mapping, out: Path, *, calib_set=None,
              resume: bool = False, checkpoint: str | None = None, argv: Mapping | None = None) -> dict | None:
    """Prepare the student, fine-tune it (resumable; torchrun-aware), then on rank 0 write ``qat_model.pt`` and
    ``eval.json``; returns {"eval", "minutes"} when the run is complete on rank 0, else None.

    ``calib_set`` (default ``train_set``) gives the first ``options["calib_images"]`` images of the initial
    calibration; ``options`` holds the ``fxq qat`` options (see :mod:`fxq.cli.qat`)."""
    import time

    from fxq.data import collate
    from fxq.evaluation import evaluate_model
    from fxq.io import write_atomic, write_json
    from fxq.passes.float_stage import FloatStage
    from fxq.passes.prepare_qat import keep_qparams_valid
    from fxq.train.distributed import init_distributed
    from fxq.train.trainer import Trainer

    critical = _critical_ids(train_set, options.get("critical"))
    start = time.perf_counter()
    calib = _calib_loader(calib_set or train_set, options["calib_images"])
    student, teacher, info = student_and_teacher(recipe, calib, checkpoint, progress=False)
    methods = distill_methods(options.get("distill"))
    groups = 1 + options.get("aux_groups", 1) if "aq" in methods else 1
    module = QATModule(student, teacher if methods else None, train_outputs=bool({"drd", "aq"} & set(methods)),
                       query_groups=groups, seed=options["seed"])
    criterion = QATCriterion(qat_loss(student, _with_coef(options, recipe.model), critical))
    stage = FloatStage(student, options["float_stage"]) if options.get("float_stage") else None
    trainer = Trainer(module, criterion, train_set, _train_config(options), out, collate, init_distributed(),
                      before_step=stage)
    keep_qparams_valid(student, trainer.optimizer)
    trainer.restore(resume)  # a changed configuration fails here, before anything is written
    if trainer.info.is_main:
        write_json(out / "config.json", {"recipe": recipe.to_dict(), "init": info["init"], "prepare": info,
                                         "options": dict(options), "argv": dict(argv or {})})
    result = trainer.fit()
    if result.step < trainer.total_steps or not trainer.info.is_main:
        return None
    if stage is not None:
        stage.quantize_all()  # the saved student quantizes everything, however long the float stage was
    student.eval()
    write_atomic(out / "qat_model.pt", lambda f: torch.save(student.state_dict(), f), mode="wb")
    loader = torch.utils.data.DataLoader(val_set, batch_size=16, collate_fn=collate)
    metrics = evaluate_model(student, loader, val_set.coco, critical_ids=critical,
                             progress=not options.get("no_progress", False))
    metrics.pop("detections", None)
    write_json(out / "eval.json", metrics)
    return {"eval": metrics, "minutes": (time.perf_counter() - start) / 60}


def _with_coef(options: Mapping, model: str) -> dict:
    coef = options.get("cls_loss_coef")
    return {**options, "cls_loss_coef": trained_cls_loss_coef(model) if coef is None else coef}


def _critical_ids(dataset, names) -> list[int] | None:
    from fxq.data import resolve_categories

    return resolve_categories(dataset.ann_file, names) if names else None


def _calib_loader(dataset, images: int):
    from torch.utils.data import DataLoader, Subset

    from fxq.data import collate

    if images > len(dataset):
        raise InputError(f"{images} calibration images asked for, the set has {len(dataset)}; lower "
                         "--calib-images")
    return DataLoader(Subset(dataset, range(images)), batch_size=8, collate_fn=collate)


def _train_config(options: Mapping):
    from fxq.train import TrainConfig

    lr = options["lr"]
    return TrainConfig(epochs=options["epochs"], max_steps=options.get("steps"), batch_size=options["batch_size"],
                       lr=lr,
                       lr_backbone=lr if options.get("lr_backbone") is None else options["lr_backbone"],
                       lr_quant=options["lr_quant"], weight_decay=options["weight_decay"],
                       clip_max_norm=options["clip"], schedule=options["schedule"],
                       warmup_steps=options["warmup"], seed=options["seed"], ckpt_every=options["ckpt_every"],
                       stop_after=options.get("stop_after"), progress=not options.get("no_progress", False))


def load_run(run: str | Path) -> tuple[QATRecipe, DetectorGraph]:
    """The recipe and the trained student of a finished ``fxq qat`` run folder (``config.json`` +
    ``qat_model.pt``, loaded with ``weights_only=True``); InputError naming a missing file."""
    import json

    run = Path(run)
    config, weights = run / "config.json", run / "qat_model.pt"
    for path, why in ((config, "it is not an fxq qat run folder"), (weights, "the run has not finished")):
        if not path.is_file():
            raise InputError(f"{path} does not exist: {why}; pass the --out folder of a finished fxq qat run "
                             "(an unfinished one continues with fxq qat ... --resume)")
    record = json.loads(config.read_text())
    recipe = QATRecipe.from_dict(record["recipe"])
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{weights} is not a readable state_dict ({exc}); rerun the QAT run") from exc
    return recipe, rebuild_student(recipe, state, record["init"]).eval()
