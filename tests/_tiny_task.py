"""A tiny task file and checkpoints for the CLI tests (written into a temporary folder).

The task is a 2-class problem on 4 features with a 4-8-2 MLP (optionally with BatchNorm); its
data is drawn from a fixed seed, so the task file and the checkpoint writer agree.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TASK_TEMPLATE = '''\
"""A tiny sewa task written by the tests."""
import torch
from torch import nn

HIDDEN = {hidden}
BN = {bn}
HAS_TEST = {has_test}


def model():
    layers = [nn.Linear(4, HIDDEN)] + ([nn.BatchNorm1d(HIDDEN)] if BN else []) + [nn.ReLU(), nn.Linear(HIDDEN, 2)]
    return nn.Sequential(*layers)


def _data(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] - x[:, 2] > 0).long()
    flip = torch.rand(n, generator=g) < 0.15
    y[flip] = 1 - y[flip]
    return x, y


_SPLITS = {{"train": _data(1, 64), "val": _data(2, 32), "test": _data(3, 40)}}


def batches(split):
    if split == "test" and not HAS_TEST:
        raise KeyError(split)
    x, y = _SPLITS[split]
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(y), 16)]


def loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets)
'''

METRIC = '''

def metric(outputs, targets):
    return (outputs.argmax(1) == targets).float().mean().item()
'''


def write_task(folder: Path, name: str = "task.py", *, hidden: int = 8, bn: bool = False, has_test: bool = True,
               metric: bool = True, extra: str = "") -> Path:
    """Writes a task file and returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    text = TASK_TEMPLATE.format(hidden=hidden, bn=bn, has_test=has_test) + (METRIC if metric else "") + extra
    path.write_text(text)
    return path


def write_checkpoints(folder: Path, task_path: Path, n: int = 6, *, fmt: str = "safetensors", every: int = 3,
                      seed: int = 0) -> list[Path]:
    """Trains the task's model with SGD and saves ``n`` checkpoints, ``every`` steps apart.

    ``fmt="safetensors"`` writes plain state dicts; ``fmt="pt"`` writes
    ``{"state_dict": ..., "step": step}`` with ``torch.save``.
    """
    from sewa.task import load_task

    task = load_task(str(task_path))
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = task.new_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train = list(task.batches("train"))
    paths = []
    step = 0
    for _ in range(n):
        for _ in range(every):
            x, y = train[step % len(train)]
            loss = task.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if fmt == "safetensors":
            path = folder / f"ckpt-{step}.safetensors"
            save_file(state, str(path))
        else:
            path = folder / f"ckpt-{step}.pt"
            torch.save({"state_dict": state, "step": step}, path)
        paths.append(path)
    return paths
