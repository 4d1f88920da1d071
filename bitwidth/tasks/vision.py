"""torchvision models and data sets, adapted to the task's channels and classes.

Nothing here downloads unless asked: MNIST, FashionMNIST and CIFAR10 are read from a
local ``root`` (``download=True`` fetches them), ``FakeData`` is generated, and an
``ImageFolder`` is any local directory of class folders.

>>> m = torchvision_model("resnet18", in_channels=1, num_classes=3)
>>> m.conv1.in_channels, m.fc.out_features
(1, 3)
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from .base import DataSpec

__all__ = [
    "TORCHVISION_DATASETS",
    "ImageTensors",
    "check_torchvision_name",
    "load_fakedata",
    "load_imagefolder",
    "load_torchvision_dataset",
    "torchvision_model",
    "torchvision_model_names",
]

# name -> (torchvision class, per-channel mean, per-channel std) of the training split
TORCHVISION_DATASETS = {
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "fashionmnist": ("FashionMNIST", (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# Models whose auxiliary heads would make training return a tuple instead of logits.
_NO_AUX = {"inception_v3", "googlenet"}


def torchvision_model_names() -> list[str]:
    """Every torchvision classification model name.

    >>> "resnet18" in torchvision_model_names()
    True
    """
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def check_torchvision_name(name: str) -> None:
    """Raise ``ValueError`` with the closest names unless ``name`` is a torchvision classifier."""
    names = torchvision_model_names()
    if name not in names:
        close = ", ".join(difflib.get_close_matches(name, names, n=2)) or ", ".join(names[:5]) + ", …"
        raise ValueError(f"unknown torchvision model {name!r}; closest: {close} "
                         "(all: torchvision.models.list_models())")


def torchvision_model(
    name: str, in_channels: int = 3, num_classes: int = 10, image_size: Sequence[int] = (224, 224)
) -> nn.Module:
    """A randomly initialised torchvision classifier with its first convolution taking ``in_channels``.

    >>> torchvision_model("resnet81")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown torchvision model 'resnet81'; closest: resnet18, ...
    """
    import torchvision

    check_torchvision_name(name)
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name in _NO_AUX:
        kwargs.update(aux_logits=False, init_weights=True)
    if name.startswith("vit_"):
        kwargs["image_size"] = int(image_size[-1])
    model = torchvision.models.get_model(name, **kwargs)
    _adapt_input_channels(model, in_channels)
    return model


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            if conv.in_channels == in_channels:
                return
            new = nn.Conv2d(
                in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
                conv.dilation, 1, conv.bias is not None, conv.padding_mode,
            )
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
            return


class ImageTensors(Dataset):
    """uint8 images ``(N, C, H, W)`` kept in memory, normalised (and resized) a batch at a time."""

    def __init__(
        self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float],
        resize: int | None = None,
    ) -> None:
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean).reshape(1, -1, 1, 1)
        self.std = torch.tensor(std).reshape(1, -1, 1, 1)
        self.resize = resize

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x = self.images.index_select(0, idx).float().div_(255)  # (B, C, H, W) in [0, 1]
        if self.resize:
            x = TF.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std, self.labels.index_select(0, idx)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]


def _limit(data: Dataset, n: int | None) -> Dataset:
    """The first ``n`` items of a fixed permutation (sizes differ, the draw does not)."""
    if n is None or n >= len(data):  # type: ignore[arg-type]
        return data
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n]  # type: ignore[arg-type]
    if isinstance(data, ImageTensors):
        return ImageTensors(data.images[idx], data.labels[idx], data.mean.flatten().tolist(),
                            data.std.flatten().tolist(), data.resize)
    return Subset(data, idx.tolist())


def load_fakedata(
    size: int = 64, val_size: int = 32, image_size: Sequence[int] = (3, 32, 32), num_classes: int = 10
) -> DataSpec:
    """torchvision ``FakeData`` (random images, random labels), materialised as tensors.

    >>> d = load_fakedata(size=4, val_size=2, image_size=(1, 8, 8))
    >>> len(d.train), len(d.val), d.in_channels, d.image_size
    (4, 2, 1, (8, 8))
    """
    from torchvision.datasets import FakeData
    from torchvision.transforms import functional as VF

    shape = tuple(int(s) for s in image_size)
    if len(shape) != 3:
        raise ValueError(f"image_size is (channels, height, width), got {image_size!r}")

    def tensors(n: int, offset: int) -> TensorDataset:
        # A disjoint random_offset keeps validation images different from training images.
        ds = FakeData(n, shape, num_classes, random_offset=offset)
        items = [ds[i] for i in range(n)]
        x = torch.stack([VF.to_tensor(img) for img, _ in items]).sub_(0.5).div_(0.5)
        return TensorDataset(x, torch.tensor([int(lab) for _, lab in items]))

    info = {"data": "fakedata", "size": size, "val_size": val_size, "image_size": list(shape),
            "num_classes": num_classes}
    return DataSpec(tensors(size, 0), tensors(val_size, size), shape[0], num_classes, shape[1:], info)


def load_torchvision_dataset(
    name: str, root: str = "data", download: bool = False, train_size: int | None = None,
    val_size: int | None = None, resize: int | None = None,
) -> DataSpec:
    """MNIST, FashionMNIST or CIFAR10 from ``root``: the official train split and test split as validation."""
    import torchvision.datasets as D

    if name not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown torchvision data set {name!r}; allowed: {sorted(TORCHVISION_DATASETS)}")
    cls_name, mean, std = TORCHVISION_DATASETS[name]
    splits = []
    for train in (True, False):
        try:
            ds = getattr(D, cls_name)(root, train=train, download=download)
        except RuntimeError as err:  # torchvision says "Dataset not found" this way
            raise FileNotFoundError(
                f"{cls_name} not found under {str(Path(root).resolve())!r} ({err}); "
                "put it there or set the data option download=True"
            ) from None
        images = torch.as_tensor(ds.data)
        # MNIST stores (N, H, W); CIFAR stores (N, H, W, C).
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2).contiguous()
        splits.append(ImageTensors(images, torch.as_tensor(ds.targets), mean, std, resize))
    train_set, val_set = _limit(splits[0], train_size), _limit(splits[1], val_size)
    c, h, w = splits[0].images.shape[1:]
    size = (resize, resize) if resize else (h, w)
    info = {"data": name, "train_size": train_size, "val_size": val_size, "resize": resize}
    return DataSpec(train_set, val_set, c, len(ds.classes), size, info)


def load_imagefolder(path: str, image_size: int = 32, val_fraction: float = 0.25, split_seed: int = 0) -> DataSpec:
    """Class folders under ``path`` (RGB, resized to ``image_size``); ``path/train`` and
    ``path/val`` are used as the split when both exist, else a stratified seeded split."""
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder path {str(root)!r} is not a directory")
    tf = T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_set, val_set = ImageFolder(str(root / "train"), tf), ImageFolder(str(root / "val"), tf)
        classes = train_set.classes
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        from sklearn.model_selection import train_test_split

        full = ImageFolder(str(root), tf)
        idx = list(range(len(full)))
        stratify = full.targets if min(torch.tensor(full.targets).bincount().tolist()) >= 2 else None
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=split_seed, stratify=stratify)
        train_set, val_set, classes = Subset(full, tr), Subset(full, va), full.classes
    info = {"data": f"imagefolder:{root.resolve()}", "image_size": image_size, "val_fraction": val_fraction,
            "split_seed": split_seed, "classes": classes, "n_files": len(train_set) + len(val_set)}
    return DataSpec(train_set, val_set, 3, len(classes), (image_size, image_size), info)
