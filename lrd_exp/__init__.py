"""lrd-exp: low-rank decomposition with rank quantization and sequential freezing (arXiv:2309.03824).

The public API: decompose a model (:func:`decompose_model`, with its :class:`DecompositionReport`), the factorized
layers it builds, the freeze schedule with the Lightning callback that applies it, and the compressed model as a
product: a self-describing file (:func:`save_decomposed`, :func:`load_decomposed`) and its fastest deployed form
(:func:`merge_for_inference`). The names load on first use, so ``python run.py --help`` does not import torch and
``lrd_exp.decompose`` needs torch alone. Importing the package registers nothing with Hydra: ``run.py`` does (via
:mod:`lrd_exp.cli`), and so does the ``hydra_plugins`` module Hydra imports before a bare compose.

Subpackages: config, decompose, freezing, timing, training, tasks, devices, distributed, deploy, sweep, results;
modules: cli (what run.py needs), lazy (these lazy namespaces), batches (a model input as a tensor, tuple or
dict).
"""

from __future__ import annotations

from lrd_exp.lazy import lazy_exports

__version__ = "0.1.0"
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "lrd_exp.decompose": ["DecompositionReport", "FactorizedLayer", "SVDConv1x1", "SVDLinear", "Tucker2Conv",
                          "decompose_model", "recalibrate_bn", "register_linear"],
    "lrd_exp.freezing": ["FreezeSchedule", "FreezingCallback"],
    "lrd_exp.deploy": ["load_decomposed", "merge_for_inference", "save_decomposed"],
})
