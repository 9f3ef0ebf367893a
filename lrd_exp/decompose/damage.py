"""Each layer's damage to the whole model's output when it alone is cut to a rank: what ``rank.allocation`` spends.

Two ways to find it (``rank.damage_by``):

- ``measured``: each cut is put in the model and the model run on the damage images; its outputs are compared
  with the original's by the end-to-end check (:class:`lrd_exp.decompose.check.OutputCheck`'s ``damage``: KL for
  class scores, else the relative output error). Exact, and one forward pass per (layer, rank).
- ``fisher``: one forward pass and ``samples`` backward passes give every layer's output gradient at once; a cut's
  change of the layer's output ``dy`` (the cut layer run alone on the recorded input) then predicts the output's
  KL to second order, ``KL ~ 1/2 E_y[(g_y . dy)^2]`` with ``g_y`` the gradient of ``log p(y)`` for a label ``y``
  drawn from the model's own prediction (the Fisher information), and the relative error to first order (``g``
  the gradient of a random projection of the output). Tens of times cheaper: the model runs once per
  ``samples``, not once per cut. It assumes each cut is small enough for the expansion to hold; how well it ranks
  cuts against the measured damage is in ``results/allocation_digits/damage_by.md``.

Both cache their tables on disk like the rank timings, keyed by the model's weights, the layer, the fit, the
calibration and damage images, the method and the seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrd_exp.batches import Batch, batch_size_of, map_tensors, tensors
from lrd_exp.config.values import DAMAGE_METHODS
from lrd_exp.decompose.attention import swap_module
from lrd_exp.decompose.cache import TableCache
from lrd_exp.decompose.calibration import EvalModes, run_batch
from lrd_exp.decompose.check import Reference, has_scores, main_output
from lrd_exp.decompose.plan import LayerPlan, Ranks

log = logging.getLogger("lrd_exp")

Damage = dict[str, dict[Ranks, float]]
Builder = Callable[[LayerPlan, tuple[int, ...]], tuple[nn.Module, float]]
#: samples per piece of a batch in the fisher pass (its activations and gradients are held at once)
PIECE = 16


def rank_key(ranks: Ranks) -> str:
    return "dense" if ranks is None else "x".join(map(str, ranks))


def digest(*items: Any) -> str:
    """A short sha256 of tensors (their bytes, shape and dtype) and plain values, in order."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, torch.Tensor):
            t = item.detach().cpu().contiguous().reshape(-1)
            h.update(f"{tuple(item.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(item, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def model_digest(model: nn.Module) -> str:
    """The weights and buffers of ``model``, by name: a retrained model measures its damages again."""
    return digest(*[x for name, t in model.state_dict().items() for x in (name, t)])


def batches_digest(batches: Sequence[Batch]) -> str:
    return digest(*[t for b in batches for t in tensors(b)])


class DamageCache(TableCache):
    """One JSON file per (model weights, layer, fit, calibration and damage images, method, seed): ranks -> damage."""


def layer_damage(model: nn.Module, plans: Sequence[LayerPlan], candidates: dict[str, list[tuple[int, ...]]],
                 batches: Sequence[Batch], build: Builder, *, method: str = "measured", cache_dir: str | None = None,
                 fit: str = "weights", fit_key: str = "", seed: int = 0) -> tuple[Damage, dict[str, Any]]:
    """Per layer, the damage to the model's outputs on ``batches`` of that layer alone cut at each candidate (the
    dense layer: 0), by ``method`` (:data:`DAMAGE_METHODS`); and statistics (found, cached, seconds).

    ``build(plan, ranks)`` makes the replacement as the decomposition would (fitted to the plan's moments);
    ``fit_key`` names what the fit saw (the calibration images), for the cache key."""
    if method not in DAMAGE_METHODS:
        raise ValueError(f"rank.damage_by={method!r} is not allowed: one of {', '.join(DAMAGE_METHODS)}")
    started, cpu = time.perf_counter(), time.process_time()
    cache = DamageCache(cache_dir)
    base = [model_digest(model), batches_digest(batches), fit, fit_key, seed, torch.__version__]
    base += [method, FISHER_SAMPLES] if method == "fisher" else []  # measured keys stay those of earlier versions
    keys = {p.name: digest(*base, p.name, type(p.module).__name__) for p in plans}
    tables = {p.name: cache.load(keys[p.name]) for p in plans}
    todo = {p.name: [r for r in candidates.get(p.name, []) if rank_key(r) not in tables[p.name]] for p in plans}
    cache.hits = sum(len(candidates.get(p.name, [])) - len(todo[p.name]) for p in plans)
    cache.misses = sum(map(len, todo.values()))
    if cache.misses:
        find = measured_damage if method == "measured" else fisher_damage
        for name, found in find(model, [p for p in plans if todo[p.name]], todo, batches, build, seed=seed).items():
            tables[name].update({rank_key(r): d for r, d in found.items()})
            cache.save(keys[name], tables[name])
    damage = {p.name: {None: 0.0, **{r: tables[p.name][rank_key(r)] for r in candidates.get(p.name, [])}}
              for p in plans}
    stats = {"damage_by": method, "damage_measured": cache.misses, "damage_cached": cache.hits,
             "damage_s": time.perf_counter() - started, "damage_cpu_s": time.process_time() - cpu}
    log.info("layer damage (%s): %d found, %d from cache (%.1f s)", method, cache.misses, cache.hits,
             stats["damage_s"])
    return damage, stats


# ------------------------------------------------------------------------------------------ measured
def measured_damage(model: nn.Module, plans: Sequence[LayerPlan], candidates: dict[str, list[tuple[int, ...]]],
                    batches: Sequence[Batch], build: Builder, *, seed: int = 0) -> Damage:
    """Each cut put in the model alone and the model run on ``batches``; the original is back after each."""
    reference = Reference(model, batches, held_out=False, seed=seed)
    out: Damage = {}
    started, total = time.perf_counter(), sum(len(candidates[p.name]) for p in plans)
    for plan in tqdm(plans, desc="layer damage", unit="layer", disable=None, leave=False):
        out[plan.name] = {}
        for ranks in candidates[plan.name]:
            new, _ = build(plan, ranks)
            swap_module(model, plan.module, new)
            try:
                out[plan.name][ranks] = float(reference.compare(model).damage)
            finally:
                swap_module(model, new, plan.module)
        if len(out) == 1:
            _hint_cost(time.perf_counter() - started, len(out[plan.name]), total)
    return out


def _hint_cost(seconds: float, done: int, total: int, threshold_s: float = 300.0) -> None:
    """One line when measuring every cut will take long: the estimate, and the cheaper way."""
    left = seconds / max(done, 1) * (total - done)
    if left > threshold_s:
        log.info("layer damage: %d cuts, each a whole forward pass, about %.0f min more; rank.damage_by=fisher "
                 "estimates them all from one pass (docs/ranks.md#rankallocation-one-budget-for-the-whole-model)",
                 total, left / 60)


# ------------------------------------------------------------------------------------------ fisher
#: label samples (or random projections) per image: the backward passes of the fisher estimate
FISHER_SAMPLES = 4


def fisher_damage(model: nn.Module, plans: Sequence[LayerPlan], candidates: dict[str, list[tuple[int, ...]]],
                  batches: Sequence[Batch], build: Builder, *, seed: int = 0, samples: int = FISHER_SAMPLES
                  ) -> Damage:
    """The second-order estimate of each cut's damage (this module's docstring), from ``samples`` backward passes
    per piece of ``batches``; every candidate replacement is built once and run on each layer's recorded input."""
    cuts = {p.name: {r: build(p, r)[0] for r in candidates[p.name]} for p in plans}
    modules = {p.name: p.module for p in plans}
    sums = {n: {r: 0.0 for r in c} for n, c in cuts.items()}
    g = torch.Generator().manual_seed(seed)
    rows = norm = 0.0
    scores, unreached = None, set()
    pieces = [p for b in batches for p in _pieces(b, PIECE)]
    for piece in tqdm(pieces, desc="layer damage (fisher)", unit="piece", disable=None, leave=False):
        with _Recorder(modules) as rec, EvalModes(model), torch.enable_grad():
            z = main_output(run_batch(model, piece, "a calibration batch"))
            n = batch_size_of(piece)
            scores = has_scores(z) if scores is None else scores
            rows += z.reshape(-1, z.shape[-1]).shape[0] if scores else 0
            norm += float(z.detach().double().pow(2).sum())
            out = torch.log_softmax(z.float(), -1).reshape(-1, z.shape[-1]) if scores else z
            grads = [_output_grads(rec, out, scores, g, last=k == samples - 1) for k in range(samples)]
            unreached |= {n for n, per_call in grads[0].items() if all(gr is None for gr in per_call)}
            with torch.no_grad():
                for name, calls in rec.calls.items():
                    for r, cut in cuts[name].items() if name not in unreached else ():
                        sums[name][r] += _squared_change(cut, calls, [gr[name] for gr in grads], n)
    if scores:  # KL ~ 1/2 (dz . F dz), per output row
        out = {n: {r: 0.5 * s / (samples * max(rows, 1)) for r, s in t.items()} for n, t in sums.items()}
    else:
        out = {n: {r: (s / samples / norm) ** 0.5 if norm > 0 else 0.0 for r, s in t.items()} for n, t in sums.items()}
    if unreached:  # the forward leaves autograd's graph after them (detach, no_grad): a gradient cannot say
        log.info("layer damage: no gradient reaches %s from the output; measured instead", ", ".join(sorted(unreached)))
        out.update(measured_damage(model, [p for p in plans if p.name in unreached], candidates, batches, build,
                                   seed=seed))
    return out


class _Recorder:
    """Forward hooks on the candidate layers: each call's input and output. The output recorded is the one the
    gradient is taken at (a leaf that wants a gradient where nothing before it does, so the backward reaches every
    layer); the model goes on with a copy, so an in-place op after the layer (``ReLU(inplace=True)``) cannot change
    what was recorded."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __enter__(self) -> _Recorder:
        self.handles = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in self.modules.items()]
        return self

    def _hook(self, name: str):
        def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> torch.Tensor:
            if not out.requires_grad:
                out = out.detach().requires_grad_()
            x = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
            self.calls.setdefault(name, []).append((x.detach(), out))
            return out.clone()
        return record

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def _output_grads(rec: _Recorder, out: torch.Tensor, scores: bool, g: torch.Generator, last: bool
                  ) -> dict[str, list[torch.Tensor | None]]:
    """The gradients of one drawn score at every recorded call's output: ``log p(y)`` of labels ``y`` drawn from
    the model's prediction (``out``: its log-probabilities, rows x classes), else a projection of the output
    ``out`` on a random Gaussian direction."""
    if scores:
        y = torch.multinomial(out.detach().exp().cpu(), 1, generator=g).to(out.device)
        score = out.gather(1, y).sum()
    else:
        score = (torch.randn(out.shape, generator=g).to(out) * out).sum()
    outs = [o for calls in rec.calls.values() for _, o in calls]
    grads = iter(torch.autograd.grad(score, outs, retain_graph=not last, allow_unused=True))
    return {n: [next(grads) for _ in calls] for n, calls in rec.calls.items()}


def _squared_change(cut: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]],
                    grads: list[list[torch.Tensor | None]], n: int) -> float:
    """``sum over drawn scores and samples of (g . dy)^2``: ``dy`` the cut's output less the layer's on each call's
    recorded input, summed over the calls (a layer run twice)."""
    dys = [cut(x) - out.detach() for x, out in calls]
    total = 0.0
    for per_call in grads:
        a = sum(_per_sample(gr * dy, n) for gr, dy in zip(per_call, dys) if gr is not None)
        total += float(a.double().pow(2).sum()) if isinstance(a, torch.Tensor) else 0.0
    return total


def _per_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` summed within each of the ``n`` samples (the dimension of size ``n``, the first such); all of it when
    none is found (then the cross terms between samples stay in: unbiased, noisier)."""
    for d, size in enumerate(t.shape):
        if size == n:
            return t.movedim(d, 0).reshape(n, -1).sum(1)
    return t.sum().reshape(1)


def _pieces(batch: Batch, size: int) -> Iterator[Batch]:
    """``batch`` in consecutive pieces of at most ``size`` samples."""
    n = batch_size_of(batch)
    for i in range(0, n, size):
        yield map_tensors(batch, lambda t, i=i: t[i:i + size] if t.dim() and t.shape[0] == n else t)
