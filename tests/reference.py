"""A slow, obviously-correct twin of :func:`sewa.select`, for the tests.

Everything here is written straight from the equations in :mod:`sewa.select`, with no reuse of
the fast engine: the mixed parameters of each mask sample are built per tensor as
``Σ_i a_ji θ_i`` from per-snapshot state dicts (:meth:`sewa.Trajectory.snapshot`), the loss is
evaluated one sample at a time, and plain autograd differentiates the whole thing w.r.t. the
logits ``φ``. It draws the same noise stream as ``select`` (one ``torch.rand(samples, n)`` per
step from a generator seeded with ``seed``) and evaluates the model like
:func:`sewa._engine.selection_model` (eval mode, BatchNorm on batch statistics).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

import sewa
from sewa.select import project_budget

Batch = tuple[Tensor, Tensor]


def reference_model(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """An eval-mode copy of ``model`` in ``dtype`` whose BatchNorm layers use batch statistics."""
    net = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # With no running statistics, BatchNorm normalises with the batch's own, even in eval.
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return net


def snapshots(traj: sewa.Trajectory, dtype: torch.dtype = torch.float64,
              skip: Collection[str] = ()) -> list[dict[str, Tensor]]:
    """Every held snapshot, oldest first, as a state dict of the recorded tensors in ``dtype``.

    Tied names are left out (:func:`mixed_loss` gives them their first name's tensor), and so
    are the names in ``skip`` (e.g. recorded BatchNorm statistics, unused on batch statistics).
    """
    out = []
    for i in range(len(traj)):
        sd = traj.snapshot(i)
        out.append({name: sd[name].to(dtype) for name in traj.names if name not in skip})
    return out


def noise_stream(seed: int, samples: int, n: int) -> Callable[[], Tensor]:
    """Logistic(0, 1) noise, drawn exactly as ``select`` draws it: one (samples, n) block per step."""
    gen = torch.Generator().manual_seed(int(seed))

    def draw() -> Tensor:
        u = torch.rand(samples, n, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        return torch.log(u) - torch.log1p(-u)

    return draw


def masks(logits: Tensor, noise: Tensor, tau: float) -> Tensor:
    """Normalised relaxed masks ``a_j = m_j / Σ_i m_ji`` with ``m = sigmoid((φ + noise)/τ)``."""
    m = torch.sigmoid((logits + noise) / tau)
    return m / m.sum(dim=1, keepdim=True)


def mixed_loss(
    a: Tensor,
    snaps: Sequence[dict[str, Tensor]],
    net: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Batch,
    aliases: Mapping[str, str] | None = None,
) -> Tensor:
    """``(1/M) Σ_j L(Σ_i a_ji θ_i)`` with a Python loop over samples and snapshots.

    ``aliases`` maps the second name of a tied parameter to its first: both names get the very
    same mixed tensor, so the loss sees every use of a shared weight.
    """
    x, y = batch
    losses = []
    for j in range(a.shape[0]):
        params: dict[str, Tensor] = {}
        for name in snaps[0]:
            total = a[j, 0] * snaps[0][name]
            for i in range(1, len(snaps)):
                total = total + a[j, i] * snaps[i][name]
            params[name] = total
        for alias, target in (aliases or {}).items():
            params[alias] = params[target]
        losses.append(loss_fn(functional_call(net, params, (x,)), y).reshape(()))
    return torch.stack(losses).mean()


def step_grad(
    logits: Tensor,
    noise: Tensor,
    tau: float,
    snaps: Sequence[dict[str, Tensor]],
    net: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Batch,
    aliases: Mapping[str, str] | None = None,
) -> tuple[float, Tensor]:
    """Loss of one selection step and its gradient w.r.t. the logits (float64)."""
    phi = logits.detach().clone().requires_grad_(True)
    loss = mixed_loss(masks(phi, noise, tau), snaps, net, loss_fn, batch, aliases)
    (grad,) = torch.autograd.grad(loss, phi)
    return float(loss.detach()), grad


def as_float64(t: Tensor) -> Tensor:
    """Floating tensors in float64; integer targets unchanged."""
    return t.double() if t.is_floating_point() else t


def tau_at(t: int, steps: int, tau_start: float, tau_end: float) -> float:
    """``τ_t = τ_start (τ_end/τ_start)^(t/(T-1))``."""
    if steps <= 1 or tau_start == tau_end:
        return tau_end
    return tau_start * (tau_end / tau_start) ** (t / (steps - 1))


def initial_logits(n: int, top_k: int) -> Tensor:
    """``φ_i = logit(K/n)``: every ``s_i = K/n``, which already meets the budget."""
    value = math.log(top_k / n) - math.log1p(-top_k / n) if top_k < n else 0.0
    return torch.full((n,), value, dtype=torch.float64)


def reference_select(
    traj: sewa.Trajectory,
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batches: Sequence[Batch],
    *,
    top_k: int,
    samples: int,
    steps: int,
    tau_start: float = 1.0,
    tau_end: float = 0.1,
    lr: float = 0.05,
    budget: bool = True,
    seed: int = 0,
) -> tuple[list[int], Tensor]:
    """Multi-step SeWA in float64 with Adam and the budget projection.

    Returns:
        ``(indices, probabilities)``: the top-K positions (oldest first, ascending) and ``s``.
    """
    n = len(traj)
    snaps = snapshots(traj)
    net = reference_model(model)
    phi = initial_logits(n, top_k).requires_grad_(True)
    opt = torch.optim.Adam([phi], lr=lr)
    draw = noise_stream(seed, samples, n)
    for t in range(steps):
        x, y = batches[t % len(batches)]
        tau = tau_at(t, steps, tau_start, tau_end)
        loss = mixed_loss(masks(phi, draw(), tau), snaps, net, loss_fn,
                          (as_float64(x), as_float64(y)), traj.aliases)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if budget and top_k < n:
            project_budget(phi.data, float(top_k))
    probs = torch.sigmoid(phi.detach())
    indices = sorted(torch.topk(probs, top_k).indices.tolist())
    return indices, probs


# --------------------------------------------------------------------------- small test problems
class MLP(nn.Module):
    """Two-layer tanh network, 5 inputs, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvBN(nn.Module):
    """Conv + BatchNorm2d + Linear + BatchNorm1d on (2, 5, 5) images, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 5 * 5, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.bn(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.bn1(self.fc(h))))


class Tied(nn.Module):
    """A token model whose output layer shares the embedding matrix, plus one layer used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.again = self.mid  # the same module under a second name
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.mid(self.embed(x)))
        return self.head(torch.tanh(self.again(h)))


class WideMLP(MLP):
    """An MLP with 2,703 parameters: enough for the engine to split compact storage in chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 300)
        self.fc2 = nn.Linear(300, 3)


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "cnn_bn": ConvBN, "tied": Tied, "wide_mlp": WideMLP}


def bn_statistics(model: nn.Module) -> set[str]:
    """Names of the BatchNorm running statistics of ``model``."""
    return {name for name, _ in model.named_buffers() if name.endswith(("running_mean", "running_var"))}


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy: the loss used by the classification problems."""
    return nn.functional.cross_entropy(out, y)


def mse(out: Tensor, y: Tensor) -> Tensor:
    """Mean squared error: the loss used by the regression problems."""
    return nn.functional.mse_loss(out, y)


def make_inputs(kind: str, size: int, gen: torch.Generator) -> Tensor:
    """Random inputs for the problem ``kind``."""
    if kind in ("mlp", "wide_mlp"):
        return torch.randn(size, 5, generator=gen)
    if kind == "cnn_bn":
        return torch.randn(size, 2, 5, 5, generator=gen)
    return torch.randint(0, 7, (size,), generator=gen)


def make_problem(
    kind: str,
    *,
    n: int = 5,
    seed: int = 0,
    batch_size: int = 6,
    num_batches: int = 2,
    model_dtype: torch.dtype = torch.float32,
    storage: torch.dtype | str = torch.float32,
    spread: float = 0.3,
    buffers: bool = False,
) -> tuple[nn.Module, sewa.Trajectory, list[Batch]]:
    """A model, a trajectory of ``n`` random perturbations of it, and labelled batches.

    Everything is drawn from one generator seeded with ``seed``. With ``buffers`` the trajectory
    also records the BatchNorm statistics, set to random values (variances in [0.5, 2.5)).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MODELS[kind]().to(model_dtype)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    traj = sewa.Trajectory(model, window=n, dtype=storage, buffers=buffers)
    with torch.no_grad():
        for i in range(n):
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.copy_(base[name] + spread * noise.to(model_dtype))
            for name, b in model.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(torch.randn(b.shape, generator=gen))
                elif name.endswith("running_var"):
                    b.copy_(0.5 + 2 * torch.rand(b.shape, generator=gen))
            traj.push(model, step=10 * (i + 1))
        for name, p in model.named_parameters():
            p.copy_(base[name])
    batches = []
    for _ in range(num_batches):
        x = make_inputs(kind, batch_size, gen)
        if x.is_floating_point():
            x = x.to(model_dtype)
        batches.append((x, torch.randint(0, 3 if kind != "tied" else 7, (batch_size,), generator=gen)))
    return model, traj, batches
