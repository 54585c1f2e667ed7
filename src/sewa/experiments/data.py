"""Real-data loaders for the image and text experiments (no downloads, no torchvision).

Every loader returns a dict ``{"train": (x, y), "val": (x, y), "test": (x, y), "classes": [...],
"source": str}``. Images are float32 tensors normalised with the train split's mean/std; text splits
hold lists of strings (turn them into tensors with :class:`Vocab`). Labels are int64 tensors.
``source`` says exactly which files were read and how they were split, for result tables.

The image loaders live here; the text loaders and vocabulary in :mod:`.data_text` and the split
helpers in :mod:`.splits`, all importable from this module.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .data_text import (
    AG_NEWS_CLASSES,
    Vocab,
    ag_news,
    bbc_news,
    encode_text_splits,
    ngrams,
    tokenize,
)
from .splits import Split, _split_named, batches, stratified_split

__all__ = ["AG_NEWS_CLASSES", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DEBIAN", "Split", "Vocab",
           "ag_news", "batches", "bbc_news", "cifar100", "encode_text_splits", "fashion_mnist",
           "fashion_mnist_raw", "ngrams", "read_idx", "stratified_split", "tokenize"]

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed when the name ends in ``.gz``.

    Header: two zero bytes, a dtype code, the number of dims, then each dim as big-endian int32.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape).astype(data.dtype.newbyteorder("="))


def fashion_mnist_raw(root: str | os.PathLike | None = None) -> dict[str, Split]:
    """Fashion-MNIST as stored: uint8 images N×28×28 and int64 labels, ``train`` and ``test``.

    Args:
        root: Folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``. Defaults to the
            ``SEWA_FASHION_MNIST`` environment variable, else the Debian package's folder.
    """
    root = Path(root or os.environ.get("SEWA_FASHION_MNIST") or FASHION_MNIST_DEBIAN)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        files = [root / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(
                    f"Fashion-MNIST file {file} not found. Install it with "
                    "`apt-get install -y dataset-fashion-mnist` (files land in "
                    f"{FASHION_MNIST_DEBIAN}) or set SEWA_FASHION_MNIST / pass root= to a folder "
                    "holding the four *-ubyte.gz files.")
        images, labels = (torch.from_numpy(read_idx(f)) for f in files)
        out[split] = (images, labels.long())
    return out


def _normalise(splits: dict[str, Split]) -> dict:
    """Scale uint8 N×C×H×W to [0, 1], standardise per channel with the train mean/std (returned)."""
    train = splits["train"][0].float().div_(255)
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True)
    out: dict = {k: ((x.float().div_(255) - mean) / std, y) for k, (x, y) in splits.items()}
    return {**out, "mean": mean.flatten(), "std": std.flatten()}


def fashion_mnist(root: str | os.PathLike | None = None, val_size: int = 5000,
                  seed: int = 0) -> dict:
    """Fashion-MNIST ready to batch: float32 N×1×28×28, normalised, with a stratified val split.

    Args:
        root: See :func:`fashion_mnist_raw`.
        val_size: Images of the 60k train split held out as validation (stratified, ``seed``).
        seed: Seed of the validation split.

    Returns:
        ``{"train", "val", "test"}`` as ``(images, labels)``, plus ``classes``, ``source`` and the
        per-channel ``mean``/``std`` (of pixels in [0, 1]) used to normalise.
    """
    raw = fashion_mnist_raw(root)
    x, y = raw["train"]
    splits = _split_named(x.unsqueeze(1), y, {"val": val_size, "train": len(y) - val_size}, seed)
    splits = _normalise({**splits, "test": (raw["test"][0].unsqueeze(1), raw["test"][1])})
    root = root or os.environ.get("SEWA_FASHION_MNIST") or FASHION_MNIST_DEBIAN
    return {**splits, "classes": FASHION_MNIST_CLASSES,
            "source": f"Fashion-MNIST from {root}: {len(y) - val_size} train / {val_size} val "
                      f"(stratified from the {len(y)} train images, seed {seed}) / "
                      f"{len(raw['test'][1])} test"}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays; plain dict/list/bytes/str/int need no lookup."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR file refers to {module}.{name}; only numpy "
                                         "arrays and plain containers are allowed")
        if module.startswith("numpy.core") and importlib.util.find_spec("numpy._core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 renamed the module
        return getattr(importlib.import_module(module), name)


def _load_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-100 file {path} not found. Pass root= pointing at the folder that holds "
            "`cifar-100-python/` (or that folder itself), as unpacked from cifar-100-python.tar.gz.")
    with open(path, "rb") as f:
        obj = _CifarUnpickler(f, encoding="bytes").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar100(root: str | os.PathLike, val_size: int = 5000, seed: int = 0,
             label: str = "fine") -> dict:
    """CIFAR-100 from a local ``cifar-100-python/{train,test,meta}`` folder (torchvision format).

    The files are Python pickles. They are read with a restricted unpickler that only rebuilds
    numpy arrays (and plain dicts/lists/bytes/str/int), so a tampered file cannot run code.

    Args:
        root: The ``cifar-100-python`` folder or its parent.
        val_size: Train images held out as validation (stratified, ``seed``).
        seed: Seed of the validation split.
        label: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).

    Returns:
        ``{"train", "val", "test"}`` as float32 N×3×32×32 images and int64 labels, plus ``classes``,
        ``source`` and ``mean``/``std`` as in :func:`fashion_mnist`.
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    root = Path(root)
    folder = root if (root / "train").is_file() else root / "cifar-100-python"
    splits = {}
    for split in ("train", "test"):
        obj = _load_cifar_pickle(folder / split)
        x = torch.from_numpy(np.asarray(obj["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        splits[split] = (x, torch.as_tensor(obj[f"{label}_labels"], dtype=torch.long))
    x, y = splits["train"]
    val_train = _split_named(x, y, {"val": val_size, "train": len(y) - val_size}, seed)
    splits = _normalise({**val_train, "test": splits["test"]})
    meta = folder / "meta"
    names = _load_cifar_pickle(meta).get(f"{label}_label_names") if meta.is_file() else None
    classes = [n.decode() if isinstance(n, bytes) else n for n in names or []]
    return {**splits, "classes": classes or [str(i) for i in range(int(y.max()) + 1)],
            "source": f"CIFAR-100 ({label} labels) from {folder}: {len(y) - val_size} train / "
                      f"{val_size} val (stratified, seed {seed}) / {len(splits['test'][1])} test"}
