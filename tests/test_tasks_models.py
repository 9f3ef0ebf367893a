"""The run's model from its one builder (tasks.models.run_model): a timm name, a state_dict's weights, or a model
file whose decomposed model and untrained original are built only when a task uses them; model.pt re-creatable."""

from __future__ import annotations

import torch

from lrd_exp import decompose_model, load_decomposed, save_decomposed
from lrd_exp.decompose.layers import FactorizedLayer
from lrd_exp.devices.resolve import resolve_device
from lrd_exp.tasks.models import build_original, run_model

SHAPE = {"num_classes": 10, "in_chans": 1, "image_size": 32}


def factorized(model: torch.nn.Module) -> int:
    return sum(isinstance(m, FactorizedLayer) for m in model.modules())


def test_checkpoint_weights_and_the_config_shape(cfg_factory, tmp_path):
    torch.manual_seed(0)
    weights = build_original(cfg_factory().model, **SHAPE).state_dict()
    torch.save(weights, tmp_path / "weights.pt")
    cfg = cfg_factory([f"model.checkpoint={tmp_path / 'weights.pt'}"])
    run = run_model(cfg, resolve_device("cpu"), str(tmp_path))
    assert not run.from_file and run.decomposed is None and run.model is run.original
    assert run.shape == SHAPE and run.fields == {} and run.curves == []
    assert all(torch.equal(v, weights[k]) for k, v in run.original.state_dict().items())


def test_a_model_file_is_built_only_when_used_and_saves_again(cfg_factory, tmp_path):
    model = build_original(cfg_factory().model, **SHAPE)
    decompose_model(model, policy="quantized", ratio=2.0, input_size=(1, 32, 32))
    path = tmp_path / "model.pt"
    save_decomposed(model, path, model_name="resnet18", model_kwargs={"num_classes": 10, "in_chans": 1},
                    rank={"policy": "quantized"})
    run = run_model(cfg_factory([f"model.checkpoint={path}"]), resolve_device("cpu"), str(tmp_path))
    assert run.from_file and "decomposed" not in vars(run) and "original" not in vars(run)  # nothing built yet
    loaded = run.model
    assert "original" not in vars(run)  # the untrained original: only for a task that times it beside
    assert factorized(loaded) == factorized(model) > 0 and factorized(run.original) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert run.file_rank() == {"policy": "quantized"}

    again = run.save(loaded, str(tmp_path / "again.pt"), rank=run.file_rank())
    rebuilt = load_decomposed(again)  # from the timm name and the arguments the run built it with
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in rebuilt.state_dict().items())
