"""Tests of the simple strong references (naive Bayes, logistic regression, behaviour policy)."""

import numpy as np
import pytest
import torch

from sewa.experiments import references as R

pytest.importorskip("sklearn")

TRAIN = (["goal match win", "match team goal", "win team", "stock market bank", "bank shares",
          "market shares stock"], torch.tensor([0, 0, 0, 1, 1, 1]))
VAL = (["team win", "stock bank"], torch.tensor([0, 1]))
TEST = (["goal", "market", "shares goal goal"], torch.tensor([0, 1, 0]))


def test_naive_bayes_on_a_tiny_split():
    ref = R.naive_bayes(TRAIN, VAL, TEST)
    assert ref["name"] == "multinomial naive Bayes"
    assert ref["val_metric"] == 1.0 and ref["test_metric"] == 1.0
    # Flipping the test labels makes every prediction wrong: the score is accuracy, a fraction.
    flipped = R.naive_bayes(TRAIN, VAL, (TEST[0], 1 - TEST[1]))
    assert flipped["test_metric"] == 0.0


def test_logistic_regression_chooses_c_on_val_and_scores_fractions():
    ref = R.logistic_regression(TRAIN, VAL, TEST, cs=(0.01, 100.0))
    assert ref["name"] == "logistic regression"
    assert ref["settings"]["C"] == 0.01  # both C are perfect on val: the first is kept
    assert ref["val_metric"] == 1.0 and ref["test_metric"] == 1.0
    labels_as_list = (TRAIN[0], TRAIN[1].tolist())
    assert R.logistic_regression(labels_as_list, VAL, TEST, cs=(100.0,))["test_metric"] >= 2 / 3
    with pytest.raises(ValueError, match="at least one value"):
        R.logistic_regression(TRAIN, VAL, TEST, cs=())


def test_text_reference_keeps_the_better_on_val():
    ref = R.text_reference(TRAIN, VAL, TEST)
    assert ref["val_metric"] >= ref["other"]["val_metric"]
    assert {ref["name"], ref["other"]["name"]} == {"multinomial naive Bayes", "logistic regression"}


def test_pixel_logistic_regression_separates_bright_from_dark_images():
    gen = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.arange(n) % 2
        return torch.rand(n, 1, 4, 4, generator=gen) + 2.0 * y.view(n, 1, 1, 1).float(), y

    ref = R.pixel_logistic_regression(split(40), split(10), split(10), c=1.0)
    assert ref["name"] == "logistic regression on pixels"
    assert ref["val_metric"] == 1.0 and ref["test_metric"] == 1.0
    x, y = split(10)
    assert R.pixel_logistic_regression(split(40), split(10), (x, 1 - y), c=1.0)["test_metric"] == 0.0


def test_behaviour_policy_scores_on_the_test_and_val_seeds(tmp_path):
    pytest.importorskip("mujoco")
    from sewa.experiments import bc_data
    from sewa.experiments import mujoco_bc as bc

    policy = bc.LinearPolicy(np.zeros((3, 11)), np.zeros(11), np.ones(11), {"env": "hopper"})
    policy.save(bc.policy_path("hopper", "medium", tmp_path))
    ref = R.behaviour_policy("hopper", test_episodes=2, val_episodes=1, run_seed=1,
                             experts_dir=str(tmp_path))
    test = bc_data.evaluate_seeds("hopper", policy.act, bc_data.rollout_seeds("test", 2, 1))
    assert ref["test_metric"] == pytest.approx(bc.normalized_score("hopper", test["mean"]))
    assert ref["test_return"] == pytest.approx(test["mean"]) and ref["episodes"] == 2
    assert ref["val_metric"] is not None and ref["test_metric"] < 10  # standing still scores low
