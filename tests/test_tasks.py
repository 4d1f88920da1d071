"""Tasks: the digits data and models, make_task's names and options, torchvision and user tasks."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from bitwidth.tasks import Task, load_data, load_digits_split, make_task
from bitwidth.tasks.models import digits_cnn, digits_mlp


@pytest.fixture(autouse=True)
def _user_module_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


# ----------------------------------------------------------------------------- digits data and models

def test_digits_split_is_normalised_stratified_and_seeded():
    xt, yt, xv, yv = load_digits_split()
    assert xt.shape == (1347, 1, 8, 8) and xv.shape == (450, 1, 8, 8) and xt.dtype == torch.float32
    assert abs(float(xt.mean())) < 1e-5 and abs(float(xt.std()) - 1) < 1e-4
    # Stratified: every class is in validation in proportion (each has 174-183 images in all).
    assert yv.bincount().min() >= 43 and yv.bincount().max() <= 46
    again = load_digits_split()
    assert all(torch.equal(a, b) for a, b in zip((xt, yt, xv, yv), again, strict=True))
    assert not torch.equal(load_digits_split(seed=1)[1], yt)


def test_digits_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits_split(val_fraction=1.5)


@pytest.mark.parametrize("build, layers", [(digits_mlp, ["fc1", "fc2", "fc3"]),
                                           (digits_cnn, ["conv1", "conv2", "fc1", "fc2"])])
def test_digits_models(build, layers):
    model = build()
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert names == layers


# ----------------------------------------------------------------------------- the Task contract

@pytest.fixture(scope="module")
def task():
    return make_task("digits_mlp", batch_size=100)


def test_build_model_is_seeded(task):
    a, b, c = task.build_model(3), task.build_model(3), task.build_model(4)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_train_batches_order_depends_on_seed_and_epoch_only(task):
    def labels(seed, epoch):
        return torch.cat([y for _, y in task.train_batches(seed, epoch)])

    assert torch.equal(labels(0, 1), labels(0, 1))
    assert not torch.equal(labels(0, 0), labels(0, 1)) and not torch.equal(labels(0, 0), labels(1, 0))
    assert torch.equal(labels(0, 0).sort().values, labels(1, 2).sort().values)  # every sample, once
    sizes = [len(y) for _, y in task.train_batches(0, 0, batch_size=500)]
    assert sizes == [500, 500, 347]


def test_val_calib_and_example_input(task):
    assert sum(len(y) for _, y in task.val_batches()) == 450
    calib = task.calib_batches(2)
    assert len(calib) == 2 and calib[0][0].shape == (100, 1, 8, 8)
    assert torch.equal(calib[0][0], task.calib_batches(2)[0][0])
    assert task.example_input().shape == (1, 1, 8, 8)


def test_fingerprint_is_json_and_changes_with_what_matters(task):
    fp = task.fingerprint()
    assert json.loads(json.dumps(fp)) == fp
    assert make_task("digits_mlp", batch_size=100).fingerprint() == fp
    assert make_task("digits_cnn", batch_size=100).fingerprint() != fp
    assert make_task("digits_mlp", batch_size=100, val_fraction=0.2).fingerprint() != fp
    assert make_task("digits_mlp", batch_size=64).fingerprint() != fp


# ----------------------------------------------------------------------------- bad names and options

@pytest.mark.parametrize("kwargs, match", [
    ({"model": "digits_rnn"}, "allowed: digits_mlp, digits_cnn, torchvision:<name>"),
    ({"model": "torchvision:resnet81"}, "closest: resnet18"),
    ({"model": "torchvision:"}, "allowed"),
    ({"data": "svhn"}, "allowed: digits, fakedata, mnist"),
    ({"data": "imagefolder:"}, "allowed"),
    ({"colour": "red"}, r"unknown option\(s\) \['colour'\].*allowed: \['split_seed', 'val_fraction'\]"),
    ({"model": "no_such_module_xyz:build"}, "cannot import"),
    ({"model": "user_task_example:nothing"}, "has no attribute"),
    ({"model": "user_task_example:not_a_task"}, "returned a int"),
    ({"model": "user_task_example:build_task", "colour": 1}, "accepted neither"),
])
def test_bad_names_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_task(**kwargs)


def test_missing_local_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        make_task("digits_cnn", "mnist", root=str(tmp_path))


# ----------------------------------------------------------------------------- user tasks by import path

def test_user_callable_returning_a_task():
    task = make_task("user_task_example:build_task", hidden=12)
    assert task.name == "user-digits-12" and task.batch_size == 64
    assert task.build_model(0).body[1].out_features == 12
    assert make_task("user_task_example:build_task", batch_size=8).batch_size == 8


def test_user_model_class_gets_the_data_shape():
    task = make_task("user_task_example:TinyNet", "fakedata", size=8, val_size=4, image_size=(3, 4, 4),
                     num_classes=3, hidden=5)
    model = task.build_model(0)
    assert model(task.example_input()).shape == (1, 3)
    assert task.fingerprint()["source"] != "unknown"
    assert torch.equal(model.body[1].weight, task.build_model(0).body[1].weight)


def test_user_model_with_its_own_data():
    task = make_task("user_task_example:model_and_data")
    assert task.fingerprint()["n_train"] == 256
    a, b = task.build_model(1), task.build_model(2)
    assert not torch.equal(a.body[1].weight, b.body[1].weight)  # re-initialised per seed
    assert torch.equal(a.body[1].weight, task.build_model(1).body[1].weight)


def test_user_task_from_a_file_path():
    path = Path(__file__).parent / "user_task_example.py"
    assert make_task(f"{path}:build_task").name == "user-digits-16"


@pytest.mark.parametrize("model, data, options", [
    ("digits_cnn", "digits", {}),
    ("torchvision:resnet18", "fakedata", {"size": 2, "val_size": 2, "image_size": (1, 8, 8)}),
    ("user_task_example:build_task", "digits", {}),
    ("user_task_example:TinyNet", "digits", {}),
    ("user_task_example:model_and_data", "digits", {}),
    (f"{Path(__file__).parent / 'user_task_example.py'}:TinyNet", "digits", {}),
])
def test_tasks_pickle_for_process_pools(model, data, options):
    task = make_task(model, data, **options)
    clone = pickle.loads(pickle.dumps(task))
    assert clone.fingerprint() == task.fingerprint()
    a, b = task.build_model(5).state_dict(), clone.build_model(5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- torchvision

def test_torchvision_model_adapts_channels_and_classes():
    task = make_task("torchvision:resnet18", "fakedata", size=4, val_size=2, image_size=(1, 16, 16), num_classes=3)
    model = task.build_model(0)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 3
    assert model.eval()(task.example_input()).shape == (1, 3)


def test_fakedata_is_deterministic_and_train_differs_from_val():
    a = load_data("fakedata", size=4, val_size=4, image_size=(1, 8, 8))
    b = load_data("fakedata", size=4, val_size=4, image_size=(1, 8, 8))
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], a.val.tensors[0])


def _write_idx(path: Path, data: torch.Tensor) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, data.dim()) + b"".join(struct.pack(">I", s) for s in data.shape)
    path.write_bytes(header + data.to(torch.uint8).numpy().tobytes())


def test_mnist_from_a_local_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=gen))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", torch.arange(n) % 10)
    task = make_task("digits_cnn", "mnist", root=str(tmp_path), train_size=12, batch_size=4)
    assert task.fingerprint()["n_train"] == 12 and task.fingerprint()["n_val"] == 10
    x, y = next(iter(task.train_batches(0, 0)))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    assert task.build_model(0)(x).shape == (4, 10)


def test_imagefolder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog", "eel"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.new("RGB", (10, 12), (60 * i, 100, 200)).save(tmp_path / cls / f"{i}.png")
    task = make_task("digits_mlp", f"imagefolder:{tmp_path}", image_size=6, val_fraction=0.25)
    assert isinstance(task, Task) and task.fingerprint()["classes"] == ["cat", "dog", "eel"]
    x, y = next(iter(task.val_batches()))
    assert x.shape == (3, 3, 6, 6) and sorted(y.tolist()) == [0, 1, 2]
    assert task.build_model(0)(x).shape == (3, 3)


def test_cifar10_from_a_local_root(tmp_path, monkeypatch):
    """torchvision's CIFAR-10 layout (pickled batches); only its md5 checks are waived for the fake files."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    gen = torch.Generator().manual_seed(0)
    # The first image is pure red: channel 0 at 255, the others 0 (data is (N, 3*32*32), channel-major).
    for name, n in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 4)]:
        data = torch.randint(0, 256, (n, 3 * 32 * 32), generator=gen, dtype=torch.uint8)
        data[0] = torch.cat([torch.full((1024,), 255), torch.zeros(2048)]).to(torch.uint8)
        with open(base / name, "wb") as f:
            pickle.dump({"data": data.numpy(), "labels": [i % 10 for i in range(n)]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    task = make_task("torchvision:resnet18", "cifar10", root=str(tmp_path), train_size=12, batch_size=4)
    assert task.fingerprint()["n_train"] == 12 and task.fingerprint()["n_val"] == 4
    x, y = next(iter(task.val_batches()))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 2, 3]
    # Normalised per channel with CIFAR-10's mean and std: red is (1 - 0.4914) / 0.2470 in channel 0 only.
    assert x[0, 0].allclose(torch.tensor((1 - 0.4914) / 0.2470)) and x[0, 1].allclose(torch.tensor(-0.4822 / 0.2435))
    assert task.build_model(0)(x).shape == (4, 10)
    resized = make_task("digits_cnn", "cifar10", root=str(tmp_path), resize=16, val_size=2)
    assert next(iter(resized.val_batches()))[0].shape[1:] == (3, 16, 16)
