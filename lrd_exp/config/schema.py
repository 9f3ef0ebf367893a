"""Typed config schemas: a wrong enum value fails at composition, naming the key and the allowed values.

The YAML files in ``conf/`` fill these structures; OmegaConf checks types and enums when Hydra composes.
Range checks that types cannot express live in :mod:`lrd_exp.config.validate` and run before any work.
The enums are built from :mod:`lrd_exp.config.values`, the one list of allowed values the library checks too;
Hydra is imported only to register the schemas (:func:`register_configs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from lrd_exp.config.rank_settings import DEFAULTS as D
from lrd_exp.config.values import (
    ACCELERATORS,
    ADVISE_SPEEDS,
    ALLOCATIONS,
    BASES,
    BN_MODES,
    BUDGET_MEASURES,
    BUDGETS,
    CALIBRATES,
    CROP_MODES,
    DAMAGE_METHODS,
    FACTOR_POSITIONS,
    FITS,
    FREEZE_KINDS,
    FREEZE_UNITS,
    IMPORTANCES,
    INTERPOLATIONS,
    LR_SCHEDULES,
    MALLOC_MODES,
    OBJECTIVES,
    OPTIMIZERS,
    POLICIES,
    PRECISION_ALIASES,
    PRECISIONS,
    ROUNDINGS,
    TASKS,
    WANDB_MODES,
)

# re-exported: lrd_exp.tasks reads them here, beside the enums (new code imports lrd_exp.config.values)
from lrd_exp.config.values import MEASURED_IMPORTANCES as MEASURED_IMPORTANCES
from lrd_exp.config.values import canonical_precision as canonical_precision
from lrd_exp.config.values import enum_value as enum_value


def _choices(name: str, values: Sequence[str]) -> Any:
    """A str enum whose members are ``values`` (OmegaConf checks a typed key against it at composition)."""
    return Enum(name, {v: v for v in values}, type=str, module=__name__)


RankPolicy = _choices("RankPolicy", POLICIES)
Rounding = _choices("Rounding", ROUNDINGS)
RankBase = _choices("RankBase", BASES)
RankBudget = _choices("RankBudget", BUDGETS)
RankAllocation = _choices("RankAllocation", ALLOCATIONS)
BudgetMeasure = _choices("BudgetMeasure", BUDGET_MEASURES)
DamageMethod = _choices("DamageMethod", DAMAGE_METHODS)
RankFit = _choices("RankFit", FITS)
Calibrate = _choices("Calibrate", CALIBRATES)
Objective = _choices("Objective", OBJECTIVES)
FreezeKind = _choices("FreezeKind", FREEZE_KINDS)  # freeze.schedule (the scheduler is lrd_exp.FreezeSchedule)
FreezeUnit = _choices("FreezeUnit", FREEZE_UNITS)
Importance = _choices("Importance", IMPORTANCES)
Task = _choices("Task", TASKS)
WandbMode = _choices("WandbMode", WANDB_MODES)
AdviseSpeed = _choices("AdviseSpeed", ADVISE_SPEEDS)
Accelerator = _choices("Accelerator", ACCELERATORS)
MallocMode = _choices("MallocMode", MALLOC_MODES)
OptimizerName = _choices("OptimizerName", OPTIMIZERS)
LRSchedule = _choices("LRSchedule", LR_SCHEDULES)
CropMode = _choices("CropMode", CROP_MODES)
Interpolation = _choices("Interpolation", INTERPOLATIONS)
BNMode = _choices("BNMode", BN_MODES)


class _NamedByValue(str, Enum):
    """An enum whose names are its values ("32-true"), also found from an int (``trainer.precision=32``)."""

    @classmethod
    def _missing_(cls, value: Any) -> Any:
        return cls.__members__.get(str(value))


Precision = _NamedByValue("Precision", {p: p for p in (*PRECISIONS, *PRECISION_ALIASES)}, module=__name__)


@dataclass
class RankConfig:
    """Keys equal ``decompose_model``'s keywords, so ``decompose_model(model, **cfg.rank)`` works; the defaults are
    :class:`lrd_exp.config.rank_settings.RankSettings`'s (docs/ranks.md says what each key does)."""

    policy: RankPolicy = RankPolicy(D.policy)
    ratio: float = D.ratio  # parameter compression target c > 1 of each decomposed layer
    energy: float = D.energy  # fraction of squared singular-value energy kept (policy=energy)
    multiple: int = D.multiple  # quantization step (policy=quantized)
    rounding: Rounding = Rounding(D.rounding)
    base: RankBase = RankBase(D.base)  # the estimate quantized/optimized start from
    rank: Any = D.rank  # policy=fixed: an int, or {name pattern: int}
    window: float = D.window  # optimized: search ranks in [est*(1-window), est*(1+window)]
    step: int = D.step  # optimized: spacing of the searched ranks
    objective: Objective = Objective(D.objective)
    tolerance: float = D.tolerance  # optimized: candidates this close to the fastest tie; the largest rank wins
    budget: RankBudget = RankBudget(D.budget)  # optimized, base=ratio: the compression holds per layer or model-wide
    include: list[str] = field(default_factory=list)  # fnmatch patterns; overrides the default skips
    exclude: list[str] = field(default_factory=list)
    skip_stem: bool = D.skip_stem
    skip_head: bool = D.skip_head
    fit: RankFit = RankFit(D.fit)  # what the factors are fitted to: weights | activations (auto: where data exists)
    calibration_images: int = D.calibration_images  # training images fitted on
    calibrate: Calibrate = Calibrate(D.calibrate)  # fit=activations: independent | sequential
    recalibrate_bn: bool = D.recalibrate_bn  # re-estimate BatchNorm after it
    check_images: int = D.check_images  # the end-to-end check's images; 0: off
    min_agreement: float = D.min_agreement  # warn below this top-1 agreement
    allocation: RankAllocation = RankAllocation(D.allocation)  # uniform | global | fastest
    budget_by: BudgetMeasure = BudgetMeasure(D.budget_by)  # allocation=global: the budget counts params | flops | time
    max_damage: float | None = D.max_damage  # allocation=fastest: the bound on predicted damage; null: uniform's
    damage_images: int = D.damage_images  # images each layer's damage is found on
    damage_by: DamageMethod = DamageMethod(D.damage_by)  # measured (each cut run) | fisher (estimated from one pass)


@dataclass
class FreezeConfig:
    schedule: FreezeKind = FreezeKind.sequential
    unit: FreezeUnit = FreezeUnit.epoch
    warmup: int = 1  # units during which everything trains
    period: int = 1  # units between freezing stages (sequential) or phase changes (alternating)
    per_stage: float = 0.25  # factors frozen per stage: a count (>= 1) or a fraction of all factors (< 1)
    final_fraction: float = 0.75  # fraction of all factors frozen at the end (sequential)
    importance: Importance = Importance.weight_change
    positions: list[str] = field(default_factory=lambda: list(FACTOR_POSITIONS))
    # alternating: the factor positions that train in each phase, cycled every period
    phases: list[list[str]] = field(default_factory=lambda: [["last"], ["first", "core"]])
    freeze_bias: bool = False


@dataclass
class ModelConfig:
    name: str = "resnet18"
    pretrained: bool = False
    checkpoint: str | None = None  # a state_dict, a Lightning .ckpt or an lrd-exp model.pt (save_decomposed)
    trust_checkpoint: bool = False  # true: load a checkpoint that carries pickled code (only files you trust)
    image_size: int | None = None  # None: the dataset's
    drop_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: str | None = None
    download: bool = False
    image_size: int | None = 32  # None: the model's input size (its timm data config)
    in_chans: int = 1
    num_classes: int = 10
    val_fraction: float = 0.2
    train_size: int = 512  # synthetic only
    val_size: int = 128  # synthetic only
    augment: bool = False
    num_workers: int = 0
    # the input pipeline, for cifar* and imagenet: None takes the model's (lrd_exp.training.preprocessing);
    # digits reads mean / std only (None: its training split's), synthetic none of them
    mean: list[float] | None = None
    std: list[float] | None = None
    crop_pct: float | None = None  # fraction of the resized image the centre crop keeps (cifar*: None is 1.0)
    crop_mode: CropMode | None = None
    interpolation: Interpolation | None = None


@dataclass
class DeviceConfig:
    accelerator: Accelerator = Accelerator.auto
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    malloc: MallocMode = MallocMode.system  # tuned: careful timing on a noisy host (docs/measurement.md)




@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.sgd
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: LRSchedule = LRSchedule.cosine
    warmup_epochs: float = 0.0  # linear learning-rate warm-up from ~0 (transformers from scratch need it)
    label_smoothing: float = 0.0


@dataclass
class DistillConfig:
    """``trainer.distill``: knowledge distillation from the original model while fine-tuning the decomposed one."""

    enabled: bool = False
    alpha: float = 0.5  # loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T); in [0, 1]
    temperature: float = 2.0  # T > 0: softens both distributions


@dataclass
class CalibratedConfig:
    """``trainer.calibrated``: what changes in fine-tuning when the decomposition was fitted to the layers' outputs
    (``rank.fit`` resolved to activations): a good start wants a gentle recipe (lrd_exp.training.recipe)."""

    enabled: bool = True  # false: every decomposition fine-tunes with finetune_optim and distill as configured
    lr_scale: float = 0.1  # > 0: times trainer.finetune_optim.lr (so an arch's own optimizer keeps its scale)
    warmup_epochs: float | None = 0.5  # >= 0: replaces finetune_optim.warmup_epochs; null: keeps it
    distill: bool = True  # distill from the original (trainer.distill's alpha and temperature)
    bn: BNMode = BNMode.train  # BatchNorm while fine-tuning: train | eval (keep the statistics calibration left)


@dataclass
class TrainerConfig:
    baseline_epochs: int = 10
    finetune_epochs: int = 5
    batch_size: int = 64
    precision: Precision = Precision["32-true"]  # Lightning's flags; aliases 32, 16, bf16, 64
    max_steps: int = -1  # >0 caps every training stage (smoke runs)
    limit_val_batches: Any = 1.0  # float: fraction of batches; int: count
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = None
    deterministic: bool = False
    enable_progress_bar: bool = True
    channels_last: bool = False  # NHWC activations and weights in training (and, by default, in the benchmark)
    baseline_optim: OptimConfig = field(default_factory=OptimConfig)
    finetune_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01))
    target_drop: float | None = None  # points of top-1: stop fine-tuning once within this of the original; None: all
    distill: DistillConfig = field(default_factory=DistillConfig)
    calibrated: CalibratedConfig = field(default_factory=CalibratedConfig)


@dataclass
class BenchConfig:
    enabled: bool = True  # measure throughput inside a training job
    batch_size: int | None = None  # None: trainer.batch_size
    warmup: int = 3
    steps: int = 48  # timed steps per model / freeze state, split over `rounds`
    rounds: int | None = None  # interleaved rounds; None: one per timed step (the finest interleaving)
    switch_warmup: int = 0  # untimed steps after switching to another model / state (rounds after the first)
    min_time_s: float = 0.0  # per model / freeze state: keep timing past `steps` until this much is collected
    channels_last: bool | None = None  # None: trainer.channels_last (the layout the training loop uses)
    compile: bool = False
    precision: Precision | None = None  # None: trainer.precision; the same flags and aliases
    probe_steps: int = 0  # >0: benchmark steps timed around every fine-tuning epoch (paired fidelity); 0: off
    variants: list[dict[str, Any]] = field(default_factory=list)  # benchmark task: extra rank/freeze overrides
    deploy: bool = True  # also time the deployed form (each layer factored or merged, whichever infers faster)
    latency: bool = True  # also time the inference of one image (median and p90, ms)
    memory: bool = True  # also measure one training step's memory, original and every freeze state


@dataclass
class AdviseConfig:
    """``task=advise``: every configuration of ``grid`` measured without fine-tuning (docs/advise.md)."""

    grid: dict[str, Any] = field(default_factory=dict)  # rank.* / freeze.* keys -> values (config.yaml's default)
    exclude: list[Any] = field(default_factory=list)  # partial configurations (grid-shaped) left out of the grid
    steps: int = 6  # timed steps per model / freeze state (the other timing settings are bench.*'s)
    warmup: int = 1  # untimed steps before the first round
    speed: AdviseSpeed = AdviseSpeed.train  # the frontier's speed axis: train | infer (the deployed form)
    max_error: float | None = None  # recommend the fastest frontier row under this proxy error; None: the knee
    val_images: int = 512  # top-1 before fine-tuning on this many validation images (a labelled dataset); 0: off


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: WandbMode = WandbMode.offline  # a typo (ofline) fails at composition instead of logging online
    project: str = "lrd-exp"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    csv: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PathsConfig:
    cache_dir: str = ".lrd_cache"  # baseline checkpoints and rank timings, shared by sweeps
    data_dir: str = "data"
    output_dir: str | None = None  # None: the Hydra job dir


@dataclass
class ObjectiveConfig:
    """What a job returns to a sweeper (Optuna): a row metric, penalised when accuracy drops too far."""

    metric: str = "train_ips_decomposed"
    max_top1_drop: float | None = None  # points; a larger drop returns -drop instead of the metric


@dataclass
class LrdConfig:
    task: Task = Task.train
    seed: int = 0
    resume: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    advise: AdviseConfig = field(default_factory=AdviseConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    name: str = "lrd"  # experiment name, used for W&B grouping


def register_configs() -> None:
    """Register the schemas; config.yaml lists ``lrd_schema`` first so every group merges into it."""
    from hydra.core.config_store import ConfigStore  # here: the library reads this module without Hydra

    cs = ConfigStore.instance()
    cs.store(name="lrd_schema", node=LrdConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="dataset", name="schema", node=DatasetConfig)
    cs.store(group="freeze", name="schema", node=FreezeConfig)
    cs.store(group="device", name="schema", node=DeviceConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    cs.store(group="logger", name="schema", node=LoggerConfig)
