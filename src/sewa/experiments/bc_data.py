"""Behaviour-cloning splits, rollout seeds and the expert-only sanity check (issue 14).

Validation holds out whole episodes of the dataset, so no validation transition is a time
neighbour of a training one. Test and validation returns come from rollouts whose reset seeds
are drawn from fixed, disjoint ranges (:func:`rollout_seeds`) that no dataset episode uses
(datasets reset with ``seed + episode``, far below :data:`SEED_BASES`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from . import mujoco_bc as bc

# Reset-seed ranges of the evaluation rollouts: split -> base. A run seed s uses
# base + s * SEEDS_PER_RUN + i for its i-th episode, so ranges never overlap across splits or runs.
SEED_BASES = {"val": 10_000_000, "test": 20_000_000}
SEEDS_PER_RUN = 100_000
# Simulators kept per environment and reused across evaluations: building one takes ~20 ms (its
# MuJoCo model is parsed again), as long as ~100 simulation steps; a reset with a seed restores all
# of its state.
_SIMS: dict[str, list[tuple[Any, int]]] = {}


def _simulators(env: str, count: int) -> list[tuple[Any, int]]:
    pool = _SIMS.setdefault(env, [])
    pool.extend(bc._make(env) for _ in range(count - len(pool)))
    return pool[:count]


def rollout_seeds(split: str, episodes: int, run_seed: int = 0) -> list[int]:
    """Reset seeds of the ``split`` rollouts (``"val"`` or ``"test"``) of run ``run_seed``.

    Args:
        split: ``"val"`` or ``"test"``.
        episodes: Number of episodes (at most :data:`SEEDS_PER_RUN`).
        run_seed: The experiment seed (>= 0).

    Returns:
        ``SEED_BASES[split] + run_seed * SEEDS_PER_RUN + i`` for ``i < episodes``.
    """
    if split not in SEED_BASES:
        raise ValueError(f"split must be one of {sorted(SEED_BASES)}, got {split!r}")
    if not 0 <= episodes <= SEEDS_PER_RUN or run_seed < 0:
        raise ValueError(f"need 0 <= episodes <= {SEEDS_PER_RUN} and run_seed >= 0, "
                         f"got {episodes} and {run_seed}")
    start = SEED_BASES[split] + run_seed * SEEDS_PER_RUN
    return list(range(start, start + episodes))


def dataset_reset_seeds(data: dict[str, np.ndarray], seed: int = 0) -> set[int]:
    """Reset seeds of the episodes of a dataset made by :func:`mujoco_bc.collect` with ``seed``.

    A ``medium-expert`` dataset is two collections with the same ``seed``; their seeds coincide.
    """
    return {seed + i for i in range(len(episode_bounds(data)))}


def evaluate_seeds(env: str, act_fn: bc.ActFn, seeds: list[int],
                   max_steps: int | None = None) -> dict[str, Any]:
    """Undiscounted return of ``act_fn`` (obs batch -> action batch) on one episode per seed.

    The episodes run in lockstep, one simulator each, so ``act_fn`` is called once per time step
    on the batch of episodes still running (a torch policy pays its call overhead once, not once
    per episode; 50 hopper episodes of a 2x256 MLP took 15.5 s against 33 s one at a time).
    The simulators are independent, so for a policy whose action for one row does not depend on
    the other rows of the batch (a numpy :class:`mujoco_bc.LinearPolicy`) each return equals the
    one-episode rollout with its seed. A float32 torch MLP rounds slightly differently at
    different batch sizes; measured on hopper, returns then move by a few units out of ~3,150.
    The simulators are reused from one call to the next (each is reset with its seed).

    Returns:
        ``{"mean", "std", "returns", "normalized_score"}`` (the score of the mean return).
    """
    if not seeds:
        raise ValueError("seeds must hold at least one episode seed")
    sims = _simulators(env, len(seeds))
    limit = max_steps or sims[0][1]
    obs = np.stack([sim.reset(seed=int(s))[0] for (sim, _), s in zip(sims, seeds, strict=True)])
    rets, live = np.zeros(len(seeds)), np.ones(len(seeds), bool)
    for _ in range(limit):
        idx = np.flatnonzero(live)
        if not len(idx):
            break
        acts = np.asarray(act_fn(obs[idx]))
        for j, i in enumerate(idx):
            obs[i], r, term, _, _ = sims[i][0].step(acts[j])
            rets[i] += r
            live[i] = not term
    mean = float(rets.mean())
    return {"mean": mean, "std": float(rets.std()), "returns": rets.tolist(),
            "normalized_score": bc.normalized_score(env, mean)}


def episode_bounds(data: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the episodes, ended by ``terminals`` or ``timeouts``.

    Transitions after the last end (an unfinished episode) form a final episode.
    """
    ends = np.flatnonzero(np.asarray(data["terminals"]) | np.asarray(data["timeouts"])) + 1
    n = len(data["terminals"])
    stops = [int(e) for e in ends] + ([n] if not len(ends) or ends[-1] < n else [])
    starts = [0, *stops[:-1]]
    return list(zip(starts, stops, strict=True))


def split_episodes(data: dict[str, np.ndarray], val_fraction: float = 0.1,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and validation transitions, validation made of whole episodes.

    Episodes are shuffled with ``seed`` and taken into validation until they hold at least
    ``val_fraction`` of the transitions (at least one episode, never all of them).

    Returns:
        ``(train_idx, val_idx)``, sorted int64 arrays that partition the transitions.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    bounds = episode_bounds(data)
    if len(bounds) < 2:
        raise ValueError("need at least two episodes to hold one out for validation")
    order = np.random.default_rng(seed).permutation(len(bounds))
    lengths = np.array([b - a for a, b in bounds])[order]
    need = val_fraction * lengths.sum()
    take = min(int(np.searchsorted(np.cumsum(lengths), need)) + 1, len(bounds) - 1)
    val = set(order[:take].tolist())
    mask = np.zeros(len(data["terminals"]), bool)
    for e in val:
        mask[bounds[e][0]:bounds[e][1]] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def bc_splits(data: dict[str, np.ndarray], val_fraction: float = 0.1,
              seed: int = 0) -> dict[str, Any]:
    """Normalised ``(observations, actions)`` for train and held-out-episode validation.

    Observations are standardised with the *train* mean and std (+1e-3); actions are clipped
    to [-1, 1]. Test has no transitions: it is the return on :func:`rollout_seeds` ``("test")``.

    Returns:
        ``{"train": (obs, act), "val": (obs, act), "obs_mean", "obs_std", "episodes":
        {"train": n, "val": n}}``, float32 arrays.
    """
    train_idx, val_idx = split_episodes(data, val_fraction, seed)
    obs = np.asarray(data["observations"], np.float32)
    act = np.clip(np.asarray(data["actions"], np.float32), -1.0, 1.0)
    mean, std = obs[train_idx].mean(0), obs[train_idx].std(0) + 1e-3
    norm = (obs - mean) / std
    starts = np.array([a for a, _ in episode_bounds(data)])
    n_val = int(np.isin(starts, val_idx).sum())
    return {"train": (norm[train_idx], act[train_idx]), "val": (norm[val_idx], act[val_idx]),
            "obs_mean": mean, "obs_std": std,
            "episodes": {"train": len(starts) - n_val, "val": n_val}}


def train_bc(splits: dict[str, Any], steps: int, batch_size: int = 256, lr: float = 1e-3,
             seed: int = 0, hidden: int = 256, layers: int = 2) -> Any:
    """Plain BC: Adam on the MSE to the data's actions, cosine-decayed LR, i.i.d. mini-batches.

    Args:
        splits: Output of :func:`bc_splits`.
        steps: Optimizer steps.
        batch_size: Transitions per step (drawn with replacement).
        lr: Peak learning rate; ``lr_t = lr · (1 + cos(π t / steps)) / 2``.
        seed: Seed of the initialisation and the batches.
        hidden: Width of the MLP.
        layers: Hidden layers of the MLP.

    Returns:
        The trained ``nn.Module`` (normalised observation -> action), in eval mode.
    """
    import torch
    from torch.nn import functional as F

    from .models import bc_mlp

    obs, act = (torch.as_tensor(a) for a in splits["train"])
    torch.manual_seed(seed)
    model = bc_mlp(obs.shape[1], act.shape[1], hidden, layers)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(obs), (batch_size,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(obs[idx]), act[idx]).backward()
        opt.step()
        sched.step()
    return model.eval()


def expert_bc_check(env: str, n_transitions: int = 100_000, steps: int = 10_000,
                    episodes: int = 50, seed: int = 0, batch_size: int = 256, lr: float = 1e-3,
                    cache_dir: str | None = None, experts_dir: str | None = None) -> dict[str, Any]:
    """Sanity check of the BC pipeline: clone the expert on expert-only data, score both.

    BC on clean expert data should come close to the expert; if it does not, the pipeline
    (normalisation, clipping, policy head, training length) is at fault, not the data mix.

    Args:
        env: Key of :data:`sewa.experiments.mujoco_bc.ENVS`.
        n_transitions: Expert transitions generated (cached) for training.
        steps: BC optimizer steps (see :func:`train_bc`).
        episodes: Test rollouts of each policy, on ``rollout_seeds("test", episodes, seed)``.
        seed: Run seed (validation split, initialisation, batches, rollout seeds).
        batch_size: See :func:`train_bc`.
        lr: See :func:`train_bc`.
        cache_dir: Dataset cache (default ``~/.cache/sewa/d4rl``).
        experts_dir: Folder of the policy files (default: the committed ones).

    Returns:
        ``{"env", "bc_score", "expert_score", "bc_return", "expert_return", "bc_return_std",
        "steps", "episodes", "train_seconds"}``; scores D4RL-normalised.
    """
    data = bc.make_dataset(env, "expert", n_transitions, 0, cache_dir, experts_dir)
    splits = bc_splits(data, 0.1, seed)
    start = time.perf_counter()
    model = train_bc(splits, steps, batch_size, lr, seed)
    seconds = time.perf_counter() - start
    seeds = rollout_seeds("test", episodes, seed)
    clone = evaluate_seeds(env, bc.torch_act_fn(model, splits["obs_mean"], splits["obs_std"]), seeds)
    expert = evaluate_seeds(env, bc.LinearPolicy.load(bc.policy_path(env, "expert", experts_dir)).act,
                            seeds)
    return {"env": env, "bc_score": clone["normalized_score"],
            "expert_score": expert["normalized_score"], "bc_return": clone["mean"],
            "bc_return_std": clone["std"], "expert_return": expert["mean"], "steps": steps,
            "episodes": episodes, "train_seconds": round(seconds, 1)}
