"""Fast tests of the MuJoCo behaviour-cloning data substrate."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mujoco")
pytest.importorskip("gymnasium")

from sewa.experiments import mujoco_bc as mb  # noqa: E402


def test_normalized_score_closed_form() -> None:
    for env, (lo, hi) in mb.REF_SCORES.items():
        assert mb.normalized_score(env, lo) == pytest.approx(0.0)
        assert mb.normalized_score(env, hi) == pytest.approx(100.0)
        mid = lo + 0.25 * (hi - lo)
        assert mb.normalized_score(env, mid) == pytest.approx(25.0)
    assert mb.normalized_score("hopper", 1000.0) == pytest.approx(
        100 * (1000.0 + 20.272305) / (3234.3 + 20.272305))


def test_policy_save_load_roundtrip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    pol = mb.LinearPolicy(rng.normal(size=(3, 11)), rng.normal(size=11), rng.random(11) + 0.5,
                          {"env": "hopper", "eval_return": 1.5})
    pol.save(tmp_path / "p.npz")
    back = mb.LinearPolicy.load(tmp_path / "p.npz")
    assert back.meta == pol.meta
    obs = rng.normal(size=(4, 11))
    np.testing.assert_allclose(back.act(obs), pol.act(obs))
    assert np.all(np.abs(pol.act(obs)) <= 1.0)


@pytest.mark.parametrize("env", ["hopper", "halfcheetah"])
def test_committed_expert_beats_random(env: str) -> None:
    path = mb.policy_path(env, "expert")
    if not path.exists():
        pytest.skip(f"{path} not generated")
    pol = mb.LinearPolicy.load(path)
    assert pol.meta["env"] == env and pol.meta["kind"] == "expert"
    ret, _ = mb.evaluate_policy(env, pol.act, episodes=2, seed=1, max_steps=150)
    rng = np.random.default_rng(0)
    rand, _ = mb.evaluate_policy(env, lambda o: rng.uniform(-1, 1, (len(o), pol.weights.shape[0])),
                                 episodes=2, seed=1, max_steps=150)
    assert ret > rand + 150.0


def test_collect_shapes_and_dtypes() -> None:
    env, _ = mb._make("hopper")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    pol = mb.LinearPolicy(np.zeros((act_dim, obs_dim)), np.zeros(obs_dim), np.ones(obs_dim))
    n = 300
    data = mb.collect("hopper", pol, n, seed=0, action_noise=0.3)
    assert data["observations"].shape == (n, obs_dim)
    assert data["next_observations"].shape == (n, obs_dim)
    assert data["actions"].shape == (n, act_dim)
    for k in ("rewards", "terminals", "timeouts"):
        assert data[k].shape == (n,)
    assert data["observations"].dtype == np.float32 and data["rewards"].dtype == np.float32
    assert data["terminals"].dtype == bool and data["timeouts"].dtype == bool
    assert np.all(np.abs(data["actions"]) <= 1.0) and data["actions"].std() > 0.1
    assert data["terminals"].any()  # the zero policy falls over within 300 steps
    assert data["timeouts"][-1] or data["terminals"][-1]
    assert not np.any(data["terminals"] & data["timeouts"])
    # Within an episode, next_observations[t] == observations[t + 1].
    cont = ~(data["terminals"] | data["timeouts"])[:-1]
    np.testing.assert_array_equal(data["next_observations"][:-1][cont],
                                  data["observations"][1:][cont])


def _fake_experts(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for kind, scale in (("medium", 0.1), ("expert", 0.3)):
        mb.LinearPolicy(scale * rng.normal(size=(6, 17)), np.zeros(17), np.ones(17),
                        {"env": "halfcheetah", "kind": kind}).save(
            mb.policy_path("halfcheetah", kind, tmp_path))
    return tmp_path


def test_medium_expert_is_concatenation_and_cache_reused(tmp_path, monkeypatch) -> None:
    experts, cache = _fake_experts(tmp_path / "experts"), tmp_path / "cache"
    kw = dict(seed=3, cache_dir=cache, experts_dir=experts)
    me = mb.make_dataset("halfcheetah", "medium-expert", 201, **kw)
    med = mb.make_dataset("halfcheetah", "medium", 100, **kw)
    exp = mb.make_dataset("halfcheetah", "expert", 101, **kw)
    for k in mb.KEYS:
        np.testing.assert_array_equal(me[k], np.concatenate([med[k], exp[k]]))
    assert len(list(cache.glob("*.npz"))) == 2

    def boom(*a, **k):
        raise AssertionError("cache not reused")

    monkeypatch.setattr(mb, "collect", boom)
    again = mb.make_dataset("halfcheetah", "medium-expert", 201, **kw)
    for k in mb.KEYS:
        np.testing.assert_array_equal(again[k], me[k])
    with pytest.raises(AssertionError):
        mb.make_dataset("halfcheetah", "expert", 50, **kw)


def test_torch_act_fn_matches_linear_policy() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    w, mean, std = rng.normal(size=(3, 11)), rng.normal(size=11), rng.random(11) + 0.5
    lin = torch.nn.Linear(11, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
    act = mb.torch_act_fn(torch.nn.Sequential(lin, torch.nn.Hardtanh()), mean, std)
    obs = rng.normal(size=(5, 11))
    np.testing.assert_allclose(act(obs), mb.LinearPolicy(w, mean, std).act(obs), atol=1e-5)
    ret, sd = mb.evaluate_policy("hopper", act, episodes=2, seed=0, max_steps=20)
    assert np.isfinite(ret) and sd >= 0.0


def test_load_d4rl_hdf5(tmp_path) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "d.hdf5", "w") as f:
        f["observations"] = np.zeros((4, 11), np.float32)
        f["actions"] = np.zeros((4, 3), np.float32)
        f["rewards"] = np.arange(4, dtype=np.float32)
        f["terminals"] = np.array([0, 0, 0, 1], np.uint8)
        f["timeouts"] = np.zeros(4, np.uint8)
    data = mb.load_d4rl_hdf5(tmp_path / "d.hdf5")
    assert data["terminals"].dtype == bool and data["terminals"][-1]
    assert data["observations"].shape == (4, 11) and "next_observations" not in data


def _episodes(lengths: list[int], last_open: bool = False) -> dict[str, np.ndarray]:
    n = sum(lengths)
    term, obs = np.zeros(n, bool), np.zeros((n, 2), np.float32)
    act = np.zeros((n, 1), np.float32)
    ends = np.cumsum(lengths) - 1
    term[ends[:-1] if last_open else ends] = True
    for e, (a, b) in enumerate(zip([0, *np.cumsum(lengths)[:-1]], np.cumsum(lengths), strict=True)):
        obs[a:b] = [e, 10 * e]  # observation says which episode it came from
        act[a:b] = [2.0, -0.5][e % 2]  # 2.0 is clipped to 1.0
    return {"terminals": term, "timeouts": np.zeros(n, bool), "observations": obs, "actions": act}


def test_episode_bounds_and_whole_episode_validation() -> None:
    from sewa.experiments import bc_data as bd

    data = _episodes([3, 5, 2, 4, 6])
    assert bd.episode_bounds(data) == [(0, 3), (3, 8), (8, 10), (10, 14), (14, 20)]
    assert bd.episode_bounds(_episodes([3, 2], last_open=True)) == [(0, 3), (3, 5)]
    for seed in range(5):
        train, val = bd.split_episodes(data, 0.25, seed)
        assert sorted([*train, *val]) == list(range(20)) and len(val) >= 5
        val_eps, train_eps = set(data["observations"][val, 0]), set(data["observations"][train, 0])
        assert not val_eps & train_eps  # no episode is cut between the splits
    assert len(bd.split_episodes(data, 0.99, 0)[0]) > 0  # never every episode
    with pytest.raises(ValueError, match="two episodes"):
        bd.split_episodes(_episodes([4]), 0.5)
    s = bd.bc_splits(data, 0.25, 0)
    assert s["episodes"]["train"] + s["episodes"]["val"] == 5 and s["episodes"]["val"] >= 1
    train_obs = s["train"][0]
    np.testing.assert_allclose(train_obs.mean(0), 0.0, atol=1e-5)  # train statistics
    assert s["train"][1].max() <= 1.0 and s["val"][1].min() >= -1.0


def test_rollout_seeds_are_disjoint_from_each_other_and_the_data() -> None:
    from sewa.experiments import bc_data as bd

    test = {s: set(bd.rollout_seeds("test", 50, s)) for s in range(10)}
    val = {s: set(bd.rollout_seeds("val", 20, s)) for s in range(10)}
    every = [*test.values(), *val.values()]
    assert sum(map(len, every)) == len(set().union(*every)) == 700
    data = mb.collect("hopper", mb.LinearPolicy(np.zeros((3, 11)), np.zeros(11), np.ones(11)),
                      400, seed=0)
    used = bd.dataset_reset_seeds(data, 0)
    assert len(used) == len(bd.episode_bounds(data)) > 1 and not used & set().union(*every)
    with pytest.raises(ValueError, match="split must be"):
        bd.rollout_seeds("train", 3)
    with pytest.raises(ValueError, match="at least one"):
        bd.evaluate_seeds("hopper", lambda o: o[:, :3], [])


def test_lockstep_rollouts_equal_one_episode_at_a_time() -> None:
    from sewa.experiments import bc_data as bd

    rng = np.random.default_rng(0)
    pol = mb.LinearPolicy(rng.normal(size=(3, 11)), np.zeros(11), np.ones(11))
    seeds = [5, 6, 7]
    res = bd.evaluate_seeds("hopper", pol.act, seeds, max_steps=200)
    env, _ = mb._make("hopper")
    slow = [mb._rollout(env, 200, pol.act, s)[0] for s in seeds]  # the slow, obvious twin
    np.testing.assert_allclose(res["returns"], slow, rtol=1e-12)
    assert res["mean"] == pytest.approx(np.mean(slow))
    assert res["normalized_score"] == pytest.approx(mb.normalized_score("hopper", np.mean(slow)))
    # the simulators are reused across calls: a used pool (more episodes, other seeds) gives the same returns
    bd.evaluate_seeds("hopper", pol.act, [9, 8, 7, 6, 5], max_steps=50)
    assert bd.evaluate_seeds("hopper", pol.act, seeds, max_steps=200)["returns"] == res["returns"]


def test_train_bc_fits_and_expert_check_runs(tmp_path) -> None:
    pytest.importorskip("torch")
    from sewa.experiments import bc_data as bd

    data = _episodes([10, 10, 10, 10])
    s = bd.bc_splits(data, 0.25, 0)
    model = bd.train_bc(s, steps=200, batch_size=16, lr=1e-2, hidden=16, seed=0)
    import torch

    with torch.no_grad():
        pred = model(torch.as_tensor(s["train"][0])).numpy()
    assert np.abs(pred - s["train"][1]).mean() < 0.2  # targets 1.0 (clipped) and -0.5
    experts = _fake_experts(tmp_path / "experts")
    out = bd.expert_bc_check("halfcheetah", n_transitions=2100, steps=20, episodes=1,
                             cache_dir=str(tmp_path / "cache"), experts_dir=str(experts))
    assert {"bc_score", "expert_score", "bc_return", "expert_return"} <= set(out)
    assert np.isfinite(out["bc_score"]) and out["steps"] == 20
