"""Simple strong references printed beside every results table (issue 14).

A comparison of averaging methods is only evidence when the models compared are about as good as
a simple, standard model on the same split. For text the references are scikit-learn's
multinomial naive Bayes and logistic regression on the identical train / val / test texts; for
images it is logistic regression on the pixels; for behaviour cloning it is the score of the policy that generated the data (the "medium" policy).

Every reference is a dict ``{"name", "test_metric", "val_metric", ...}`` with accuracy as a
fraction and BC scores D4RL-normalised (0-100), the units of the raw experiment runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .data_text import tokenize

TextSplit = tuple[Sequence[str], Any]


def _labels(split: TextSplit) -> np.ndarray:
    y = split[1]
    return np.asarray(y.numpy() if hasattr(y, "numpy") else y)


def _accuracy(model: Any, features: Any, split: TextSplit) -> float:
    return float(np.mean(model.predict(features.transform(split[0])) == _labels(split)))


def naive_bayes(train: TextSplit, val: TextSplit, test: TextSplit,
                alpha: float = 1.0) -> dict[str, Any]:
    """Multinomial naive Bayes on word counts (the project's :func:`tokenize`).

    ``P(c | x) ∝ P(c) · Π_w P(w | c)^{n_w(x)}`` with Laplace/Lidstone smoothing ``alpha``.

    Args:
        train: ``(texts, labels)`` it is fitted on.
        val: ``(texts, labels)`` scored for ``val_metric``.
        test: ``(texts, labels)`` scored for ``test_metric``.
        alpha: Additive smoothing of the word counts.

    Returns:
        ``{"name", "test_metric", "val_metric", "settings"}``, accuracies as fractions.
    """
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB

    features = CountVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None)
    model = MultinomialNB(alpha=alpha).fit(features.fit_transform(train[0]), _labels(train))
    return {"name": "multinomial naive Bayes", "test_metric": _accuracy(model, features, test),
            "val_metric": _accuracy(model, features, val),
            "settings": {"features": "word counts", "alpha": alpha}}


def logistic_regression(train: TextSplit, val: TextSplit, test: TextSplit,
                        cs: Sequence[float] = (1.0, 10.0, 100.0)) -> dict[str, Any]:
    """L2 logistic regression on sublinear TF-IDF of words, its ``C`` chosen on ``val``.

    Args:
        train: ``(texts, labels)`` it is fitted on.
        val: ``(texts, labels)`` on which ``C`` is chosen (the first best on ties).
        test: ``(texts, labels)`` scored for ``test_metric``.
        cs: Inverse regularisation strengths tried.

    Returns:
        ``{"name", "test_metric", "val_metric", "settings"}``, accuracies as fractions.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    if not cs:
        raise ValueError("cs must hold at least one value of C")
    features = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None,
                               sublinear_tf=True)
    x = features.fit_transform(train[0])
    fits = [(c, LogisticRegression(C=c, max_iter=2000).fit(x, _labels(train))) for c in cs]
    scored = [(_accuracy(m, features, val), c, m) for c, m in fits]
    val_acc, c, model = max(scored, key=lambda s: s[0])  # max keeps the first of ties
    return {"name": "logistic regression", "test_metric": _accuracy(model, features, test),
            "val_metric": val_acc, "settings": {"features": "sublinear TF-IDF of words", "C": c}}


def text_reference(train: TextSplit, val: TextSplit, test: TextSplit) -> dict[str, Any]:
    """The better on ``val`` of :func:`naive_bayes` and :func:`logistic_regression`.

    The other one's scores are kept under ``"other"``, so a table can show both.
    """
    nb, lr = naive_bayes(train, val, test), logistic_regression(train, val, test)
    best, other = (nb, lr) if nb["val_metric"] >= lr["val_metric"] else (lr, nb)
    return best | {"other": {k: other[k] for k in ("name", "test_metric", "val_metric")}}


def pixel_logistic_regression(train: tuple[Any, Any], val: tuple[Any, Any], test: tuple[Any, Any],
                              c: float = 0.01, max_iter: int = 300) -> dict[str, Any]:
    """L2 multinomial logistic regression on the normalised pixels of an image split.

    The classic linear reference of the Fashion-MNIST benchmark (about 84%); not tuned beyond
    ``c``. Splits are ``(images N×C×H×W, labels)`` tensors or arrays.
    """
    from sklearn.linear_model import LogisticRegression

    def arrays(split: tuple[Any, Any]) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(split[0].cpu().numpy() if hasattr(split[0], "cpu") else split[0])
        return x.reshape(len(x), -1), _labels(split)

    (xt, yt), (xv, yv), (xe, ye) = arrays(train), arrays(val), arrays(test)
    model = LogisticRegression(C=c, max_iter=max_iter).fit(xt, yt)
    return {"name": "logistic regression on pixels", "test_metric": float(np.mean(model.predict(xe) == ye)),
            "val_metric": float(np.mean(model.predict(xv) == yv)), "settings": {"features": "normalised pixels", "C": c}}


def behaviour_policy(env: str, kind: str = "medium", test_episodes: int = 50,
                     val_episodes: int = 10, run_seed: int = 0,
                     experts_dir: str | None = None) -> dict[str, Any]:
    """D4RL-normalised score of the committed policy that generated the ``kind`` data.

    It is rolled out on the same episode seeds as the BC policies
    (:func:`sewa.experiments.bc_data.rollout_seeds`): ``test_metric`` on the test seeds,
    ``val_metric`` on the validation seeds.

    Args:
        env: Key of :data:`sewa.experiments.mujoco_bc.ENVS`.
        kind: ``"medium"`` (the reference of the tables) or ``"expert"``.
        test_episodes: Test rollouts.
        val_episodes: Validation rollouts (0: ``val_metric`` is None).
        run_seed: The experiment seed the rollout seeds derive from.
        experts_dir: Folder of the policy files (default: the committed ones).
    """
    from . import bc_data
    from . import mujoco_bc as bc

    policy = bc.LinearPolicy.load(bc.policy_path(env, kind, experts_dir))
    seeds = {split: bc_data.rollout_seeds(split, n, run_seed)
             for split, n in (("test", test_episodes), ("val", val_episodes))}
    test = bc_data.evaluate_seeds(env, policy.act, seeds["test"])
    val = bc_data.evaluate_seeds(env, policy.act, seeds["val"]) if val_episodes else None
    return {"name": f"{kind} behaviour policy (linear ARS)",
            "test_metric": bc.normalized_score(env, test["mean"]),
            "val_metric": None if val is None else bc.normalized_score(env, val["mean"]),
            "test_return": test["mean"], "test_return_std": test["std"],
            "episodes": test_episodes}
