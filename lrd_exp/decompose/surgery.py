"""Model surgery: find decomposable layers, choose their ranks by policy, swap in factorized layers."""

from __future__ import annotations

import copy
import difflib
import fnmatch
import inspect
import logging
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import fields
from functools import partial
from typing import Any

import torch
from torch import nn

from lrd_exp.config.rank_settings import DEFAULTS as D
from lrd_exp.config.rank_settings import RankSettings, patterns
from lrd_exp.decompose import calibration as C
from lrd_exp.decompose import functional as Fn
from lrd_exp.decompose.allocation import allocate
from lrd_exp.decompose.capture import watch
from lrd_exp.decompose.check import DecompositionWarning, Reference, collapse_warning
from lrd_exp.decompose.damage import batches_digest
from lrd_exp.decompose.functional import svd_error, tucker2_error
from lrd_exp.decompose.layer_timing import LayerTimer
from lrd_exp.decompose.layers import FactorizedLayer, SVDConv1x1, SVDLinear, Tucker2Conv, reconstruct_weight
from lrd_exp.decompose.plan import LayerPlan
from lrd_exp.decompose.policies import NOTHING, POLICY_RANKS, SEARCHED, quantized_ranks
from lrd_exp.decompose.registry import is_linear, linear_features, unpacked_names, weight_matrix
from lrd_exp.decompose.report import DecompositionReport, LayerReport
from lrd_exp.decompose.runnable import Swaps, declared_reads, keep_runnable, repack, run_eval, traced_reads, unpack
from lrd_exp.decompose.search import choose_ranks

log = logging.getLogger("lrd_exp")
RANK_KEYS = frozenset(f.name for f in fields(RankSettings))  # decompose_model's keywords that are rank keys


def _matches(name: str, pats: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in pats)


def stem_and_head(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names of the stem conv and classifier head: timm's pretrained_cfg when present, else first conv / last linear."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = dict(model.named_modules())
    stems = {cfg["first_conv"]} if isinstance(cfg.get("first_conv"), str) else set()
    heads = set(cfg.get("classifier") or []) if isinstance(cfg.get("classifier"), (list, tuple)) else (
        {cfg["classifier"]} if isinstance(cfg.get("classifier"), str) else set())
    stems = {s for s in stems if s in names}
    heads = {h for h in heads if h in names}
    if not stems:
        first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
        stems = {first} if first else set()
    if not heads:
        last = [n for n, m in model.named_modules() if is_linear(m)]
        heads = {last[-1]} if last else set()
    return stems, heads


def default_input_size(model: nn.Module) -> tuple[int, ...] | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    return tuple(size) if size else None


def _record_shapes(model: nn.Module, plans: list[LayerPlan], example_input: C.Batch,
                   what: str = "the example input") -> None:
    by_name = {plan.name: plan for plan in plans}
    batch = C.batch_size_of(example_input)

    def per_sample(t: torch.Tensor) -> tuple[int, ...]:
        """The shape one sample sees; a sequence-first (L, N, E) input becomes (L, E)."""
        if t.dim() < 2 or t.shape[0] == batch:
            return tuple(t.shape[1:])
        return (t.numel() // (batch * t.shape[-1]), t.shape[-1])

    def record(name: str, _module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        plan = by_name[name]
        plan.calls.append((per_sample(x), per_sample(out)))
        if plan.in_shape is None:  # the first call's shapes are the ones a rank search times
            plan.in_shape, plan.out_shape = plan.calls[0]

    with watch({plan.name: plan.module for plan in plans}, record):
        run_eval(model, example_input, what)


def check_selection(model: nn.Module, *, include: Iterable[str] = (), exclude: Iterable[str] = (),
                    rank: Any = None) -> None:
    """A ``rank.include`` / ``rank.exclude`` pattern or a ``rank.rank`` key that matches no Linear / Conv2d layer is
    a typo that would run a whole job for nothing: one ValueError naming it, with the closest layer names."""
    keyed = [("rank.include", p) for p in patterns(include)] + [("rank.exclude", p) for p in patterns(exclude)]
    if isinstance(rank, Mapping):
        keyed += [("rank.rank", str(p)) for p in rank]
    if not keyed:
        return
    names = [n for n, m in model.named_modules() if is_linear(m) or isinstance(m, nn.Conv2d)] + unpacked_names(model)
    for key, pattern in keyed:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; the layers are e.g. {', '.join(names[:3])}"
            raise ValueError(f"{key} pattern {pattern!r} matches no Linear / Conv2d layer of the model{hint}")


def find_candidates(model: nn.Module, *, include: Iterable[str] = (), exclude: Iterable[str] = (),
                    skip_stem: bool = True, skip_head: bool = True, reads: Mapping[str, str] | None = None
                    ) -> tuple[list[LayerPlan], list[LayerReport]]:
    """Decomposable layers in module order, and reports for the layers skipped by rule. ``reads``: the layers whose
    attribute the model reads directly (name -> attribute, :func:`~lrd_exp.decompose.runnable.traced_reads`)."""
    include, exclude = patterns(include), patterns(exclude)
    stems, heads = stem_and_head(model)
    direct = {name: f"its parent reads .{attr} of it directly" for name, attr in (reads or {}).items()}
    direct.update(declared_reads(model))
    plans, skipped = [], []
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLayer) or not (is_linear(m) or isinstance(m, nn.Conv2d)):
            continue
        if include and not _matches(name, include):
            continue
        forced = bool(include)
        reason = ""
        if name in direct:
            reason = direct[name]
        elif exclude and _matches(name, exclude):
            reason = "excluded by pattern"
        elif isinstance(m, nn.Conv2d) and m.groups != 1:
            reason = "grouped/depthwise conv (not supported)"
        elif skip_stem and name in stems and not forced:
            reason = "stem conv"
        elif skip_head and name in heads and not forced:
            reason = "classifier head"
        if reason:
            w = weight_matrix(m)
            skipped.append(LayerReport(name=name, kind=type(m).__name__, action="kept", weight_shape=tuple(w.shape),
                                       params_before=w.numel(), params_after=w.numel(), reason=reason))
            continue
        if is_linear(m):
            plans.append(LayerPlan(name, m, "svd", *linear_features(m), 1))
        else:
            k2 = m.kernel_size[0] * m.kernel_size[1]
            plans.append(LayerPlan(name, m, "svd" if k2 == 1 else "tucker2", m.in_channels, m.out_channels, k2))
    return plans, skipped


def build_factorized(plan: LayerPlan, ranks: tuple[int, ...], *, error: bool = True
                     ) -> tuple[FactorizedLayer, float]:
    """The factorized replacement and its relative error: of the output on the calibration inputs when the plan
    has moments (fit=activations), of the weight otherwise (``error=False``: NaN, not computed; rank.allocation's
    candidates need none, and on a wide conv it costs as much as the fit). Paired moments (sequential calibration)
    fit the original output ``W X`` from the decomposed model's inputs ``X^``."""
    m, fit = plan.module, _fit_inputs(plan)
    if plan.kind == "tucker2":
        new = Tucker2Conv.from_conv(m, ranks[0], ranks[1], **fit)
    elif is_linear(m):
        new = SVDLinear.from_linear(m, ranks[0], **fit)
    else:
        new = SVDConv1x1.from_conv(m, ranks[0], **fit)
    return new, _fit_error(plan, new, ranks) if error else float("nan")


def _fit_inputs(plan: LayerPlan) -> dict[str, Any]:
    """What the layer's constructor fits with: the cached bases of its weight, or its moments and the cached
    whitened spectra (:meth:`LayerPlan.energy_spectra` computed them if an energy policy asked)."""
    if plan.moments is None:
        if plan.kind == "svd":
            return {"basis": plan.svd_basis()}
        (u_out, _), (u_in, _) = plan.mode_bases()
        return {"basis": (u_out, u_in)}
    spectra = plan.cached_whitened_spectra()
    if spectra is not None and plan.kind == "tucker2":
        spectra = spectra[0]  # the input spectrum; the output one gives the energy ranks only
    return {"moment": plan.moments.moment, "cross": plan.moments.cross, "spectrum": spectra}


def _fit_error(plan: LayerPlan, new: FactorizedLayer, ranks: tuple[int, ...]) -> float:
    """The replacement's relative error: of the weight (from the cached spectrum where it is exact), or of the
    output on the calibration inputs."""
    moments = plan.moments
    if moments is None:
        if plan.kind == "svd":
            return svd_error(plan.singular_values(), ranks[0])
        return tucker2_error(plan.module.weight.detach(), new.core.weight.detach())
    w, w_hat = plan.weight(), reconstruct_weight(new)
    if moments.cross is not None:
        return Fn.paired_output_error(w, w_hat, moments.original, moments.cross, moments.moment)
    return Fn.output_error(w, w_hat, moments.moment)


def _keep_runnable(swaps: Swaps, reports: list[LayerReport], x: C.Batch, traced: bool) -> None:
    """A model that no longer runs gets back exactly the layers that break it (:func:`keep_runnable`); each restored
    layer's report says why."""
    by_name = {r.name: r for r in reports if r.action == "decomposed"}
    for name, attr, error in keep_runnable(swaps, by_name, x, traced=traced):
        why = (f"its parent reads .{attr} of it directly" if attr
               else f"the model's forward failed with it decomposed ({error})")
        _restore(by_name[name], why)


def _restore(r: LayerReport, reason: str) -> None:
    r.action, r.reason = "kept", reason
    r.factor_shapes, r.params_after, r.flops_after, r.rel_error = [], r.params_before, r.flops_before, 0.0


def _shapes(module: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(f.weight.shape) for f in module.factors().values()]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def decompose_model(
    model: nn.Module, policy: str = D.policy, ratio: float = D.ratio, energy: float = D.energy,
    multiple: int = D.multiple, rounding: str = D.rounding, base: str = D.base, rank: Any = D.rank,
    window: float = D.window, step: int = D.step, objective: str = D.objective, tolerance: float = D.tolerance,
    budget: str = D.budget, include: Iterable[str] = D.include, exclude: Iterable[str] = D.exclude,
    skip_stem: bool = D.skip_stem, skip_head: bool = D.skip_head, fit: str = D.fit,
    calibration_images: int = D.calibration_images, calibrate: str = D.calibrate,
    recalibrate_bn: bool = D.recalibrate_bn, check_images: int = D.check_images,
    min_agreement: float = D.min_agreement, allocation: str = D.allocation, budget_by: str = D.budget_by,
    max_damage: float | None = D.max_damage, damage_images: int = D.damage_images, damage_by: str = D.damage_by, *,
    calibration: torch.Tensor | Iterable[Any] | None = None, evaluation: torch.Tensor | Iterable[Any] | None = None,
    example_input: Any = None,
    input_size: tuple[int, ...] | None = None, rank_search: Mapping[str, Any] | None = None, seed: int = 0,
) -> DecompositionReport:
    """Decompose ``model`` in place and report what changed.

    Keywords equal the ``rank`` config keys, so ``decompose_model(model, **cfg.rank)`` works. ``calibration`` (a
    tensor, or an iterable of batches fed as ``model(x)``, ``model(*x)`` or ``model(**x)``) makes ``fit="auto"``
    fit every factorized layer to its outputs on the first ``calibration_images`` samples (``fit="weights"``: the
    paper's truncated SVD / HOSVD of the weights) and, with ``recalibrate_bn``, re-estimates BatchNorm on them.
    ``example_input`` (or ``input_size``, or timm's ``pretrained_cfg['input_size']``, or the first calibration
    sample) gives the activation shapes for FLOP counts; ``rank_search`` holds the measuring context of
    ``policy="optimized"`` (batch size, device, precision, cache dir; see
    :func:`lrd_exp.decompose.search.choose_ranks`). ``seed`` picks the subsampled calibration positions.

    The end-to-end check (``report.check``) compares the decomposed model with the original on the first
    ``check_images`` samples of ``evaluation`` (batches the fit did not use; without them, the calibration batches,
    and the report says so): relative output error, top-1 agreement and KL. BatchNorm re-estimation is kept only
    where it lowers that damage (``report.bn_recalibration``); an agreement below ``min_agreement`` warns.
    ``allocation`` global / fastest spreads the ranks by each layer's damage (:mod:`lrd_exp.decompose.allocation`),
    measured or estimated (``damage_by``, :mod:`lrd_exp.decompose.damage`).
    """
    started = time.perf_counter()
    keys = {k: v for k, v in locals().items() if k in RANK_KEYS}
    settings = RankSettings.from_keys(**keys).resolved(calibration is not None)  # checked once, before any work
    check_rank_search(rank_search)
    batches = C.calibration_batches(calibration, settings.calibration_images) if calibration is not None else []
    check_selection(model, include=settings.include, exclude=settings.exclude,
                    rank=settings.rank if settings.policy == "fixed" else None)
    reference = _reference(model, settings, evaluation, batches, seed)  # a typo above costs no forward pass
    params_before = _count(model)
    swaps = Swaps(model)  # every swap of this surgery, to give back what breaks the model
    reads = traced_reads(model) if settings.policy != "none" else {}  # None: it cannot be traced
    try:
        example, what = _example(model, example_input, input_size, batches)
        # torch's attention and transformer layers, with their projections as modules the surgery can replace
        packed = unpack(swaps, reads, example) if settings.policy != "none" else []
        report = _decompose(swaps, settings, batches, example, what, reads, rank_search=rank_search, seed=seed)
        if repack(swaps, packed):  # those left dense keep torch's fused inference paths
            existing = {name for name, _ in model.named_modules()}  # their q/k/v projections are gone again
            report.layers = [layer for layer in report.layers if layer.name in existing]
    except BaseException:
        swaps.give_back_all()
        raise
    return _finish(model, report, settings, batches, reference, params_before, started)


def _finish(model: nn.Module, report: DecompositionReport, settings: RankSettings, batches: list[Any],
            reference: Reference | None, params_before: int, started: float) -> DecompositionReport:
    """BatchNorm, the end-to-end check, the totals, and a warning when nothing was decomposed."""
    if report.decomposed:
        report.calibration_s += _recalibrate_and_check(model, report, settings, batches, reference)
    report.params_before, report.params_after = params_before, _count(model)
    report.decompose_s = time.perf_counter() - started
    if settings.policy != "none" and not report.decomposed:
        warnings.warn(f"decompose_model: no layer was decomposed (policy={settings.policy}): "
                      f"{report.why_dense()}", stacklevel=3)
    return report


def _decompose(swaps: Swaps, settings: RankSettings, batches: list[Any], example: Any, what: str,
               reads: dict[str, str] | None, *, rank_search: Mapping[str, Any] | None, seed: int
               ) -> DecompositionReport:
    """The surgery proper, step by step: candidates, shapes, moments, ranks, replacement, repair, BatchNorm."""
    model, policy, fit = swaps.model, settings.policy, settings.fit
    plans, skipped = find_candidates(model, include=settings.include, exclude=settings.exclude,
                                     skip_stem=settings.skip_stem, skip_head=settings.skip_head, reads=reads)
    if example is not None:
        _record_shapes(model, plans, example, what)
    dense_flops_all = [p.forward_flops(None) for p in plans]

    calibration_s, order = 0.0, []
    if fit == "activations" and policy != "none" and plans:
        t0 = time.perf_counter()
        moments, order = C.collect_moments(model, {p.name: p.module for p in plans}, batches, seed=seed)
        for p in plans:
            p.moments = moments[p.name] if p.name in order else None
            p.fit_note = "" if p.name in order else "not reached by the calibration inputs: fitted to its weights"
        calibration_s += time.perf_counter() - t0

    chosen, reasons, search_stats = _choose(plans, settings, rank_search)
    allocated = None
    if settings.allocation != "uniform" and plans:
        allocated = allocate(model, plans, chosen, settings, batches, partial(build_factorized, error=False),
                             context=rank_search, seed=seed,
                             fit_key=batches_digest(batches) if fit == "activations" else "")
        chosen, reasons = {**chosen, **allocated.chosen}, {**reasons, **allocated.reasons}
    reports, seconds = _replace_all(swaps, plans, chosen, reasons, settings, batches, order, seed)
    calibration_s += seconds
    if allocated is not None:
        for r in reports:
            r.damage = allocated.damage.get(r.name)

    if example is not None and any(r.action == "decomposed" for r in reports):
        _keep_runnable(swaps, reports, example, traced=reads is not None)
    report = DecompositionReport(policy=policy, layers=reports + skipped, params_before=0, params_after=0,
                                 settings=settings.to_dict(), fit=fit,
                                 rank_search={k: v for k, v in search_stats.items() if k != "timings"}
                                 if search_stats else None,
                                 rank_timings=search_stats["timings"] if search_stats else [],
                                 calibration_images=sum(C.batch_size_of(b) for b in batches),
                                 calibration_s=calibration_s, allocation=allocated.summary if allocated else None)
    order_all = {n: i for i, (n, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda layer: order_all.get(layer.name, len(order_all)))
    if plans and all(f is not None for f in dense_flops_all):
        report.flops_before = sum(dense_flops_all)
        report.flops_after = sum(layer.flops_after or 0 for layer in reports)
    return report


def _replace_all(swaps: Swaps, plans: list[LayerPlan], chosen: dict[str, tuple[int, ...] | None],
                 reasons: dict[str, str], settings: RankSettings, batches: list[Any], order: list[str],
                 seed: int) -> tuple[list[LayerReport], float]:
    """Replace every planned layer (in the order the layers run when calibrating sequentially, each fitted to the
    decomposed model's own inputs); the reports and the seconds spent collecting paired moments."""
    model = swaps.model
    sequential = settings.fit == "activations" and settings.calibrate == "sequential"
    reference = copy.deepcopy(model) if sequential and plans else None
    if sequential:
        position = {name: i for i, name in enumerate(order)}
        plans = sorted(plans, key=lambda p: position.get(p.name, len(position)))
    reports: list[LayerReport] = []
    seconds = 0.0
    for plan in plans:
        if sequential and plan.moments is not None and chosen.get(plan.name) is not None:
            t0 = time.perf_counter()
            plan.moments = C.collect_paired(reference, model, plan.name, batches, seed=seed)
            seconds += time.perf_counter() - t0
        reports.append(_replace(swaps, plan, chosen.get(plan.name), reasons, settings.policy))
        plan.release()
    return reports, seconds


#: what ``rank_search`` may hold: the timing context of policy=optimized and rank.allocation, and where
#: rank.allocation caches the layers' damages
RANK_SEARCH_KEYS = (*inspect.signature(LayerTimer).parameters, "damage_cache_dir")


def check_rank_search(rank_search: Mapping[str, Any] | None) -> None:
    """An unknown ``rank_search`` key is one ValueError naming it (before any work), not a failure deep in timing."""
    unknown = sorted(set(rank_search or {}) - set(RANK_SEARCH_KEYS))
    if unknown:
        raise ValueError(f"rank_search={{{', '.join(map(repr, unknown))}: ...}} is not allowed: its keys are "
                         f"{', '.join(RANK_SEARCH_KEYS)}")


def _reference(model: nn.Module, settings: RankSettings, evaluation: Any, batches: list[Any],
               seed: int) -> Reference | None:
    """The original's outputs on the check's inputs (``evaluation``, else the calibration batches), recorded before
    the surgery; None when the check is off (``check_images=0``, policy none) or there are no inputs."""
    if settings.policy == "none" or not settings.check_images or (evaluation is None and not batches):
        return None
    held_out = evaluation is not None
    inputs = C.calibration_batches(evaluation if held_out else batches, settings.check_images)
    return Reference(model, inputs, held_out=held_out, seed=seed)


def _recalibrate_and_check(model: nn.Module, report: DecompositionReport, settings: RankSettings,
                           batches: list[Any], reference: Reference | None) -> float:
    """BatchNorm re-estimated on the calibration batches and kept only where the end-to-end check says it helped;
    then the check itself (``report.check``), and a one-line warning when the model collapsed. Returns the seconds
    spent re-estimating."""
    seconds, before = 0.0, None
    wants_bn = settings.recalibrate_bn and bool(batches)
    if wants_bn and not C.has_batchnorm(model):
        report.bn_recalibration = "no BatchNorm"
    elif wants_bn:
        before = reference.compare(model) if reference is not None else None
        saved = C.batchnorm_state(model)
        t0 = time.perf_counter()
        C.recalibrate_bn(model, batches)
        seconds = time.perf_counter() - t0
        report.bn_recalibration = "unchecked"
    if reference is not None:
        report.check = reference.compare(model)
        if before is not None:
            report.bn_damage = (before.damage, report.check.damage)
            if report.check.damage > before.damage:  # re-estimation made it worse here: the old statistics stay
                model.load_state_dict(saved, strict=False)
                report.check, report.bn_recalibration = before, "rejected"
            else:
                report.bn_recalibration = "kept"
        message = collapse_warning(report.check, report.decomposed, settings.min_agreement)
        if message:
            report.warnings.append(message)
            warnings.warn(f"decompose_model: {message}", DecompositionWarning, stacklevel=3)
    return seconds


def _example(model: nn.Module, example_input: Any, input_size: tuple[int, ...] | None,
             batches: list[Any]) -> tuple[Any, str]:
    """One input to record activation shapes (and check the decomposed model still runs), and what it is."""
    if example_input is not None:
        first = example_input[:1] if isinstance(example_input, torch.Tensor) else C.first_samples(example_input, 1)
        return first, "the example input"
    size = tuple(input_size) if input_size is not None else (None if batches else default_input_size(model))
    if size is not None:
        p = next(model.parameters(), None)
        return torch.randn(1, *size, device=p.device if p is not None else None,
                           dtype=p.dtype if p is not None else None), "the example input"
    # a whole batch: an error then names the calibration batch's shapes
    return (batches[0], "a calibration batch") if batches else (None, "")


def _choose(plans: list[LayerPlan], settings: RankSettings, rank_search: Mapping[str, Any] | None
            ) -> tuple[dict[str, tuple[int, ...] | None], dict[str, str], dict[str, Any] | None]:
    """Every plan's ranks by the policy (None keeps the layer dense), the reasons the report gives, and the rank
    search's statistics (``optimized`` only)."""
    if settings.policy == NOTHING:
        return {}, {}, None
    if settings.policy != SEARCHED:
        return {p.name: POLICY_RANKS[settings.policy](p, settings) for p in plans}, {}, None
    context = dict(rank_search or {})
    context.pop("damage_cache_dir", None)  # rank.allocation's
    estimates = {p.name: quantized_ranks(p, settings) for p in plans}
    found = choose_ranks(
        plans, estimates, window=settings.window, step=settings.step, objective=settings.objective,
        base=settings.base, ratio=settings.ratio, energy=settings.energy,
        tolerance=settings.tolerance, budget=settings.budget, **context)
    return found.chosen, found.reasons, {**found.stats, "timings": found.timings}


def _replace(swaps: Swaps, plan: LayerPlan, ranks: tuple[int, ...] | None, reasons: dict[str, str],
             policy: str) -> LayerReport:
    """Swap one layer for its factorized form (or keep it, saying why) and report it."""
    dense_flops = plan.forward_flops(None)
    weight_shape = tuple(plan.weight().shape)
    kept = LayerReport(name=plan.name, kind=type(plan.module).__name__, action="kept",
                       weight_shape=weight_shape, full_ranks=plan.full_ranks,
                       params_before=plan.params_dense, params_after=plan.params_dense,
                       flops_before=dense_flops, flops_after=dense_flops)
    if policy == "none":
        kept.reason = "rank.policy=none"
        return kept
    if ranks is None:
        kept.reason = reasons.get(plan.name, "no rank given for this layer")
        return kept
    if plan.params_for(ranks) >= plan.params_dense:
        kept.reason = f"ranks {ranks} would not shrink it"
        kept.ranks = tuple(ranks)
        return kept
    new, err = build_factorized(plan, ranks)
    reason = reasons.get(plan.name, "")
    if plan.fit_note:
        reason = "; ".join(filter(None, [reason, plan.fit_note]))
    swaps.swap(plan.name, new)
    return LayerReport(
        name=plan.name, kind=plan.kind, action="decomposed", weight_shape=weight_shape,
        factor_shapes=_shapes(new), ranks=tuple(new.ranks), full_ranks=plan.full_ranks,
        params_before=plan.params_dense, params_after=plan.params_for(tuple(new.ranks)),
        flops_before=dense_flops, flops_after=plan.forward_flops(tuple(new.ranks)), rel_error=err,
        error_of="output" if plan.moments is not None else "weight", reason=reason)
