"""``sewa demo``: noisy training on a real dataset, then every averaging method on its final stage.

The data is scikit-learn's bundled ``load_digits`` (1797 8x8 handwritten digits, no download),
split once into train/val/test. A small MLP is trained with SGD on the train split, where a
fraction of the labels has been replaced by random ones, at a constant learning rate chosen high
on purpose: the last iterate keeps bouncing around, so which checkpoints get averaged matters.
The last ``window`` snapshots (one every ``every`` steps) are then handed to
:func:`sewa.compare.run_compare`, which runs every registered method, selects on val, and
evaluates on the clean test split.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .compare import FORMAT, environment, run_compare
from .methods import DEFAULT_METHODS
from .report import summarise
from .task import Task
from .trajectory import Trajectory

__all__ = ["DemoConfig", "digits", "run_demo", "train_run"]

Split = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (the defaults are the documented demo; :meth:`fast` is for tests).

    Attributes:
        seeds: Runs, with seeds ``0..seeds-1`` (model initialisation, batch order, SeWA noise).
        epochs: Training epochs.
        window: Snapshots recorded at the end of training (paper's ``k``).
        every: Training steps between two recorded snapshots.
        top_k: ``K`` for LAWA, random-K and SeWA.
        lr: Constant SGD learning rate (high on purpose: a noisy last iterate).
        momentum: SGD momentum.
        label_noise: Fraction of training labels replaced by a uniformly random class.
        batch_size: Training batch size.
        hidden: Width of the MLP's two hidden layers.
        select_steps: SeWA selection steps.
        samples: SeWA mask samples per step (``M``).
        val_size: Examples in the val split (selection; clean labels).
        test_size: Examples in the test split (evaluation; clean labels).
        data_seed: Seed of the split and of the label noise (fixed across runs).
    """

    seeds: int = 3
    epochs: int = 30
    window: int = 60
    every: int = 4
    top_k: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    label_noise: float = 0.2
    batch_size: int = 32
    hidden: int = 128
    select_steps: int = 200
    samples: int = 4
    val_size: int = 300
    test_size: int = 497
    data_seed: int = 0

    @classmethod
    def fast(cls, **changes: Any) -> DemoConfig:
        """A quick version for tests and smoke runs: shorter training, a smaller window."""
        return replace(cls(seeds=1, epochs=8, window=20, every=2, top_k=5, select_steps=40), **changes)

    def check(self) -> None:
        """Raises ``ValueError`` for settings the demo cannot run with."""
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if self.window < 2:
            raise ValueError(f"--window must be at least 2, got {self.window}")
        if not 1 <= self.top_k <= self.window:
            raise ValueError(f"--top-k must lie in [1, window={self.window}], got {self.top_k}")
        steps_per_epoch = -(-(1797 - self.val_size - self.test_size) // self.batch_size)
        if self.window * self.every > self.epochs * steps_per_epoch:
            raise ValueError(f"window {self.window} x every {self.every} steps exceeds the {self.epochs * steps_per_epoch} training steps")


def digits(label_noise: float, seed: int = 0, val_size: int = 300, test_size: int = 497) -> dict[str, Any]:
    """``load_digits`` split into train/val/test, standardised with train statistics, with
    ``label_noise`` of the train labels replaced by uniformly random classes (val and test clean)."""
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y_np))
    test_idx, val_idx, train_idx = order[:test_size], order[test_size : test_size + val_size], order[test_size + val_size :]
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.long)
    mean, std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-3
    x = (x - mean) / std
    y_train = y[train_idx].clone()
    flip = torch.from_numpy(rng.random(len(train_idx)) < label_noise)
    y_train[flip] = torch.from_numpy(rng.integers(0, 10, int(flip.sum()))).long()
    return {
        "train": (x[train_idx], y_train),
        "val": (x[val_idx], y[val_idx]),
        "test": (x[test_idx], y[test_idx]),
        "corrupted": int((y_train != y[train_idx]).sum()),
    }


def make_model(hidden: int) -> nn.Module:
    """The demo's MLP: 64 -> hidden -> hidden -> 10 with ReLU."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    """Fraction of correct argmax predictions."""
    return float((outputs.argmax(dim=1) == targets).float().mean())


def _chunks(split: Split, size: int) -> list[Split]:
    x, y = split
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def demo_task(data: dict[str, Any], config: DemoConfig) -> Task:
    """The demo as a :class:`~sewa.task.Task` (so it runs through the same code as ``compare``)."""
    held = {"train": _chunks(data["train"], 256), "val": _chunks(data["val"], 100), "test": _chunks(data["test"], 500)}
    return Task(model=lambda: make_model(config.hidden), batches=held.__getitem__, loss=nn.functional.cross_entropy,
                metric=accuracy, source="sewa.demo (scikit-learn load_digits)", metric_name="accuracy")


def _batches(split: Split, size: int, gen: torch.Generator) -> Iterator[Split]:
    x, y = split
    perm = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), size):
        idx = perm[i : i + size]
        yield x[idx], y[idx]


def train_run(data: dict[str, Any], config: DemoConfig, seed: int, progress: bool | None = False) -> tuple[Trajectory, dict[str, Any]]:
    """Trains one MLP with SGD and records the final stage.

    Returns:
        The trajectory of the last ``window`` snapshots and training facts (seconds per
        epoch, final training loss).
    """
    with torch.random.fork_rng():  # initialisation from ``seed``, leaving the caller's RNG alone
        torch.manual_seed(seed)
        model = make_model(config.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(data["train"][1]) // config.batch_size)
    total = config.epochs * steps_per_epoch
    first_recorded = total - (config.window - 1) * config.every
    traj = Trajectory(model, config.window)
    epoch_seconds: list[float] = []
    step, loss = 0, float("nan")
    bar = _bar(config.epochs, progress, f"training (seed {seed})")
    for _ in range(config.epochs):
        start = time.perf_counter()
        for x, y in _batches(data["train"], config.batch_size, gen):
            out = model(x)
            batch_loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            step += 1
            value = float(batch_loss.detach())
            loss = 0.9 * loss + 0.1 * value if loss == loss else value  # smoothed for the progress bar
            if step >= first_recorded and (total - step) % config.every == 0:
                traj.push(model, step)
        epoch_seconds.append(time.perf_counter() - start)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
    if bar is not None:
        bar.close()
    return traj, {"total_steps": total, "steps_per_epoch": steps_per_epoch, "epoch_seconds": float(np.median(epoch_seconds)),
                  "train_seconds": float(sum(epoch_seconds)), "final_train_loss": loss}


def _bar(total: int, enabled: bool | None, desc: str) -> Any:
    if enabled is False:
        return None
    from tqdm.auto import tqdm

    # None: a bar only where a person watches (a terminal), never into a log file.
    return tqdm(total=total, desc=desc, leave=False, unit="epoch", disable=None if enabled is None else not enabled)


def run_demo(config: DemoConfig, progress: bool | None = False) -> dict[str, Any]:
    """Runs the demo for seeds ``0..config.seeds-1``.

    Returns:
        A results dict with one run per seed (each in the ``sewa compare`` format, plus its
        ``training`` facts), the data and training settings, the reasons for them, and SeWA's
        selection time as a fraction of one training epoch.
    """
    config.check()
    threads = torch.get_num_threads()
    # The model is tiny: extra intra-op threads cost more in synchronisation than they save.
    torch.set_num_threads(1)
    try:
        return _run_demo(config, progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig, progress: bool | None) -> dict[str, Any]:
    start = time.perf_counter()
    data = digits(config.label_noise, config.data_seed, config.val_size, config.test_size)
    task = demo_task(data, config)
    runs = []
    for seed in range(config.seeds):
        traj, facts = train_run(data, config, seed, progress)
        run = run_compare(traj, task, methods=DEFAULT_METHODS, top_k=config.top_k, seed=seed, objective="val",
                          samples=config.samples, steps=config.select_steps, progress=progress)
        sewa_seconds = run["methods"]["sewa"]["seconds"]
        facts["sewa_fraction_of_epoch"] = sewa_seconds / facts["epoch_seconds"]
        run["training"] = facts
        run.pop("environment")
        runs.append(run)
    epoch = float(np.mean([r["training"]["epoch_seconds"] for r in runs]))
    sewa = float(np.mean([r["methods"]["sewa"]["seconds"] for r in runs]))
    n_train = len(data["train"][1])
    results: dict[str, Any] = {
        "format": FORMAT,
        "command": "demo",
        "title": "sewa demo: checkpoint averaging on noisy digits training",
        "description": (
            f"A {config.hidden}-{config.hidden} MLP is trained on scikit-learn's digits with {config.label_noise:.0%} of the "
            f"training labels randomised, by SGD at a constant, deliberately high learning rate. The last "
            f"{config.window} snapshots (one every {config.every} steps) are averaged by every method; "
            "SeWA and greedy soup select on the clean val split, and every averaged model is evaluated on the clean test split."),
        "task": task.source,
        "metric_name": "accuracy",
        "split": "test",
        "data": {
            "dataset": "scikit-learn load_digits (1797 8x8 grey images, 10 classes; bundled, no download)",
            "splits": f"train {n_train}, val {config.val_size}, test {config.test_size} (one random split, seed {config.data_seed})",
            "label noise": f"{data['corrupted']} of {n_train} training labels ({data['corrupted'] / n_train:.1%}) differ from the truth "
                           f"after replacing {config.label_noise:.0%} by uniformly random classes; val and test are clean",
            "inputs": "standardised with the training split's per-pixel mean and std",
        },
        "training": {
            "model": f"MLP 64-{config.hidden}-{config.hidden}-10, ReLU",
            "optimizer": f"SGD, constant lr {config.lr}, momentum {config.momentum}, batch {config.batch_size}, {config.epochs} epochs "
                         f"({runs[0]['training']['total_steps']} steps)",
            "recorded": f"the last {config.window} snapshots, one every {config.every} steps (steps "
                        f"{runs[0]['checkpoint_steps'][0]} to {runs[0]['checkpoint_steps'][-1]})",
            "selection": f"SeWA top-{config.top_k} of {config.window}, {config.samples} mask samples x {config.select_steps} steps on val",
        },
        "notes": [
            f"Learning rate {config.lr} with momentum {config.momentum} is high for this model and kept constant (no decay), "
            "so the last iterate keeps moving: single checkpoints differ by several points of accuracy, and averaging matters.",
            f"{config.label_noise:.0%} label noise makes the gradient noise large and lets the network memorise wrong labels "
            "late in training; clean val/test splits show which averages generalise.",
        ],
        "config": asdict(config),
        "seeds": list(range(config.seeds)),
        "runs": runs,
        "summary": summarise({"runs": runs}),
        "selection_time": {
            "SeWA selection seconds (mean over runs)": round(sewa, 3),
            "one training epoch, seconds (median per run, mean over runs)": round(epoch, 4),
            "SeWA selection / one epoch": round(sewa / epoch, 2),
            "note": (f"an epoch here is {runs[0]['training']['steps_per_epoch']} SGD steps of batch {config.batch_size}; "
                     f"SeWA runs {config.select_steps} steps x {config.samples} forward/backward passes on val batches of 100"),
        },
        "sewa_fraction_of_epoch": sewa / epoch,
        "environment": environment(),
    }
    results["seconds"] = time.perf_counter() - start
    return results
