"""Behaviour-cloning data substrate for the D4RL-style MuJoCo experiments.

Real MuJoCo (``gymnasium[mujoco]``) replaces the original D4RL datasets, which
need the deprecated ``mujoco-py``: linear expert/medium policies are trained
with Augmented Random Search (ARS V2-t, Mania et al. 2018) and rolled out to
produce D4RL-format datasets. Original D4RL hdf5 files can still be read with
:func:`load_d4rl_hdf5`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
REF_SCORES = {  # D4RL (random, expert) reference returns
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
# ARS V2-t hyper-parameters (Mania et al. 2018, Table 9): N, b, step size, noise, alive-bonus shift.
ARS_HPARAMS = {
    "hopper": dict(n_directions=8, top_b=4, step_size=0.01, noise=0.025, shift=1.0),
    "halfcheetah": dict(n_directions=32, top_b=4, step_size=0.02, noise=0.03, shift=0.0),
    "walker2d": dict(n_directions=40, top_b=30, step_size=0.025, noise=0.01, shift=1.0),
}
EXPERTS_DIR = Path(__file__).parent / "experts"
DEFAULT_CACHE = Path("~/.cache/sewa/d4rl").expanduser()
KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
ActFn = Callable[[np.ndarray], np.ndarray]


def normalized_score(env: str, ret: float) -> float:
    """D4RL normalised score: ``100 * (ret - random) / (expert - random)``."""
    lo, hi = REF_SCORES[env]
    return 100.0 * (ret - lo) / (hi - lo)


def _make(env_name: str) -> tuple[Any, int]:
    """Builds the raw (unwrapped, fast) env and returns it with its step limit."""
    import gymnasium as gym

    env = gym.make(ENVS[env_name])
    return env.unwrapped, int(getattr(env.spec, "max_episode_steps", None) or 1000)


@dataclass
class LinearPolicy:
    """Linear policy ``a = clip(W (s - mean) / std)`` with observation normalisation."""

    weights: np.ndarray  # (act_dim, obs_dim)
    obs_mean: np.ndarray
    obs_std: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Maps one observation ``(obs_dim,)`` or a batch ``(B, obs_dim)`` to actions in [-1, 1]."""
        z = (np.asarray(obs, np.float64) - self.obs_mean) / self.obs_std
        return np.clip(z @ self.weights.T, -1.0, 1.0)

    def save(self, path: str | Path) -> None:
        """Writes the policy to a small ``.npz`` (metadata as a JSON string)."""
        np.savez(path, weights=self.weights, obs_mean=self.obs_mean, obs_std=self.obs_std,
                 meta=np.array(json.dumps(self.meta, sort_keys=True)))

    @classmethod
    def load(cls, path: str | Path) -> LinearPolicy:
        """Reads a policy written by :meth:`save`."""
        with np.load(path) as f:
            return cls(f["weights"], f["obs_mean"], f["obs_std"], json.loads(str(f["meta"])))


class _RunningStats:
    """Running mean/std of observations (Chan et al. parallel merge)."""

    def __init__(self, dim: int) -> None:
        self.n, self.mean, self.m2 = 0, np.zeros(dim), np.zeros(dim)

    def update(self, x: np.ndarray) -> None:
        nb, mb = len(x), x.mean(0)
        delta, tot = mb - self.mean, self.n + nb
        self.m2 += ((x - mb) ** 2).sum(0) + delta**2 * self.n * nb / tot
        self.mean, self.n = self.mean + delta * nb / tot, tot

    def std(self) -> np.ndarray:
        s = np.sqrt(self.m2 / max(self.n - 1, 1))
        return np.where(s < 1e-8, 1.0, s)


def _rollout(env: Any, max_steps: int, act: ActFn, seed: int, shift: float = 0.0,
             record: list[np.ndarray] | None = None) -> tuple[float, int]:
    """Runs one episode; returns (sum of reward - shift, steps), appending states to ``record``."""
    obs, _ = env.reset(seed=seed)
    total, steps, term = 0.0, 0, False
    while steps < max_steps and not term:
        if record is not None:
            record.append(obs)
        obs, r, term, _, _ = env.step(act(obs))
        total, steps = total + r - shift, steps + 1
    return total, steps


def evaluate_policy(env_name: str, act_fn: ActFn, episodes: int = 10, seed: int = 0,
                    max_steps: int | None = None) -> tuple[float, float]:
    """Mean and std of the undiscounted return of ``act_fn`` (obs batch -> action batch)."""
    env, limit = _make(env_name)
    rets = [_rollout(env, max_steps or limit, lambda o: act_fn(o[None])[0], seed + 10_000 * i)[0]
            for i in range(episodes)]
    return float(np.mean(rets)), float(np.std(rets))


def torch_act_fn(module: Any, obs_mean: np.ndarray | None = None,
                 obs_std: np.ndarray | None = None) -> ActFn:
    """Wraps a torch module (normalised obs -> action) as a numpy ``act_fn``."""
    import torch

    dev = next(module.parameters()).device
    mean = 0.0 if obs_mean is None else obs_mean
    std = 1.0 if obs_std is None else obs_std

    def act(obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor((obs - mean) / std, dtype=torch.float32, device=dev)
        with torch.no_grad():
            return module(x).cpu().numpy().astype(np.float64)

    return act


def train_ars(env_name: str, iterations: int, seed: int = 0, *, time_budget_s: float | None = None,
              eval_every: int = 10, eval_episodes: int = 3,
              snapshots: list[LinearPolicy] | None = None,
              callback: Callable[[int, float], None] | None = None,
              **hparams: float) -> LinearPolicy:
    """Trains a linear policy with ARS V2-t (top-b directions, state normalisation).

    Args:
        env_name: key of :data:`ENVS`.
        iterations: maximum number of ARS iterations.
        seed: seed of the direction sampler and episode resets.
        time_budget_s: stop early after this many seconds of training.
        eval_every: evaluate the unperturbed policy every this many iterations.
        eval_episodes: episodes per intermediate evaluation.
        snapshots: if given, every evaluated intermediate policy is appended to it
            (``meta["eval_return"]`` holds its return), e.g. to pick a medium policy.
        callback: called as ``callback(iteration, eval_return)`` after each evaluation.
        **hparams: overrides of :data:`ARS_HPARAMS` (n_directions, top_b, step_size, noise, shift).

    Returns:
        The evaluated snapshot with the highest return.
    """
    hp = {**ARS_HPARAMS[env_name], **hparams}
    n_dir, top_b = int(hp["n_directions"]), int(hp["top_b"])
    env, limit = _make(env_name)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    rng = np.random.default_rng(seed)
    w, stats = np.zeros((act_dim, obs_dim)), _RunningStats(obs_dim)
    best: LinearPolicy | None = None
    start, it = time.perf_counter(), 0
    while True:
        stop = it >= iterations or bool(time_budget_s and time.perf_counter() - start > time_budget_s)
        if it % eval_every == 0 or stop:
            pol = LinearPolicy(w.copy(), stats.mean.copy(), stats.std(), {"env": env_name})
            ret = evaluate_policy(env_name, pol.act, eval_episodes, seed=seed + 7 + it)[0]
            pol.meta.update(iterations=it, seed=seed, eval_return=ret, hparams=hp)
            if snapshots is not None:
                snapshots.append(pol)
            if best is None or ret >= best.meta["eval_return"]:
                best = pol
            if callback is not None:
                callback(it, ret)
        if stop:
            break
        mean, std = stats.mean.copy(), stats.std()
        deltas = rng.standard_normal((n_dir, act_dim, obs_dim))
        rewards = np.zeros((n_dir, 2))
        states: list[np.ndarray] = []
        for k in range(n_dir):
            for j, sign in enumerate((1.0, -1.0)):
                pert = LinearPolicy(w + sign * hp["noise"] * deltas[k], mean, std)
                rewards[k, j] = _rollout(env, limit, pert.act, int(rng.integers(2**31)),
                                         hp["shift"], states)[0]
        order = np.argsort(-rewards.max(1))[:top_b]
        sigma = rewards[order].std() or 1.0
        w += hp["step_size"] / (top_b * sigma) * np.einsum(
            "k,kij->ij", rewards[order, 0] - rewards[order, 1], deltas[order])
        stats.update(np.asarray(states))
        it += 1
    assert best is not None
    best.meta["wall_time_s"] = round(time.perf_counter() - start, 1)
    return best


def select_medium(snapshots: list[LinearPolicy], expert_return: float,
                  fraction: float = 0.4) -> LinearPolicy:
    """The snapshot whose evaluated return is closest to ``fraction * expert_return``."""
    return min(snapshots, key=lambda p: abs(p.meta["eval_return"] - fraction * expert_return))


def collect(env_name: str, policy: LinearPolicy | ActFn, n_transitions: int, seed: int = 0,
            action_noise: float = 0.0) -> dict[str, np.ndarray]:
    """Rolls out ``policy`` for ``n_transitions`` steps into a D4RL-style dict.

    ``terminals`` marks true terminations, ``timeouts`` marks time-limit truncations (and
    the final, cut-off transition). Gaussian ``action_noise`` is added before clipping.
    """
    act = policy.act if isinstance(policy, LinearPolicy) else (lambda o: policy(o[None])[0])
    env, limit = _make(env_name)
    rng = np.random.default_rng(seed)
    buf: dict[str, list[Any]] = {k: [] for k in KEYS}
    obs, _ = env.reset(seed=seed)
    t, ep = 0, 0
    for i in range(n_transitions):
        a = np.asarray(act(obs), np.float64)
        if action_noise > 0:
            a = a + action_noise * rng.standard_normal(a.shape)
        a = np.clip(a, -1.0, 1.0)
        nxt, r, term, _, _ = env.step(a)
        t += 1
        timeout = (t >= limit or i == n_transitions - 1) and not term
        for k, v in zip(KEYS, (obs, a, r, term, timeout, nxt), strict=True):
            buf[k].append(v)
        obs = nxt
        if term or timeout:
            ep, t = ep + 1, 0
            obs, _ = env.reset(seed=seed + ep)
    out = {k: np.asarray(v, np.float32) for k, v in buf.items()}
    out["terminals"], out["timeouts"] = out["terminals"].astype(bool), out["timeouts"].astype(bool)
    return out


def load_d4rl_hdf5(path: str | Path) -> dict[str, np.ndarray]:
    """Reads an original D4RL hdf5 dataset (requires ``h5py``) into the same dict format."""
    import h5py

    with h5py.File(path, "r") as f:
        out = {k: np.asarray(f[k]) for k in KEYS if k in f}
    for k in ("terminals", "timeouts"):
        if k in out:
            out[k] = out[k].astype(bool)
    return out


def policy_path(env: str, kind: str, experts_dir: str | Path | None = None) -> Path:
    """Location of a committed policy, e.g. ``experts/hopper_medium.npz``."""
    return Path(experts_dir or EXPERTS_DIR) / f"{env}_{kind}.npz"


def make_dataset(env: str, kind: str, n_transitions: int = 1_000_000, seed: int = 0,
                 cache_dir: str | Path | None = None,
                 experts_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """Generates (or loads from the cache) a D4RL-style dataset.

    Args:
        env: key of :data:`ENVS`.
        kind: ``"expert"``, ``"medium"`` or ``"medium-expert"`` (medium half followed by
            expert half, each generated with ``seed``).
        n_transitions: total number of transitions.
        seed: rollout seed.
        cache_dir: cache directory (default ``~/.cache/sewa/d4rl``).
        experts_dir: directory holding the policy ``.npz`` files (default: committed ones).
    """
    if kind == "medium-expert":
        med = make_dataset(env, "medium", n_transitions // 2, seed, cache_dir, experts_dir)
        exp = make_dataset(env, "expert", n_transitions - n_transitions // 2, seed, cache_dir,
                           experts_dir)
        return {k: np.concatenate([med[k], exp[k]]) for k in med}
    if kind not in ("expert", "medium"):
        raise ValueError(f"unknown dataset kind {kind!r}")
    src = policy_path(env, kind, experts_dir)
    digest = hashlib.sha1(src.read_bytes()).hexdigest()[:10]
    cache = Path(cache_dir or DEFAULT_CACHE) / f"{env}-{kind}-n{n_transitions}-s{seed}-{digest}.npz"
    if cache.exists():
        with np.load(cache) as f:
            return {k: f[k] for k in f.files}
    data = collect(env, LinearPolicy.load(src), n_transitions, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **data)  # type: ignore[arg-type]
    tmp.replace(cache)
    return data


def write_readme(experts_dir: str | Path | None = None) -> Path:
    """Regenerates ``experts/README.md`` from the metadata stored in the policy files."""
    d = Path(experts_dir or EXPERTS_DIR)
    rows = []
    for p in sorted(d.glob("*.npz")):
        m = LinearPolicy.load(p).meta
        rows.append(f"| {p.name} | {m['env_id']} | "
                    f"{m['iterations']}/{m['trained_iterations']} | {m['seed']} | "
                    f"{m['eval_return']:.1f} ± {m['eval_return_std']:.1f} | "
                    f"{m['normalized_score']:.1f} | {m['wall_time_s']:.0f} | {m['machine']} |")
    text = ("# Linear ARS policies for the D4RL-style datasets\n\n"
            "Generated by `python -m sewa.experiments.mujoco_bc train-experts`; returns are over "
            "10 evaluation episodes (mean ± std), normalised with the D4RL reference scores. "
            "ARS iterations: iteration of the kept snapshot / iterations run. Wall time is the "
            "ARS training time of the whole run, on a shared machine.\n\n"
            "| file | env | ARS iterations | seed | return | normalised | wall s | machine |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    metas = [LinearPolicy.load(p).meta for p in sorted(d.glob("*_expert.npz"))]
    text += "\nCommands run:\n\n" + "".join(f"    {m['command']}\n" for m in metas)
    text += ("\nThe time budget only truncates training, so on the same machine and library "
             "versions the same files are reproduced, without timing dependence, by:\n\n")
    text += "".join(f"    python -m sewa.experiments.mujoco_bc train-experts --env {m['env']} "
                    f"--iterations {m['trained_iterations']} --seed {m['seed']}\n" for m in metas)
    if metas:
        text += f"\nVersions: {json.dumps(metas[0]['versions'])}\n"
    (d / "README.md").write_text(text)
    return d / "README.md"


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return f"{platform.machine()} {platform.system()}"


def _train_experts(env: str, args: argparse.Namespace) -> None:
    import gymnasium
    import mujoco

    snaps: list[LinearPolicy] = []
    expert = train_ars(env, args.iterations, args.seed, time_budget_s=args.time_budget,
                       snapshots=snaps, callback=lambda i, r: print(f"{env} it {i}: {r:.1f}",
                                                                    flush=True))
    machine = f"{_cpu_name()}, 1 thread"
    cmd = (f"python -m sewa.experiments.mujoco_bc train-experts --env {env} "
           f"--iterations {args.iterations} --seed {args.seed}"
           + (f" --time-budget {args.time_budget:g}" if args.time_budget else ""))
    ex_ret = None
    for kind in ("expert", "medium"):
        pol = expert if kind == "expert" else select_medium(snaps, ex_ret or 0.0)
        ret, std = evaluate_policy(env, pol.act, 10, seed=12345)
        ex_ret = ret if kind == "expert" else ex_ret
        pol.meta.update(kind=kind, env_id=ENVS[env], eval_return=ret, eval_return_std=std,
                        eval_episodes=10, normalized_score=normalized_score(env, ret),
                        wall_time_s=expert.meta["wall_time_s"], machine=machine, command=cmd,
                        trained_iterations=snaps[-1].meta["iterations"],
                        versions={"mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__})
        pol.save(policy_path(env, kind, args.out_dir))
        print(f"{env} {kind}: {ret:.1f} ± {std:.1f} (normalised {normalized_score(env, ret):.1f})")
    write_readme(args.out_dir)


def _expert_check(args: argparse.Namespace) -> None:
    """Runs :func:`sewa.experiments.bc_data.expert_bc_check` per env and writes one JSON file."""
    import json

    from ..provenance import environment
    from . import bc_data

    rows = []
    for env in args.env:
        row = bc_data.expert_bc_check(env, steps=args.steps, lr=args.lr, episodes=args.episodes)
        print(f"{env}: BC on expert data {row['bc_score']:.1f}, expert {row['expert_score']:.1f} (normalised)")
        rows.append(row)
    command = (f"python -m sewa.experiments.mujoco_bc expert-check --env {' '.join(args.env)} --steps {args.steps} "
               f"--lr {args.lr:g} --episodes {args.episodes}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"format": "sewa.bc_expert_check/1", "command": command, "machine": environment(),
                                    "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``train-experts``, ``dataset`` and ``expert-check`` sub-commands."""
    ap = argparse.ArgumentParser(prog="python -m sewa.experiments.mujoco_bc")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train-experts", help="train ARS expert/medium policies")
    tr.add_argument("--env", choices=[*ENVS, "all"], default="all")
    tr.add_argument("--iterations", type=int, default=1000)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--time-budget", type=float, default=None, help="seconds of ARS per env")
    tr.add_argument("--out-dir", type=Path, default=EXPERTS_DIR)
    ds = sub.add_parser("dataset", help="generate and cache a D4RL-style dataset")
    ds.add_argument("--env", choices=list(ENVS), required=True)
    ds.add_argument("--kind", choices=["expert", "medium", "medium-expert"], required=True)
    ds.add_argument("--n", type=int, default=1_000_000)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--cache-dir", type=Path, default=None)
    ec = sub.add_parser("expert-check", help="BC on expert-only data against the expert (issue 14's sanity check)")
    ec.add_argument("--env", choices=list(ENVS), nargs="+", required=True)
    ec.add_argument("--steps", type=int, default=20_000, help="BC Adam steps (default: the experiments' ~20k)")
    ec.add_argument("--lr", type=float, default=3e-3, help="BC learning rate (default: the experiments')")
    ec.add_argument("--episodes", type=int, default=50)
    ec.add_argument("--out", type=Path, default=Path("results/bc_expert_check.json"))
    args = ap.parse_args(argv)
    if args.cmd == "expert-check":
        _expert_check(args)
    elif args.cmd == "train-experts":
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for env in ENVS if args.env == "all" else [args.env]:
            _train_experts(env, args)
    else:
        data = make_dataset(args.env, args.kind, args.n, args.seed, args.cache_dir)
        rets = data["rewards"].sum()
        n_ep = int((data["terminals"] | data["timeouts"]).sum())
        print(f"{args.env}-{args.kind}: {len(data['rewards'])} transitions, {n_ep} episodes, "
              f"mean episode return {rets / max(n_ep, 1):.1f}")


if __name__ == "__main__":
    main()
