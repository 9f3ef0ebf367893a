"""Datamodules: split sizes and determinism, normalisation, pixel round trips on tiny generated files, error
messages."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from lrd_exp.config.schema import DatasetConfig
from lrd_exp.training.data import DatasetOptions, DigitsDataModule, build_datamodule

# without a model, CIFAR is normalised by timm's defaults (a model's own mean / std otherwise)
CIFAR10_MEAN = CIFAR100_MEAN = IMAGENET_MEAN
CIFAR10_STD = CIFAR100_STD = IMAGENET_STD


def make_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), overrides)


def digits(batch_size=64, seed=0, **overrides):
    dm = build_datamodule(make_cfg(**overrides), batch_size=batch_size, seed=seed)
    dm.setup("fit")
    return dm


def stack(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor([int(y) for y in ys])


def is_shift(view, image, pad, fill, flips=(False,)):
    """``view`` is ``image`` (C, H, W) shifted by up to ``pad`` pixels (uncovered pixels = ``fill``), maybe flipped."""
    h, w = image.shape[-2:]
    fill = torch.as_tensor(fill, dtype=image.dtype).view(-1, 1, 1)
    padded = fill.expand(image.shape[0], h + 2 * pad, w + 2 * pad).clone()
    padded[:, pad : pad + h, pad : pad + w] = image
    return any(
        torch.allclose(padded[:, i : i + h, j : j + w].flip(-1) if flip else padded[:, i : i + h, j : j + w],
                       view, atol=1e-6)
        for i in range(2 * pad + 1)
        for j in range(2 * pad + 1)
        for flip in flips
    )


# ---------------------------------------------------------------- digits


def test_digits_split_sizes_disjoint_and_seeded():
    dm = digits()
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 1, 32)
    assert len(dm.train_dataset) == 1437 and len(dm.val_dataset) == 360  # ceil(0.2 * 1797) = 360
    train, val = set(dm.train_indices.tolist()), set(dm.val_indices.tolist())
    assert not train & val and train | val == set(range(1797))

    same = digits()
    assert np.array_equal(same.train_indices, dm.train_indices)
    assert np.array_equal(same.val_indices, dm.val_indices)
    other = digits(seed=1)
    assert not np.array_equal(other.val_indices, dm.val_indices)
    assert len(other.val_indices) == 360

    half = digits(val_fraction=0.5)
    assert len(half.train_dataset) + len(half.val_dataset) == 1797 and len(half.val_dataset) == 899


def test_digits_stratified_all_classes_in_val():
    dm = digits()
    _, y_val = stack(dm.val_dataset)
    counts = torch.bincount(y_val, minlength=10)
    assert (counts >= 35).all() and (counts <= 37).all()  # ~180 per class in 1797, 20 % of it in val


def test_digits_batches_shape_dtype_and_normalisation():
    dm = digits(batch_size=64, in_chans=3)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray repeated
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (64, 3, 32, 32)
    # last partial train batch dropped (1437 = 22 * 64 + 29), val keeps everything
    assert len(dm.train_dataloader()) == 22 and len(dm.val_dataloader()) == 6

    x_train, _ = stack(dm.train_dataset)
    assert abs(x_train.mean().item()) < 1e-4
    assert x_train.std().item() == pytest.approx(1.0, abs=1e-3)
    assert dm.mean == pytest.approx([dm.mean[0]] * 3) and 0.0 < dm.mean[0] < 1.0


def test_digits_pixel_round_trip():
    from sklearn.datasets import load_digits

    raw = load_digits().images
    dm = digits(image_size=8)  # no resize: exact values
    i = 5
    idx = int(dm.val_indices[i])
    x, y = dm.val_dataset[i]
    expected = (torch.tensor(raw[idx], dtype=torch.float32) / 16 - dm.mean[0]) / dm.std[0]
    assert torch.allclose(x[0], expected, atol=1e-6)
    assert int(y) == int(load_digits().target[idx])

    dm = digits(image_size=32, mean=[0.5], std=[0.25])  # configured stats, bilinear resize
    x, _ = dm.val_dataset[i]
    ref = F.interpolate(
        torch.tensor(raw[idx], dtype=torch.float32)[None, None] / 16,
        size=(32, 32),
        mode="bilinear",
        align_corners=False,
    )[0]
    assert dm.mean == (0.5,) and dm.std == (0.25,)
    assert torch.allclose(x, (ref - 0.5) / 0.25, atol=1e-6)


def test_digits_seeded_shuffle_and_augment():
    a = next(iter(digits(seed=3).train_dataloader()))[1]
    b = next(iter(digits(seed=3).train_dataloader()))[1]
    c = next(iter(digits(seed=4).train_dataloader()))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)

    plain, aug = digits(), digits(augment=True)
    torch.manual_seed(0)
    shifted = torch.stack([aug.train_dataset[0][0] for _ in range(20)])
    assert shifted.shape == (20, 1, 32, 32)
    assert any(not torch.equal(s, plain.train_dataset[0][0]) for s in shifted)
    assert torch.equal(aug.val_dataset[0][0], plain.val_dataset[0][0])  # val never augmented
    background = (0.0 - aug.mean[0]) / aug.std[0]  # zero padding is background, then normalised
    assert all(is_shift(v, plain.train_dataset[0][0], pad=32 // 8, fill=background) for v in shifted)
    torch.manual_seed(0)
    assert torch.equal(torch.stack([aug.train_dataset[0][0] for _ in range(20)]), shifted)  # seeded


def test_loader_workers_and_plain_object_config():
    cfg = SimpleNamespace(
        name="digits",
        root=None,
        image_size=16,
        in_chans=1,
        num_classes=10,
        val_fraction=0.2,
        augment=False,
        num_workers=2,
        mean=None,
        std=None,
    )
    dm = build_datamodule(cfg, batch_size=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    assert not digits().val_dataloader().persistent_workers


# ---------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_determinism():
    cfg = dict(name="synthetic", in_chans=3, image_size=24, num_classes=7, train_size=40, val_size=12)
    dm = build_datamodule(make_cfg(**cfg), batch_size=16, seed=0)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (7, 3, 24)
    dm.setup("fit")
    assert len(dm.train_dataset) == 40 and len(dm.val_dataset) == 12
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (12, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 7
    x_train, y_train = stack(dm.train_dataset)
    assert abs(x_train.mean().item()) < 0.05 and x_train.std().item() == pytest.approx(1.0, abs=0.05)

    again = build_datamodule(make_cfg(**cfg), batch_size=16, seed=0)
    again.setup("fit")
    assert torch.equal(stack(again.train_dataset)[0], x_train)
    assert torch.equal(stack(again.train_dataset)[1], y_train)
    other = build_datamodule(make_cfg(**cfg), batch_size=16, seed=1)
    other.setup("fit")
    assert not torch.equal(stack(other.train_dataset)[0], x_train)
    assert not torch.equal(stack(dm.val_dataset)[0][:12], x_train[:12])  # val differs from train


def test_example_batch_shape_and_determinism():
    dm = build_datamodule(make_cfg(name="synthetic", in_chans=3, image_size=20, num_classes=5), batch_size=4)
    x, y = dm.example_batch(6)  # before setup
    assert x.shape == (6, 3, 20, 20) and y.shape == (6,) and int(y.max()) < 5
    x2, y2 = dm.example_batch(6)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert build_datamodule(make_cfg(), batch_size=4).example_batch(2)[0].shape == (2, 1, 32, 32)


# ---------------------------------------------------------------- CIFAR


def _dump(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def write_cifar10(folder, n=20):
    """Tiny CIFAR-10 in the real layout: 5 train batches + test batch of ``n`` images; image k of each batch has
    label (k + batch) % 10. Returns the test batch data."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        _dump(
            os.path.join(folder, name),
            {"batch_label": name, "data": data, "labels": [(k + b) % 10 for k in range(n)], "filenames": []},
        )
    _dump(os.path.join(folder, "batches.meta"), {"label_names": [f"c{i}" for i in range(10)]})
    return data


def write_cifar100(folder, n_train=30, n_test=10):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        out[name] = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        _dump(
            os.path.join(folder, name),
            {
                "data": out[name],
                "fine_labels": [(3 * k) % 100 for k in range(n)],
                "coarse_labels": [k % 20 for k in range(n)],
            },
        )
    _dump(os.path.join(folder, "meta"), {"fine_label_names": [f"f{i}" for i in range(100)]})
    return out["test"]


def cifar_cfg(name, root, **kw):
    return make_cfg(
        name=name,
        root=None if root is None else str(root),
        in_chans=3,
        num_classes=10 if name == "cifar10" else 100,
        **kw,
    )


def test_cifar10_round_trip_labels_lengths(tmp_path):
    test_data = write_cifar10(tmp_path / "cifar-10-batches-py")
    dm = build_datamodule(cifar_cfg("cifar10", tmp_path), batch_size=8)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 3, 32)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 100 and len(dm.val_dataset) == 20
    x, y = dm.val_dataset[7]
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    expected = (torch.from_numpy(test_data[7]).view(3, 32, 32).float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6)
    assert int(y) == (7 + 5) % 10
    _, y_train = stack(dm.train_dataset)
    assert y_train[:20].tolist() == [k % 10 for k in range(20)] and y_train[20:40].tolist()[0] == 1
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert len(dm.train_dataloader()) == 12  # 100 // 8, last partial dropped
    assert dm.train_dataset.tensors[0].dtype == torch.uint8  # in memory as uint8, transformed per sample


def test_cifar_resized_values(tmp_path):
    test_data = write_cifar10(tmp_path / "cifar-10-batches-py")
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    raw = torch.from_numpy(test_data[3]).view(1, 3, 32, 32).float() / 255
    # the whole image resized (crop_pct 1.0), antialiased (PIL's kernels); bicubic: timm's default interpolation
    for size, interpolation in ((16, None), (48, None), (16, "bilinear"), (48, "bilinear")):
        dm = build_datamodule(cifar_cfg("cifar10", tmp_path, image_size=size, interpolation=interpolation),
                              batch_size=4)
        dm.setup("validate")
        mode = interpolation or "bicubic"
        ref = F.interpolate(raw, size=(size, size), mode=mode, align_corners=False, antialias=True)[0]
        assert torch.allclose(dm.val_dataset[3][0], (ref - mean) / std, atol=1e-5)
        assert (dm.preprocessing.crop_pct, dm.preprocessing.interpolation) == (1.0, mode)


def test_cifar_augment_is_a_padded_crop_and_flip(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    plain = build_datamodule(cifar_cfg("cifar10", tmp_path), batch_size=4)
    aug = build_datamodule(cifar_cfg("cifar10", tmp_path, augment=True), batch_size=4)
    plain.setup("fit")
    aug.setup("fit")
    torch.manual_seed(1)
    views = [aug.train_dataset[2][0] for _ in range(30)]
    background = [(0.0 - m) / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)]
    assert all(is_shift(v, plain.train_dataset[2][0], pad=4, fill=background, flips=(False, True)) for v in views)
    assert len({tuple(v.flatten()[:64].tolist()) for v in views}) > 5
    assert torch.equal(aug.val_dataset[2][0], plain.val_dataset[2][0])


def test_cifar10_resize_augment_and_default_root(tmp_path):
    write_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py")
    # root None -> data_dir/cifar10
    dm = build_datamodule(
        cifar_cfg("cifar10", None, image_size=16, augment=True), batch_size=4, data_dir=str(tmp_path)
    )
    dm.setup("fit")
    assert dm.root == str(tmp_path / "cifar10")
    assert dm.train_dataset[0][0].shape == (3, 16, 16) and dm.val_dataset[0][0].shape == (3, 16, 16)
    torch.manual_seed(0)
    views = torch.stack([dm.train_dataset[0][0] for _ in range(10)])
    assert (views - views[0]).abs().amax() > 0  # random crop / flip
    assert torch.equal(dm.val_dataset[0][0], dm.val_dataset[0][0])  # val deterministic
    # root may also be the extracted folder itself
    dm = build_datamodule(cifar_cfg("cifar10", tmp_path / "cifar10" / "cifar-10-batches-py"), batch_size=4)
    dm.setup("validate")
    assert len(dm.val_dataset) == 20 and dm.train_dataset is None
    # ... whatever its name
    write_cifar10(tmp_path / "my_cifar")
    dm = build_datamodule(cifar_cfg("cifar10", tmp_path / "my_cifar"), batch_size=4)
    dm.setup("fit")
    assert len(dm.train_dataset) == 100 and len(dm.val_dataset) == 20


def test_cifar_tiny_files_need_no_official_checksums(tmp_path):
    """torchvision's own class rejects anything but the official files (md5); the datamodule reads them."""
    import torchvision.datasets

    write_cifar10(tmp_path / "cifar-10-batches-py")
    with pytest.raises(RuntimeError, match="corrupted"):
        torchvision.datasets.CIFAR10(str(tmp_path), train=False)
    dm = build_datamodule(cifar_cfg("cifar10", tmp_path), batch_size=4)
    dm.setup("validate")
    assert len(dm.val_dataset) == 20
    # a damaged file fails when read
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    dm = build_datamodule(cifar_cfg("cifar10", tmp_path), batch_size=4)
    with pytest.raises(pickle.UnpicklingError):
        dm.setup("validate")


def test_cifar100_round_trip(tmp_path):
    test_data = write_cifar100(tmp_path / "cifar-100-python")
    dm = build_datamodule(cifar_cfg("cifar100", tmp_path), batch_size=5)
    assert dm.num_classes == 100 and dm.in_chans == 3
    dm.setup("fit")
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 10
    x, y = dm.val_dataset[4]
    mean, std = torch.tensor(CIFAR100_MEAN).view(3, 1, 1), torch.tensor(CIFAR100_STD).view(3, 1, 1)
    expected = (torch.from_numpy(test_data[4]).view(3, 32, 32).float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6)
    assert int(y) == 12
    assert stack(dm.val_dataset)[1].tolist() == [3 * k for k in range(10)]


def test_cifar_num_classes_and_chans_come_from_dataset(tmp_path):
    with pytest.warns(UserWarning, match="num_classes"):
        dm = build_datamodule(make_cfg(name="cifar100", root=str(tmp_path), in_chans=3), batch_size=4)
    assert dm.num_classes == 100
    with pytest.warns(UserWarning, match="in_chans"):
        dm = build_datamodule(make_cfg(name="cifar10", root=str(tmp_path), in_chans=1), batch_size=4)
    assert dm.in_chans == 3


def test_cifar_missing_files_error(tmp_path):
    root = tmp_path / "nowhere"
    dm = build_datamodule(cifar_cfg("cifar10", root), batch_size=4)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "dataset.root" in msg and str(root / "cifar-10-batches-py") in msg
    assert "dataset.download=true" in msg and "data_batch_1" in msg and "\n" not in msg
    write_cifar10(root / "cifar-10-batches-py")
    os.remove(root / "cifar-10-batches-py" / "batches.meta")  # part of what users download; torchvision reads it
    with pytest.raises(FileNotFoundError, match=r"\(missing batches\.meta\)"):
        dm.setup("fit")
    dm = build_datamodule(cifar_cfg("cifar100", root), batch_size=4)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        dm.prepare_data()


def test_cifar_download_only_when_asked(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_download(root, train=True, download=False):
        calls.append((root, download))
        write_cifar10(os.path.join(root, "cifar-10-batches-py"))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    dm = build_datamodule(cifar_cfg("cifar10", tmp_path, download=True), batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [(str(tmp_path), True)] and len(dm.val_dataset) == 20
    dm.prepare_data()  # files present: no second download
    assert len(calls) == 1

    def failing(root, train=True, download=False):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", failing)
    dm = build_datamodule(cifar_cfg("cifar100", tmp_path / "c100", download=True), batch_size=4)
    with pytest.raises(RuntimeError, match="download.*failed.*network unreachable"):
        dm.prepare_data()


# ---------------------------------------------------------------- ImageFolder


COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "owl": (0, 255, 0)}


def write_folder(root, splits=None):
    splits = splits or {"train": {"cat": 3, "dog": 3}, "val": {"cat": 2, "dog": 2}}
    for split, classes in splits.items():
        for cls, n in classes.items():
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for k in range(n):
                Image.new("RGB", (40 + k, 30), COLORS[cls]).save(os.path.join(root, split, cls, f"{k}.png"))


def test_imagefolder_shapes_labels_and_values(tmp_path):
    write_folder(tmp_path)
    dm = build_datamodule(
        make_cfg(name="imagenet", root=str(tmp_path), image_size=16, in_chans=3, num_classes=2), batch_size=4
    )
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (2, 3, 16) and dm.classes == ["cat", "dog"]
    dm.setup("fit")
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 4
    x, y = stack(dm.val_dataset)
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 1, 1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    red = ((torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1) - mean) / std).expand(3, 16, 16)
    blue = ((torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1) - mean) / std).expand(3, 16, 16)
    assert torch.allclose(x[0], red, atol=1e-5) and torch.allclose(x[3], blue, atol=1e-5)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 16, 16) and yb.dtype == torch.int64


def test_imagefolder_val_uses_train_class_indices_and_warns(tmp_path):
    write_folder(tmp_path, {"train": {"cat": 1, "dog": 1, "owl": 1}, "val": {"owl": 2}})
    with pytest.warns(UserWarning, match="num_classes"):
        dm = build_datamodule(
            make_cfg(name="imagenet", root=str(tmp_path), image_size=8, in_chans=3, augment=True),
            batch_size=2,
        )
    assert dm.num_classes == 3
    dm.setup("fit")
    assert stack(dm.val_dataset)[1].tolist() == [2, 2]
    assert dm.train_dataset[0][0].shape == (3, 8, 8)


def test_imagefolder_missing_errors(tmp_path):
    missing = tmp_path / "imnet"
    with pytest.raises(FileNotFoundError) as err:
        build_datamodule(make_cfg(name="imagenet", root=str(missing)), batch_size=2)
    assert "dataset.root" in str(err.value) and str(missing) in str(err.value)
    write_folder(tmp_path / "only_train", {"train": {"cat": 1}})
    with pytest.raises(FileNotFoundError) as err:
        build_datamodule(make_cfg(name="imagenet", root=str(tmp_path / "only_train")), batch_size=2)
    assert "dataset.root" in str(err.value) and str(tmp_path / "only_train" / "val") in str(err.value)
    with pytest.raises(FileNotFoundError, match="dataset.root"):  # root None -> data_dir/imagenet
        build_datamodule(make_cfg(name="imagenet"), batch_size=2, data_dir=str(tmp_path))


# ---------------------------------------------------------------- errors


def test_unknown_dataset_name():
    with pytest.raises(ValueError) as err:
        build_datamodule(make_cfg(name="mnist"), batch_size=2)
    msg = str(err.value)
    assert "dataset.name" in msg and "mnist" in msg
    for allowed in ("digits", "synthetic", "cifar10", "cifar100", "imagenet"):
        assert allowed in msg


def test_bad_stats_and_val_fraction():
    with pytest.raises(ValueError, match="dataset.mean"):
        digits(in_chans=3, mean=[0.1, 0.2], std=[1.0])
    with pytest.raises(ValueError, match="dataset.val_fraction"):
        build_datamodule(make_cfg(val_fraction=1.0), batch_size=2)


def test_calibration_images_come_from_the_training_split_seeded():
    """The calibration images are training images (by value and by index), never validation ones, and a seed
    picks the same ones again."""
    dm = DigitsDataModule(DatasetOptions(image_size=16, in_chans=1), batch_size=32, seed=3)
    batches = dm.calibration_batches(100, 32)
    assert [b.shape for b in batches] == [torch.Size([32, 1, 16, 16])] * 3 + [torch.Size([4, 1, 16, 16])]
    chosen = dm.train_indices[dm.calibration_indices.numpy()]
    assert not set(chosen) & set(dm.val_indices)
    train_x = dm.train_dataset.tensors[0]
    assert torch.equal(torch.cat(batches), train_x[dm.calibration_indices])
    val_x = dm.val_dataset.tensors[0].flatten(1)
    assert not (torch.cdist(torch.cat(batches).flatten(1), val_x) == 0).any()  # no validation image among them
    again = DigitsDataModule(DatasetOptions(image_size=16, in_chans=1), batch_size=32, seed=3)
    assert torch.equal(torch.cat(again.calibration_batches(100, 32)), torch.cat(batches))
    with pytest.raises(ValueError, match=r"rank\.calibration_images=5000"):
        dm.calibration_batches(5000)


def test_check_images_are_further_training_images_never_calibration_or_validation():
    dm = DigitsDataModule(DatasetOptions(image_size=16, in_chans=1), batch_size=32, seed=3)
    calibration = torch.cat(dm.calibration_batches(100, 32))
    held = dm.held_out_batches(50, skip=100, batch_size=32)
    assert [len(b) for b in held] == [32, 18]
    order = torch.randperm(len(dm.train_dataset), generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat(held), dm.train_dataset.tensors[0][order[100:150].sort().values])
    assert not (torch.cdist(torch.cat(held).flatten(1), calibration.flatten(1)) == 0).any()
    assert not set(order[100:150].tolist()) & set(dm.calibration_indices.tolist())
    assert sum(len(b) for b in dm.held_out_batches(500, skip=len(dm.train_dataset) - 20)) == 20  # what is left
    assert dm.held_out_batches(10, skip=len(dm.train_dataset)) == []


def test_every_allowed_dataset_name_has_a_datamodule():
    from lrd_exp.config.values import DATASETS as ALLOWED
    from lrd_exp.training.data import DATASETS

    assert DATASETS == ALLOWED


def test_digits_builds_through_the_base_setup_steps():
    """``setup("validate")`` builds only the validation split (Lightning's contract); both share one split."""
    dm = DigitsDataModule(DatasetOptions(image_size=16, in_chans=1), batch_size=32, seed=1)
    dm.setup("validate")
    assert dm.val_dataset is not None and dm.train_dataset is None
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 1797
    assert not set(dm.train_indices) & set(dm.val_indices)


# ---------------------------------------------------------------- the typed dataset node


def test_options_are_read_once_from_any_form_of_the_dataset_node():
    """A DictConfig (enums as their values), a mapping or a plain object give the same typed options; a null or
    missing key takes the default (image_size and root stay None: the model's size, <data_dir>/<name>)."""
    node = make_cfg(name="cifar10", in_chans=3, mean=[0.5], crop_mode="squash", interpolation="bicubic")
    options = DatasetOptions.from_config(node)
    assert options == DatasetOptions.from_config(OmegaConf.to_container(node, enum_to_str=True))
    assert options.crop_mode == "squash" and options.interpolation == "bicubic" and options.mean == (0.5,)
    assert options.image_size == 32 and options.root is None
    plain = DatasetOptions.from_config(SimpleNamespace(name="synthetic", image_size=None, train_size=40))
    assert (plain.name, plain.image_size, plain.train_size, plain.val_size) == ("synthetic", None, 40, 128)
    assert build_datamodule(options, batch_size=4, data_dir="nowhere").options is options  # taken as it is
    with pytest.raises(AttributeError):
        options.augment = True  # frozen: checked once, never changed after


@pytest.mark.parametrize("key,value,needles", [
    ("name", "mnist", ["dataset.name='mnist'", "digits, synthetic, cifar10, cifar100, imagenet"]),
    ("image_size", "big", ["dataset.image_size='big'", "image size in pixels"]),
    ("num_classes", 1, ["dataset.num_classes=1", ">= 2"]),
    ("in_chans", 0, ["dataset.in_chans=0", ">= 1"]),
    ("val_fraction", 0.0, ["dataset.val_fraction=0.0", "(0, 1)"]),
])
def test_a_bad_dataset_value_is_one_line_naming_key_value_and_allowed(key, value, needles):
    with pytest.raises(ValueError) as err:
        DatasetOptions.from_config({key: value})
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
