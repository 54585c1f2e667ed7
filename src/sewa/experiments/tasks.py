"""The paper's three task families on the real data available here, as small declarative specs.

Each :class:`Spec` says how to load the data, build the model, train it, and score a model.
Presets (``quick``/``full``) only change sizes; the code path is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as D
from . import models

Split = tuple[Any, Tensor]


@dataclass
class TaskData:
    """Loaded splits plus what the model and the scorer need to know."""

    train: Split
    val: Split
    test: Split
    source: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Spec:
    """One experiment: data, model, training and scoring settings.

    Attributes:
        family: ``image``, ``text`` or ``bc``.
        epochs: Training epochs; the last ``window · every`` optimizer steps are recorded.
        window: Snapshots kept for the main table (paper's k).
        record_window: Snapshots recorded (>= window; the window ablation uses the tail).
        every: Optimizer steps between snapshots.
        train_subset: Use only this many training items (None: all).
        ablations: Run the ablations by default (in the constant regime, seeds below ``ablation_seeds``:
            they cost about 15 minutes per text seed).
        warmup: Linear learning-rate warmup, as a fraction of all updates (every regime).
        regimes: The regimes of :mod:`sewa.experiments.schedules` the full study runs for this
            task (``sewa experiment --regime`` accepts any).
        draws: Random-K draws per seed (the random-K distribution; K = 10).
        curve_draws: Random draws per K for the K-curves' random-K mean at K other than 10.
        episodes: Rollouts behind a BC test score (:func:`sewa.experiments.bc_data.rollout_seeds`,
            disjoint from the data's collection seeds and from validation rollouts).
        judge_episodes: Validation rollouts behind each score of ``auto``'s judge (BC only; 0: no
            judge): auto checks its finalists on the return, which the selection split's MSE
            tracks poorly (:func:`bc_judge`).
        judge_finalists: How many of auto's candidates the judge scores (``auto(judge_finalists=...)``).
        reference: ``reference(spec, data, seed)`` -> ``{"name", "test_metric", "val_metric"}``: a
            simple strong model on the same split, shown beside the table (None: the loader's
            ``data.info["reference"]`` when it sets one).
        options: Loader options (``label_noise``: a fraction of training labels replaced at
            random, a disclosed variant only; ``vocab``; ``dataset`` and ``transitions`` for BC).
    """

    name: str
    family: str
    load: Callable[[dict[str, Any]], TaskData]
    build: Callable[[TaskData], nn.Module]
    loss: Callable[[Any, Tensor], Tensor]
    metric_name: str
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    window: int = 100
    record_window: int = 100
    every: int = 1
    train_subset: int | None = None
    eval_subset: int | None = None
    sel_subset: int | None = None
    eval_batch: int = 1000
    sel_batch: int = 256
    sel_steps: int = 200
    sel_samples: int = 4
    bn_batches: int = 50
    episodes: int = 10
    judge_episodes: int = 0
    judge_finalists: int = 4
    seeds: int = 3
    ablations: bool = False
    ablation_seeds: int = 5
    warmup: float = 0.0
    regimes: tuple[str, ...] = ("constant", "cosine")
    draws: int = 200
    curve_draws: int = 20
    reference: Callable[[Spec, TaskData, int], dict[str, Any]] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def with_preset(self, preset: str) -> Spec:
        """The spec shrunk for ``quick`` (a smoke run in minutes) or kept as is for ``full``."""
        if preset == "full":
            return self
        if preset != "quick":
            raise ValueError(f"unknown preset {preset!r}: use 'quick' or 'full'")
        return replace(self, epochs=2, window=20, record_window=24, every=1, train_subset=min(self.train_subset or 2000, 2000),
                       batch_size=min(self.batch_size, 64), eval_subset=500, sel_subset=min(self.sel_subset or 256, 256), sel_steps=30, sel_samples=2, bn_batches=5, episodes=2, judge_episodes=min(self.judge_episodes, 2), seeds=1,
                       draws=20, curve_draws=3,
                       options=self.options | {"quick": True, "transitions": 10_000})


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy (higher is better)."""
    return float((outputs.argmax(-1) == targets).float().mean())


def _noisy(y: Tensor, fraction: float, classes: int, seed: int) -> Tensor:
    if fraction <= 0:
        return y
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < fraction
    return torch.where(flip, torch.randint(0, classes, y.shape, generator=g), y)


def _subset(split: Split, n: int | None, seed: int) -> Split:
    x, y = split
    if n is None or n >= len(y):
        return split
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return (x[idx], y[idx])


# --------------------------------------------------------------------------- image
def _load_fashion(opts: dict[str, Any]) -> TaskData:
    d = D.fashion_mnist(opts.get("data_path"))
    train = _subset(d["train"], opts.get("train_subset"), 0)
    train = (train[0], _noisy(train[1], opts.get("label_noise", 0.0), 10, 1))
    return TaskData(train, d["val"], d["test"], d["source"], {"classes": 10, "channels": 1})


def _load_cifar100(opts: dict[str, Any]) -> TaskData:
    if not opts.get("data_path"):
        raise ValueError("cifar100 needs --data PATH: a folder holding cifar-100-python/ (the torchvision format)")
    d = D.cifar100(opts["data_path"])
    return TaskData(_subset(d["train"], opts.get("train_subset"), 0), d["val"], d["test"], d["source"], {"classes": 100, "channels": 3})


# --------------------------------------------------------------------------- text
def _load_text(loader: Callable[..., dict[str, Any]]) -> Callable[[dict[str, Any]], TaskData]:
    def load(opts: dict[str, Any]) -> TaskData:
        d = loader(opts["data_path"]) if opts.get("data_path") else loader()
        # Unigrams and bigrams seen at least twice in training, whole texts (fastText's recipe).
        enc, vocab = D.encode_text_splits(d, max_size=opts.get("vocab"), min_freq=2, max_len=None, ngram=2)
        train = _subset(enc["train"], opts.get("train_subset"), 0)
        train = (train[0], _noisy(train[1], opts.get("label_noise", 0.0), len(d["classes"]), 1))
        raw = {k: d[k] for k in ("train", "val", "test")}
        return TaskData(train, enc["val"], enc["test"], d["source"], {"classes": len(d["classes"]), "vocab": len(vocab), "texts": raw})

    return load


# --------------------------------------------------------------------------- behaviour cloning
def _load_bc(env: str) -> Callable[[dict[str, Any]], TaskData]:
    def load(opts: dict[str, Any]) -> TaskData:
        from . import mujoco_bc as bc

        kind = opts.get("dataset", "medium-expert")
        n = int(opts.get("transitions", 100_000))
        if opts.get("data_path"):
            raw = bc.load_d4rl_hdf5(opts["data_path"])
            source = f"D4RL hdf5 file {opts['data_path']}"
        else:
            raw = bc.make_dataset(env, kind, n, seed=0)
            source = (f"D4RL-style {env}-{kind}, {n} transitions generated here in MuJoCo ({bc.ENVS[env]}) "
                      "from the project's ARS policies (sewa/experiments/experts)")
        obs = torch.as_tensor(raw["observations"], dtype=torch.float32)
        act = torch.as_tensor(raw["actions"], dtype=torch.float32).clamp(-1, 1)
        val, test, train = _episode_split(raw, 0.05)
        mean, std = obs[train].mean(0), obs[train].std(0) + 1e-3
        obs = (obs - mean) / std
        tr = _subset((obs[train], act[train]), opts.get("train_subset"), 0)
        return TaskData(tr, (obs[val], act[val]), (obs[test], act[test]), source,
                        {"env": env, "kind": kind, "obs_mean": mean.numpy(), "obs_std": std.numpy(), "obs_dim": obs.shape[1],
                         "act_dim": act.shape[1], "split": "whole episodes: 5% of them validation, another 5% test (loss only)"})

    return load


def _episode_split(raw: dict[str, Any], fraction: float) -> tuple[Tensor, Tensor, Tensor]:
    """Transition indices of validation, test and training episodes: whole episodes (ended by a
    terminal or a time-out) drawn with seed 0 until each held-out split has ``fraction`` of the
    transitions, so that no held-out transition is a neighbour in time of a training one."""
    ends = torch.as_tensor(raw["terminals"], dtype=torch.bool) | torch.as_tensor(raw["timeouts"], dtype=torch.bool)
    episode = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1].long().cumsum(0)])
    count = int(episode[-1]) + 1
    if count < 3:
        raise ValueError(f"BC data holds {count} episode(s): whole-episode validation and test splits need at least 3")
    sizes = torch.bincount(episode, minlength=count)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0)).tolist()
    target, held, role = fraction * len(episode), [0.0, 0.0], torch.full((count,), 2, dtype=torch.long)
    for e in order:  # validation first, then test, then training
        r = 0 if held[0] < target else 1 if held[1] < target else 2
        role[e] = r
        if r < 2:
            held[r] += float(sizes[e])
    of = role[episode]
    return tuple((of == r).nonzero().flatten() for r in (0, 1, 2))  # type: ignore[return-value]


_REFERENCES: dict[str, dict[str, Any]] = {}


def _fit_once(key: str, fit: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A reference is the same for every seed of a split: fitted once per process, copied out."""
    if key not in _REFERENCES:
        _REFERENCES[key] = fit()
    return dict(_REFERENCES[key])


def text_reference(spec: Spec, data: TaskData, seed: int) -> dict[str, Any]:
    """Naive Bayes or logistic regression (the better on validation) on the run's own text splits
    (all training texts, also where the network trains on a subset)."""
    from .references import text_reference as fit

    return _fit_once(data.source, lambda: fit(**data.info["texts"]))


def image_reference(spec: Spec, data: TaskData, seed: int) -> dict[str, Any]:
    """Logistic regression on the pixels of the run's own image splits (fitted once per process)."""
    from .references import pixel_logistic_regression

    return _fit_once(f"{data.source} ({len(data.train[1])} training images)",
                     lambda: pixel_logistic_regression(data.train, data.val, data.test))


def bc_reference(spec: Spec, data: TaskData, seed: int) -> dict[str, Any]:
    """The data's own medium behaviour policy, rolled out on the test seeds of :func:`bc_score`."""
    from .references import behaviour_policy

    return behaviour_policy(data.info["env"], "medium", test_episodes=spec.episodes, val_episodes=0, run_seed=seed)


def bc_score(model: nn.Module, data: TaskData, episodes: int, seed: int) -> dict[str, Any]:
    """Mean return over ``episodes`` test rollouts in MuJoCo (reset seeds of
    :func:`sewa.experiments.bc_data.rollout_seeds`, disjoint from the data's and from validation's),
    and its D4RL-normalised score."""
    from . import bc_data
    from . import mujoco_bc as bc

    act = bc.torch_act_fn(model.eval(), data.info["obs_mean"], data.info["obs_std"])
    seeds = bc_data.rollout_seeds("test", episodes, seed)
    out = bc_data.evaluate_seeds(data.info["env"], act, seeds)
    return {"return": out["mean"], "return_std": out["std"], "normalized_score": out["normalized_score"],
            "rollout_seeds": [seeds[0], seeds[-1]]}


def bc_judge(data: TaskData, episodes: int, seed: int) -> Callable[[nn.Module], list[float]]:
    """``auto``'s judge for BC: the D4RL-normalised return of each of ``episodes`` validation
    rollouts (reset seeds of :func:`sewa.experiments.bc_data.rollout_seeds`, the same on every
    call and disjoint from the test rollouts)."""
    from . import bc_data
    from . import mujoco_bc as bc

    seeds = bc_data.rollout_seeds("val", episodes, seed)

    def judge(model: nn.Module) -> list[float]:
        act = bc.torch_act_fn(model.eval(), data.info["obs_mean"], data.info["obs_std"])
        returns = bc_data.evaluate_seeds(data.info["env"], act, seeds)["returns"]
        return [bc.normalized_score(data.info["env"], float(r)) for r in returns]

    return judge


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.mse_loss(outputs, targets)


# Settings shared by a family, then each task's own: change a family's training here in one place.
# Seeds: >= 10 for text and BC, >= 5 for image (issue 14). Label noise is off in the main tables.
# fastText-style models with AdamW reach the references on these splits (AG News 87.0%, BBC News
# 91.6% for the last iterate under cosine decay, 5 seeds, against naive Bayes 87.3% and 90.8%).
TEXT: dict[str, Any] = {"epochs": 6, "lr": 1e-2, "optimizer": "adamw", "weight_decay": 0.1, "batch_size": 32, "window": 100,
                        "every": 4, "seeds": 10, "sel_steps": 100, "regimes": ("constant", "cosine", "wsd", "unstable-shard"),
                        "reference": text_reference}
# Image: a small CNN without BatchNorm (models.small_cnn, 207k parameters) on all 55k training
# images, 10 epochs of SGD at batch 128 (4,300 updates, ~10 s per epoch on one core here). A snapshot
# every 10 updates, window 100 = the last 1,000 updates (2.3 epochs): under cosine, LR 12% -> 0.
# ResNet-8 would take ~100 s per epoch and ~1 s per 1,000 images evaluated: the per-snapshot,
# random-K and K-curve evaluations (~300 averages of 15k images per seed) would not fit the budget.
IMAGE: dict[str, Any] = {"epochs": 10, "lr": 0.05, "batch_size": 128, "window": 100, "record_window": 100, "every": 10,
                         "seeds": 5, "sel_steps": 100, "sel_batch": 256, "sel_subset": 1024, "eval_batch": 500, "draws": 100,
                         "curve_draws": 10, "regimes": ("constant", "cosine"), "reference": image_reference}
# BC: about 20k Adam steps (58 epochs of ~348 batches of 256 on the ~89k training transitions of
# 100k), a snapshot every 50 steps, window 100 = the last 5,000 steps (issue 14; it had 1,400 steps).
# LR 3e-3: on hopper under cosine (seeds 0 and 1) it beat 1e-3 in validation MSE by ~10% and in
# test return (last iterate 40.2/40.3 against 38.8/39.9 normalised) at the same cost.
# Window: constant = a tail at the full LR 3e-3; cosine = the last quarter of the decay, LR 14% -> 0.
BC: dict[str, Any] = {"epochs": 58, "lr": 3e-3, "optimizer": "adam", "weight_decay": 0.0, "batch_size": 256, "window": 100,
                      "record_window": 100, "every": 50, "seeds": 10, "sel_batch": 1024, "episodes": 50,
                      "judge_episodes": 8, "regimes": ("constant", "cosine"), "reference": bc_reference}


def _text_model(d: TaskData) -> nn.Module:
    return models.fasttext(d.info["vocab"], d.info["classes"], embed_dim=64, dropout=0.5)


def _bc_model(d: TaskData) -> nn.Module:
    return models.bc_mlp(d.info["obs_dim"], d.info["act_dim"])


SPECS: dict[str, Spec] = {
    "fashion_mnist": Spec("fashion_mnist", "image", _load_fashion, lambda d: models.small_cnn(10, 1), F.cross_entropy, "accuracy",
                          **IMAGE),
    "cifar100": Spec("cifar100", "image", _load_cifar100, lambda d: models.resnet8(100, 3), F.cross_entropy, "accuracy",
                     **IMAGE | {"epochs": 30, "lr": 0.1, "eval_batch": 1000}),
    "ag_news": Spec("ag_news", "text", _load_text(D.ag_news), _text_model, F.cross_entropy, "accuracy",
                    **TEXT | {"record_window": 200, "ablations": True}),
    "bbc_news": Spec("bbc_news", "text", _load_text(D.bbc_news), _text_model, F.cross_entropy, "accuracy",
                     **TEXT | {"epochs": 30, "lr": 3e-2, "record_window": 100, "every": 2}),
}
# halfcheetah is not in the study: its linear ARS expert (92 iterations, 18 minutes of training here;
# experts/README.md) scores only 25 normalised, under the 40 issue 14 asks, and a stronger one was not
# trained here. Its data, policies and expert_bc_check stay in mujoco_bc / bc_data: add it back here
# once it has a stronger expert.
for _env in ("hopper", "walker2d"):
    SPECS[_env] = Spec(_env, "bc", _load_bc(_env), _bc_model, _mse, "normalized_score", **BC)


def loader(split: Split, batch_size: int, shuffle: bool, seed: int) -> Iterator[Split]:
    """``(inputs, targets)`` mini-batches of a split."""
    return D.batches(split[0], split[1], batch_size, shuffle=shuffle, seed=seed)


def evaluate(model: nn.Module, split: Split, loss: Callable[[Any, Tensor], Tensor], batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy-style metric over a split (weighted by batch size)."""
    model.eval()
    total, correct, count = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in loader(split, batch_size, False, 0):
            out = model(x)
            total += float(loss(out, y)) * len(y)
            if out.dim() == 2 and y.dtype == torch.long:
                correct += float((out.argmax(-1) == y).float().sum())
            count += len(y)
    return total / count, (correct / count if correct or count else float("nan"))


def describe(spec: Spec) -> dict[str, Any]:
    """The JSON-ready settings of a spec."""
    skip = {"load", "build", "loss", "reference"}
    return {k: v for k, v in vars(spec).items() if k not in skip} | {
        "loss": getattr(spec.loss, "__name__", str(spec.loss)),
        "reference": None if spec.reference is None else getattr(spec.reference, "__name__", str(spec.reference))}


