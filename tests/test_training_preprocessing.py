"""The model's own input pipeline: on real JPEGs in an ImageFolder, the datamodule gives exactly what timm's own
pipeline gives for the model (timm ViT and ResNet, a model built outside timm); overrides, the row, the checks."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import timm
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image
from timm.data import create_transform, resolve_data_config

from lrd_exp.config.schema import DatasetConfig
from lrd_exp.config.validate import ConfigError, check_model_name, validate
from lrd_exp.config.values import CROP_MODES, INTERPOLATIONS
from lrd_exp.results.row import INPUT_COLUMNS, RESULT_COLUMNS
from lrd_exp.training.data import build_datamodule
from lrd_exp.training.preprocessing import Preprocessing, model_preprocessing

SOLID = (200, 120, 40)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny ImageFolder on disk: non-square JPEGs (300x260, so resize and crop matter), smooth content with
    noise; train/cat/solid.jpg is one colour (any crop of it is that colour)."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:260, 0:300]
    for split, n in (("train", 2), ("val", 2)):
        for c, cls in enumerate(("cat", "dog")):
            os.makedirs(root / split / cls)
            for k in range(n):
                base = np.stack([xx * (1 + k), yy * (2 + c), (xx + yy) * (1 + c + k)], -1) % 256
                pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{k}.jpg", quality=90)
    Image.new("RGB", (300, 260), SOLID).save(root / "train" / "cat" / "solid.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def models():
    """Each model once: timm's ViT-B/16 and ResNet-50 without weights (their pretrained_cfg still says what inputs
    the weights expect), and torchvision's ResNet-18 (no timm data config: timm's defaults)."""
    return {"vit_base_patch16_224": timm.create_model("vit_base_patch16_224", pretrained=False),
            "resnet50": timm.create_model("resnet50", pretrained=False),
            "torchvision": torchvision.models.resnet18(weights=None)}


def imagenet(root, **overrides):
    base = dict(name="imagenet", root=str(root), image_size=None, in_chans=3, num_classes=2)
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), {**base, **overrides})


def timm_pipeline(model, path, **overrides):
    """What timm itself feeds ``model`` for the image file at ``path``."""
    config = {**resolve_data_config({}, model=model), **overrides}
    return create_transform(**config)(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "resnet50", "torchvision"])
def test_eval_tensor_of_a_jpeg_is_timms_own(folder, models, name):
    model = models[name]
    # a timm model is resolved by name without building it (as the tasks do); any other model from itself
    preprocessing = model_preprocessing(model if name == "torchvision" else name)
    assert preprocessing == model_preprocessing(model)
    dm = build_datamodule(imagenet(folder), batch_size=2, preprocessing=preprocessing)
    dm.setup("validate")
    assert len(dm.val_dataset) == 4 and dm.image_size == 224
    for i, (path, _) in enumerate(dm.val_dataset.samples):
        assert torch.equal(dm.val_dataset[i][0], timm_pipeline(model, path)), path


def test_the_three_models_expect_different_inputs(models):
    """The comparison above can fail: the models' pipelines differ from each other and from the old fixed one."""
    vit, resnet, other = (model_preprocessing(models[n]) for n in ("vit_base_patch16_224", "resnet50", "torchvision"))
    assert (vit.mean, vit.std, vit.crop_pct, vit.interpolation) == ((0.5,) * 3, (0.5,) * 3, 0.9, "bicubic")
    assert (resnet.crop_pct, resnet.interpolation) == (0.95, "bicubic")
    assert (other.crop_pct, other.interpolation) == (0.875, "bicubic")  # timm's defaults
    assert other.mean == resnet.mean and vit.mean != resnet.mean


def test_a_pretrained_tag_names_its_own_inputs():
    tv = model_preprocessing("resnet50.tv_in1k")  # torchvision's original weights: 0.875 bilinear
    assert (tv.crop_pct, tv.interpolation, tv.input_size) == (0.875, "bilinear", 224)
    assert tv == model_preprocessing(timm.create_model("resnet50.tv_in1k", pretrained=False))
    for name in ("resnet101.tv_in1k", "resnet152.tv_in1k", "vit_base_patch16_224.augreg_in21k_ft_in1k"):
        check_model_name(name)  # the paper experiments' weights exist
        assert name in timm.list_pretrained()
    with pytest.raises(ConfigError, match=r"model.name='resnet50.nope'"):
        check_model_name("resnet50.nope")
    assert model_preprocessing("resnet50", image_size=160).input_size == 160  # model.image_size: built for it


def test_an_override_changes_exactly_that_field(folder, models):
    model = models["vit_base_patch16_224"]
    base = model_preprocessing("vit_base_patch16_224")
    for key, value, field in (("crop_pct", 1.0, "crop_pct"), ("mean", [0.1, 0.2, 0.3], "mean"),
                              ("interpolation", "bilinear", "interpolation"), ("image_size", 160, "input_size")):
        dm = build_datamodule(imagenet(folder, **{key: value}), batch_size=2, preprocessing=base)
        expected = tuple(value) if isinstance(value, list) else value
        assert dm.preprocessing == dataclasses.replace(base, **{field: expected}), key
        dm.setup("validate")
        path = dm.val_dataset.samples[1][0]
        timm_key = {"image_size": "input_size"}.get(key, key)
        timm_value = (3, value, value) if key == "image_size" else expected
        assert torch.equal(dm.val_dataset[1][0], timm_pipeline(model, path, **{timm_key: timm_value})), key
    one = build_datamodule(imagenet(folder, std=[0.25]), batch_size=2, preprocessing=base)
    assert one.preprocessing.std == (0.25,) * 3  # one number for every channel


def test_training_transform_uses_the_models_mean_std_and_size(folder, models):
    for name in ("vit_base_patch16_224", "resnet50"):
        prep = model_preprocessing(name)
        plain = build_datamodule(imagenet(folder, augment=False), batch_size=2, preprocessing=prep)
        plain.setup("fit")
        for i, (path, _) in enumerate(plain.train_dataset.samples):  # without augment: the eval pipeline
            assert torch.equal(plain.train_dataset[i][0], timm_pipeline(models[name], path))
        aug = build_datamodule(imagenet(folder, augment=True), batch_size=2, preprocessing=prep)
        aug.setup("fit")
        solid = [i for i, (p, _) in enumerate(aug.train_dataset.samples) if p.endswith("solid.jpg")][0]
        pixel = torch.tensor(Image.open(aug.train_dataset.samples[solid][0]).convert("RGB").getpixel((150, 130)))
        expected = ((pixel / 255 - torch.tensor(prep.mean)) / torch.tensor(prep.std)).view(3, 1, 1)
        torch.manual_seed(0)
        for _ in range(3):  # any random crop of one colour, normalised by the model's mean / std
            x = aug.train_dataset[solid][0]
            assert x.shape == (3, 224, 224)
            assert torch.allclose(x, expected.expand_as(x), atol=0.02), name
        torch.manual_seed(0)
        views = torch.stack([aug.train_dataset[0][0] for _ in range(4)])
        assert (views - views[0]).abs().amax() > 0.1  # random crops


def test_the_row_records_the_preprocessing(folder):
    dm = build_datamodule(imagenet(folder, crop_pct=1.0), batch_size=2,
                          preprocessing=model_preprocessing("vit_base_patch16_224"))
    assert set(INPUT_COLUMNS) <= set(RESULT_COLUMNS)
    assert dm.input_columns() == {"input_size": 224, "input_mean": "[0.5, 0.5, 0.5]", "input_std": "[0.5, 0.5, 0.5]",
                                  "input_crop_pct": 1.0, "input_crop_mode": "center", "input_interpolation": "bicubic"}
    # digits: its own normalisation (the training split's statistics), the whole 8x8 image resized bilinearly
    digits = build_datamodule(OmegaConf.structured(DatasetConfig), batch_size=8)
    row = digits.input_columns()
    assert row["input_size"] == 32 and row["input_interpolation"] == "bilinear" and row["input_crop_pct"] == 1.0
    assert json.loads(row["input_mean"]) == [round(digits.mean[0], 6)]
    digits.setup("fit")
    assert abs(digits.train_dataset.tensors[0].mean().item()) < 1e-4  # normalised by that mean
    synthetic = build_datamodule(OmegaConf.merge(OmegaConf.structured(DatasetConfig),
                                                 {"name": "synthetic", "image_size": None}), batch_size=8,
                                 preprocessing=model_preprocessing("resnet50", image_size=96))
    assert synthetic.input_columns() == dict.fromkeys(INPUT_COLUMNS) | {"input_size": 96}  # random N(0, 1) inputs


@pytest.mark.parametrize("key,value,needles", [
    ("crop_pct", 1.5, ["dataset.crop_pct=1.5", "(0, 1]"]),
    ("crop_pct", 0.0, ["dataset.crop_pct=0.0", "(0, 1]"]),
    ("mean", [0.5, 0.5], ["dataset.mean=[0.5, 0.5]", "1 or in_chans=3"]),
    ("std", [0.5, 0.0, 0.5], ["dataset.std=[0.5, 0.0, 0.5]", "> 0"]),
    ("image_size", 0, ["dataset.image_size=0", ">= 1"]),
])
def test_a_bad_value_stops_before_any_work_in_one_line(cfg_factory, tmp_path, key, value, needles):
    (tmp_path / "inet" / "train").mkdir(parents=True)
    text = str(value).replace(" ", "")
    cfg = cfg_factory(["dataset=imagenet", f"dataset.root={tmp_path / 'inet'}", f"dataset.{key}={text}"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    with pytest.raises(ValueError) as info:  # the API runs the same check
        model_preprocessing("resnet50").override(**{key: value})
    assert str(info.value) == message


@pytest.mark.parametrize("override,allowed", [("dataset.crop_mode=middle", CROP_MODES),
                                              ("dataset.interpolation=cubic", INTERPOLATIONS)])
def test_a_bad_enum_fails_at_composition_naming_the_choices(cfg_factory, override, allowed):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        cfg_factory([override])
    message = f"{info.value}\n{info.value.__cause__}"
    assert override.split("=")[0] in message and override.split("=")[1] in message
    assert all(value in message for value in allowed)


def test_every_allowed_crop_mode_and_interpolation_is_timms(folder):
    path = next((folder / "val" / "cat").iterdir())
    image = Image.open(path).convert("RGB")
    base = model_preprocessing("resnet50").override(image_size=32)
    outputs = []
    for mode in CROP_MODES:
        for interpolation in INTERPOLATIONS:
            prep = base.override(crop_mode=mode, interpolation=interpolation)
            outputs.append(prep.eval_transform()(image))
            assert outputs[-1].shape == (3, 32, 32)
    assert len({tuple(x.flatten()[:200].tolist()) for x in outputs}) == len(outputs)  # each one does something


def test_cifar_at_its_stored_size_takes_the_models_statistics_and_the_whole_image(tmp_path):
    from test_training_data import cifar_cfg, write_cifar10

    data = write_cifar10(tmp_path / "cifar-10-batches-py")
    dm = build_datamodule(cifar_cfg("cifar10", tmp_path), batch_size=4,
                          preprocessing=model_preprocessing("vit_base_patch16_224"))
    dm.setup("validate")
    assert dm.image_size == 32 and dm.preprocessing.crop_pct == 1.0  # no crop of a 32 px thumbnail
    expected = (torch.from_numpy(data[5]).view(3, 32, 32).float() / 255 - 0.5) / 0.5
    assert torch.allclose(dm.val_dataset[5][0], expected, atol=1e-6)
    cropped = build_datamodule(cifar_cfg("cifar10", tmp_path, crop_pct=0.5), batch_size=4,
                               preprocessing=model_preprocessing("vit_base_patch16_224"))
    assert cropped.preprocessing == dataclasses.replace(dm.preprocessing, crop_pct=0.5)


def test_the_tasks_feed_the_configured_model_its_own_inputs(cfg_factory, folder, models):
    from lrd_exp.tasks.models import build_data, config_shape

    cfg = cfg_factory(["model=vit_base_patch16_224", "dataset=imagenet", f"dataset.root={folder}",
                       "dataset.num_classes=2"])
    validate(cfg)
    dm = build_data(cfg)
    assert config_shape(cfg)["image_size"] == dm.image_size == 224
    dm.setup("validate")
    path = dm.val_dataset.samples[0][0]
    assert torch.equal(dm.val_dataset[0][0], timm_pipeline(models["vit_base_patch16_224"], path))
    assert Preprocessing.from_data_config(resolve_data_config({}, model=models["vit_base_patch16_224"])) == \
        dm.preprocessing
