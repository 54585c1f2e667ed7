"""The machine-readable summary of the experiment runs, ``results/summary.json`` (issue 14, item 9).

    python -m sewa.experiments.results          # writes it together with docs/RESULTS.md

Reads the raw runs (format ``sewa.experiment/2`` at ``<task>/<regime>/<preset>/seed<N>.json``, and
the older layout ``<task>/<preset>/seed<N>.json`` without a ``format`` key, read as the constant-LR
regime with its labels mapped to today's) and writes one entry per task and regime with the per-seed
metrics of every method, the random-K distribution, per-seed ranks and the verdicts of
:mod:`sewa.experiments.stats` for "sewa vs X" and "auto vs X" over every baseline X.

Metrics in the summary are in display units: accuracy in percent, behaviour cloning in
D4RL-normalised points (0-100), so both equivalence margins read as points (0.3 and 2).
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import stats

FORMAT = "sewa.experiment/2"
LEGACY_FORMAT = "sewa.experiment/1"
SCHEMA = "sewa.summary/1"
MAIN = ("last", "uniform", "swa_lr", "lawa", "ema", "suffix", "greedy_soup", "learned_soup", "sewa", "auto")
"""Method labels of the main tables, in display order; only these enter the verdicts."""
CLAIMANTS = ("sewa", "auto")
"""Methods whose claims are tested: each against every other main method (sewa not against auto)."""
V1_LABELS = {"sewa10": "sewa", "lawa10": "lawa", "twa": "learned_soup"}
V1_SELECTION = {"sewa": ("val", "loss"), "greedy_soup": ("val", "loss"), "learned_soup": ("val", "loss")}
"""What the format-1 runner selected on (it did not record it): the validation split, by its loss."""
UNITS = {"accuracy": ("percent", 100.0), "normalized_score": ("D4RL-normalised points", 1.0)}
PRESET_ORDER = ("full", "quick")
CLAIMS: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("SeWA(K=10) beats averaging the whole window (uniform, SWA with its LR schedule)", "sewa", ("uniform", "swa_lr"), False),
    ("SeWA beats the other checkpoint averages (LAWA, EMA)", "sewa", ("lawa", "ema"), False),
    ("SeWA beats the other selections (suffix, greedy soup, learned soup)", "sewa", ("suffix", "greedy_soup", "learned_soup"), False),
    ("SeWA beats the last iterate", "sewa", ("last",), False),
    ("auto is never worse than the best baseline (chosen per task on test, in hindsight)", "auto", ("<best>",), False),
    ("auto is never worse than the best baseline it could have chosen (averages of the recorded trajectory: swa_lr, "
     "a separately trained SWALR branch, left out)", "auto", ("<best_trajectory>",), False),
    ("auto beats uniform and the last iterate where checkpoints differ in quality (unstable regimes)", "auto", ("uniform", "last"), True),
)
"""(claim, claimant, the methods it is compared with ("<best>": the task's best baseline; "<best_trajectory>": the
best one that averages the recorded trajectory, so among auto's candidates or rules like them), unstable regimes only)."""
OWN_BRANCH = ("swa_lr",)
"""Baselines that train on past the trajectory (their own optimizer branch): no average of the record reproduces them."""

Key = tuple[str, str, str]
"""(task, regime, preset)."""


def from_v1(rec: dict[str, Any]) -> dict[str, Any]:
    """A format-1 run read as format 2: regime "constant", labels mapped (sewa10 -> sewa,
    lawa10 -> lawa, twa -> learned_soup), SeWA's K-curve from its sewa1..sewa50 rows, provenance
    fields it did not record set to ``None``. lawa100 (equal to uniform) and random10 (one draw) stay
    as extra rows outside the verdicts."""
    out = dict(rec)
    methods: dict[str, Any] = {}
    for label, row in rec["methods"].items():
        new = V1_LABELS.get(label, label)
        row = dict(row)
        row.setdefault("selected_on", V1_SELECTION.get(new, (None, None))[0])
        row.setdefault("choice_by", V1_SELECTION.get(new, (None, None))[1])
        methods[new] = row
    out["methods"] = methods
    curve = {int(k[4:]): row["test_metric"] for k, row in rec["methods"].items() if k[:4] == "sewa" and k[4:].isdigit()}
    out.update(format=LEGACY_FORMAT, legacy=True, regime="constant", dirty=None, reference=None, per_snapshot=None,
               random_k=None, window_note=f"constant learning rate; the window is the last {rec['window']} snapshots",
               k_curves={"Ks": sorted(curve), "measure": "test_metric", "sewa": [curve[k] for k in sorted(curve)]} if curve else None)
    return out


def normalize(rec: dict[str, Any], where: str = "a run") -> dict[str, Any]:
    """A raw run in format 2 (format-1 runs converted by :func:`from_v1`).

    Raises:
        ValueError: for a format this code does not know.
    """
    fmt = rec.get("format")
    if fmt is None:
        return from_v1(rec)
    if fmt != FORMAT:
        raise ValueError(f"{where} has format {fmt!r}; this renderer reads {FORMAT!r} and the older format without a key")
    return {**rec, "legacy": False}


def load_runs(root: Path) -> dict[Key, list[dict[str, Any]]]:
    """Every run under ``root`` grouped by (task, regime, preset), sorted by seed.

    Format-2 runs supersede format-1 runs of the same task, regime and preset.

    Raises:
        ValueError: when one group holds the same seed twice, or a full-preset run ran with
            ``--set`` overrides (the quick preset's smoke runs may carry overrides).
    """
    groups: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(root.glob("*/*/seed*.json")) + sorted(root.glob("*/*/*/seed*.json")):
        rec = normalize(json.loads(path.read_text()), str(path))
        if rec.get("overrides") and rec.get("preset") == "full":
            raise ValueError(f"{path} ran with changed settings ({rec['overrides']}, `sewa experiment --set`): the tables "
                             "hold the specs' own settings only; move the run out of this folder")
        groups[(rec["task"], rec["regime"], rec["preset"])].append(rec)
    out: dict[Key, list[dict[str, Any]]] = {}
    for key, recs in sorted(groups.items()):
        if any(not r["legacy"] for r in recs):
            recs = [r for r in recs if not r["legacy"]]
        recs.sort(key=lambda r: r["seed"])
        seeds = [r["seed"] for r in recs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{'/'.join(key)} holds a seed twice: {seeds}")
        out[key] = recs
    return out


@functools.cache
def code_version(commit: str) -> str:
    """The git tree of ``src/`` at ``commit``: commits that change nothing under ``src/`` (results,
    docs) ran the same code. The commit itself when git cannot tell (no checkout, unknown commit)."""
    here = Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", "rev-parse", f"{commit}:src"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip() or commit
    except (OSError, subprocess.SubprocessError):
        return commit


def check_commits(key: Key, recs: list[dict[str, Any]], allow_mixed: bool = False) -> list[str]:
    """The distinct commits of one task-regime's runs, in order of first appearance.

    Runs of several commits count as one code version when those commits hold the same ``src/``
    tree (:func:`code_version`).

    Raises:
        ValueError: when format-2 runs of one task-regime come from several code versions and
            ``allow_mixed`` is false (format-1 runs predate the rule: they are allowed and flagged).
    """
    commits = list(dict.fromkeys(str(r["git_commit"]) for r in recs))
    versions = {code_version(c) for c in commits}
    if len(versions) > 1 and not allow_mixed and not all(r["legacy"] for r in recs):
        raise ValueError(f"{'/'.join(key)} mixes runs of {len(versions)} versions of src/ (commits {', '.join(commits)}): "
                         "rerun its seeds from one commit, or pass --allow-mixed to render it flagged")
    return commits


def _r(x: float | None, scale: float = 1.0) -> float | None:
    """Six decimals, or more for values below 0.1 so that small losses (behaviour cloning's, near 1e-4) keep six
    significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    v = float(x) * scale
    return round(v, 6 if abs(v) >= 0.1 or v == 0 else 5 - math.floor(math.log10(abs(v))))


def _complete(recs: list[dict[str, Any]], label: str) -> bool:
    return all(label in r["methods"] and r["methods"][label].get("test_metric") is not None for r in recs)


def labels(recs: list[dict[str, Any]]) -> list[str]:
    """Method labels present in every run: main ones in display order, then the rest sorted."""
    present = [set(r["methods"]) for r in recs]
    common = set.intersection(*present) if present else set()
    extra = sorted(common - set(MAIN), key=lambda m: (re.sub(r"\d+$", "", m), int(re.sub(r"^.*?(\d*)$", r"0\1", m))))
    return [m for m in MAIN if m in common] + extra


def comparisons(recs: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """The family of one task-regime: "C vs X" for claimant C and every other main method X that
    every seed scored (SeWA is not compared with auto, which may contain it)."""
    done = [m for m in MAIN if _complete(recs, m)]
    test = {m: [float(r["methods"][m]["test_metric"]) for r in recs] for m in done}
    return {f"{c} vs {x}": (test[c], test[x]) for c in CLAIMANTS if c in test
            for x in done if x != c and not (c == "sewa" and x == "auto")}


def averaged(row: dict[str, Any]) -> int | None:
    """How many snapshots a method averaged: its recorded count, else its non-zero weights."""
    if row.get("averaged") is not None:
        return int(row["averaged"])
    w = row.get("weights")
    return None if w is None else sum(1 for x in w if x)


def task_entry(key: Key, recs: list[dict[str, Any]], allow_mixed: bool = False) -> dict[str, Any]:
    """One task-regime's summary entry (see the module docstring for units)."""
    commits = check_commits(key, recs, allow_mixed)
    r0 = recs[0]
    metric = r0["metric"]
    unit, scale = UNITS[metric]
    margin = stats.margin_for(metric)
    seeds = [r["seed"] for r in recs]
    methods = {}
    for m in labels(recs):
        rows = [r["methods"][m] for r in recs]
        methods[m] = {"test_metric": [_r(x.get("test_metric"), scale) for x in rows],
                      "val_metric": [_r(x.get("val_metric"), scale) for x in rows],
                      "val_loss": [_r(x.get("val_loss")) for x in rows],
                      "seconds": [_r(x.get("seconds")) for x in rows],
                      "averaged": [averaged(x) for x in rows],
                      "selected_on": rows[0].get("selected_on"), "choice_by": rows[0].get("choice_by")}
    verdicts = verdict_rows(comparisons(recs), margin, scale)
    scored = [m for m in MAIN if _complete(recs, m)]
    ranks = stats.ranks({m: [r["methods"][m]["test_metric"] for r in recs] for m in scored})
    baselines = [m for m in scored if m != "auto"]
    def best_of(ms: list[str]) -> str | None:
        return max(ms, key=lambda m: math.fsum(r["methods"][m]["test_metric"] for r in recs)) if ms else None
    refs = [r.get("reference") for r in recs]
    reference = None
    if all(refs):
        tm = [float(x["test_metric"]) for x in refs if x]
        reference = {"name": refs[0]["name"] if refs[0] else None, "test_metric": _r(math.fsum(tm) / len(tm), scale),
                     "per_seed": [_r(x, scale) for x in tm]}
    return {"task": key[0], "family": r0["family"], "regime": key[1], "preset": key[2],
            "format": r0["format"], "metric": metric, "unit": unit,
            "commit": Counter(str(r["git_commit"]) for r in recs).most_common(1)[0][0], "commits": commits,
            "mixed_commits": len({code_version(c) for c in commits}) > 1,
            "dirty": None if any(r.get("dirty") is None for r in recs) else any(r["dirty"] for r in recs),
            "seeds": seeds, "window": r0["window"], "window_note": r0.get("window_note"),
            "reference": reference, "methods": methods, "random_k": _random_k(recs, scale, scored),
            "k_curves": _k_curves(recs, scale), "ranks": ranks,
            "selection_check": selection_check(methods, scored), "auto": auto_record(recs), "best_baseline": best_of(baselines),
            "best_trajectory_baseline": best_of([m for m in baselines if m not in OWN_BRANCH]),
            "margin": _r(margin, scale), "alpha": stats.ALPHA, "verdicts": verdicts,
            "ablation_verdicts": ablation_verdicts(recs, margin, scale)}


def verdict_rows(pairs: Mapping[str, tuple[list[float], list[float]]], margin: float, scale: float) -> dict[str, dict[str, Any]]:
    """One family of paired comparisons (:func:`sewa.experiments.stats.compare`), in display units."""
    out = {}
    for name, c in stats.compare(pairs, margin).items():
        s = c.stats
        out[name] = {"verdict": c.verdict, "diff": _r(s.diff, scale),
                     "ci": None if s.ci is None else [_r(s.ci[0], scale), _r(s.ci[1], scale)],
                     "p": _r(s.p), "p_holm": _r(c.p_holm), "p_tost": _r(s.p_tost), "p_tost_holm": _r(c.p_tost_holm),
                     "p_wilcoxon": _r(s.p_wilcoxon), "n": s.n}
    return out


ABLATION_DEFAULT = ("objective", "val")
"""The ablation row that changes nothing: SeWA(K=10) with the spec's settings on the validation split."""


def ablation_contrasts(recs: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """The ablations as paired contrasts over the seeds that ran them: every changed setting against
    the default SeWA(K=10) of the same seed (rows that select the default's snapshots on every seed
    are the default under another name, and left out), and each choice rule by the loss against the
    same rule by the metric. Convergence is left out: its rows average other stretches of training."""
    recs = [r for r in recs if r.get("ablations")]

    def rows(ablation: str, v: Any) -> list[dict[str, Any]] | None:
        """The row of setting ``v`` on every seed, or ``None`` where a seed lacks it or its test metric."""
        found = [next((x for x in r["ablations"].get(ablation, []) if x["value"] == v), None) for r in recs]
        return None if any(x is None or "test_metric" not in x for x in found) else found  # type: ignore[return-value]

    def test(xs: list[dict[str, Any]]) -> list[float]:
        return [float(x["test_metric"]) for x in xs]

    default = rows(*ABLATION_DEFAULT) if recs else None
    if default is None:
        return {}
    pairs: dict[str, tuple[list[float], list[float]]] = {}
    for ablation, grid in recs[0]["ablations"].items():
        if ablation in ("convergence", "choice_by"):
            continue
        for v in (x["value"] for x in grid):
            got = rows(ablation, v)
            if got is None:
                continue
            same_window = ablation != "window" or all(v == r["window"] for r in recs)  # else indices are of a shorter window
            if same_window and all(g.get("indices") is not None and g.get("indices") == d.get("indices")
                                   for g, d in zip(got, default, strict=True)):
                continue  # the same selection on every seed: the default under another name
            pairs[f"{ablation}={v} vs default"] = (test(got), test(default))
    for x in recs[0]["ablations"].get("choice_by", []):
        rule, by = str(x["value"]).rsplit(" by ", 1)
        loss, metric = rows("choice_by", f"{rule} by loss"), rows("choice_by", f"{rule} by metric")
        if by == "loss" and loss is not None and metric is not None:
            pairs[f"{rule} by loss vs by metric"] = (test(loss), test(metric))
    return pairs


def ablation_verdicts(recs: list[dict[str, Any]], margin: float, scale: float) -> dict[str, Any] | None:
    """Verdicts of :func:`ablation_contrasts`, Holm-corrected as one family; ``None`` without ablations."""
    pairs = ablation_contrasts(recs)
    if not pairs:
        return None
    return {"seeds": [r["seed"] for r in recs if r.get("ablations")], "verdicts": verdict_rows(pairs, margin, scale)}


def selection_check(methods: dict[str, dict[str, Any]], scored: list[str]) -> dict[str, Any] | None:
    """The method best on the selection split (mean val metric, else mean val loss) and its rank on
    test, and the reverse: a leader on validation that is not one on test over-fitted the split."""
    on = "val_metric" if all(None not in methods[m]["val_metric"] for m in scored) else "val_loss"
    rated = [m for m in scored if None not in methods[m][on]]
    if not rated:
        return None
    sign = 1 if on == "val_metric" else -1
    by_val = sorted(rated, key=lambda m: -sign * math.fsum(methods[m][on]))
    by_test = sorted(rated, key=lambda m: -math.fsum(methods[m]["test_metric"]))
    return {"score": on, "methods": len(rated), "best_on_selection": by_val[0], "its_test_rank": by_test.index(by_val[0]) + 1,
            "best_on_test": by_test[0], "its_selection_rank": by_val.index(by_test[0]) + 1}


def auto_record(recs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What ``auto`` chose on each seed and why (issue 15): the chosen candidate, whether it fell
    back to the simplest one, whether it cross-fitted, its estimated gains on the selection split (in
    its objective's raw units, a loss gain is a loss decrease) and its passes against SeWA's."""
    rows = [r["methods"].get("auto") for r in recs]
    if not all(rows):
        return None

    def each(key: str, sub: str | None = None) -> list[Any]:
        vals = [(row or {}).get(key) for row in rows]
        return [v.get(sub) if isinstance(v, dict) else None for v in vals] if sub else vals

    passes = [(row or {}).get("forward_passes") for row in rows]
    sewa = [((row or {}).get("sewa_default_passes") or {}).get("forward") for row in rows]
    settings = [(row or {}).get("settings") or {} for row in rows]
    return {"chosen": each("chosen"), "family": each("chosen_family"), "objective": each("objective"),
            # auto's order among candidates within noise, and whether a fitted choice was refitted
            # ("simple" and no refit before commit c065994)
            "prefer": [x.get("prefer", "simple") for x in settings], "refit": [bool(x.get("refit", False)) for x in settings],
            "loss_tie_break": [bool(x.get("loss_tie_break", False)) for x in settings],
            # SeWA sets of k/8 and k/4 refitted as SeWA(K) (the defaults from commit 41c992f)
            "sets_at_k": [bool(x.get("refit_at_k", False)) for x in settings],
            "fell_back": each("fell_back"), "crossfit": each("crossfit"), "folds_used": each("folds_used"),
            "gain_vs_uniform": [_r(x) for x in each("gain_vs_uniform", "mean")],
            "gain_vs_uniform_se": [_r(x) for x in each("gain_vs_uniform", "se")],
            "gain_vs_last": [_r(x) for x in each("gain_vs_last", "mean")],
            "forward_passes_over_sewa": [None if a is None or not b else _r(a / b) for a, b in zip(passes, sewa, strict=True)],
            # the judge's check of the split's choice (BC, from commit 92e0754 on): None without one
            "judge_moved": [None if j is None else bool(j["moved"]) for j in each("judge")],
            "judge_seconds": [None if j is None else _r(j["seconds"]) for j in each("judge")]}


def measure(recs: list[dict[str, Any]]) -> str:
    """What the random-K draws and the K-curves score: the test metric, or for behaviour cloning
    (where a rollout per average would be too slow) the test loss on held-out episodes."""
    kc = recs[0].get("k_curves") or {}
    return str(kc.get("measure") or ("test_loss" if recs[0]["family"] == "bc" else "test_metric"))


def _random_k(recs: list[dict[str, Any]], scale: float, scored: list[str]) -> dict[str, Any] | None:
    """Per seed: the draws' mean and 5th/95th percentiles, and each method's percentile among them."""
    on = measure(recs)
    if not all(r.get("random_k") and r["random_k"].get(on) and None not in r["random_k"][on] for r in recs):
        return None
    s = scale if on.endswith("metric") else 1.0
    draws = [r["random_k"][on] for r in recs]
    rated = [m for m in scored if all(r["methods"][m].get(on) is not None for r in recs)]
    metric = [r["random_k"].get("test_metric") or [None] for r in recs]
    return {"k": recs[0]["random_k"]["k"], "draws": recs[0]["random_k"]["draws"], "measure": on,
            "test_metric_mean": [None if None in d else _r(math.fsum(d) / len(d), scale) for d in metric],
            f"{on}_mean": [_r(math.fsum(d) / len(d), s) for d in draws],
            f"{on}_p05": [_r(_quantile(d, 0.05), s) for d in draws],
            f"{on}_p95": [_r(_quantile(d, 0.95), s) for d in draws],
            "percentiles": {m: [_r(stats.percentile(r["methods"][m][on], d, higher=on.endswith("metric")))
                                for r, d in zip(recs, draws, strict=True)] for m in rated}}


def _quantile(xs: Iterable[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def _k_curves(recs: list[dict[str, Any]], scale: float) -> dict[str, Any] | None:
    """Mean over seeds of every K-curve that all seeds share, on their common Ks (``None`` at a K
    where a seed has no value)."""
    curves = [r.get("k_curves") for r in recs]
    if not all(curves) or len({tuple(c["Ks"]) for c in curves if c}) != 1:
        return None
    first = curves[0] or {}
    on = measure(recs)
    s = scale if on.endswith("metric") else 1.0
    series = [k for k, v in first.items() if k not in ("Ks", "random_k_draws") and isinstance(v, list)
              and all(c and isinstance(c.get(k), list) for c in curves)]
    out: dict[str, Any] = {"Ks": first["Ks"], "measure": on}
    for name in series:
        cols = [[c[name][i] for c in curves if c] for i in range(len(first["Ks"]))]
        out[name] = [None if None in col else _r(math.fsum(col) / len(col), s) for col in cols]
    return out


def entries(groups: Mapping[Key, list[dict[str, Any]]], allow_mixed: bool = False) -> dict[Key, dict[str, Any]]:
    """A summary entry for every group of runs."""
    return {key: task_entry(key, recs, allow_mixed) for key, recs in groups.items()}


def build(all_entries: Mapping[Key, dict[str, Any]]) -> dict[str, Any]:
    """The summary document: one entry per task and regime (the full preset where several exist)."""
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    rank = {p: i for i, p in enumerate(PRESET_ORDER)}
    for (task, regime, preset), entry in sorted(all_entries.items()):
        old = chosen.get((task, regime))
        if old is None or (rank.get(preset, len(rank)), preset) < (rank.get(old["preset"], len(rank)), old["preset"]):
            chosen[(task, regime)] = entry
    tasks = [chosen[k] for k in sorted(chosen)]
    return {"schema": SCHEMA, "generated_by": "python -m sewa.experiments.results",
            "units": {m: u for m, (u, _) in UNITS.items()}, "alpha": stats.ALPHA,
            "margins": {m: _r(v, UNITS[m][1]) for m, v in stats.MARGINS.items()},
            "tasks": tasks, "claims": claims(tasks)}


def claims(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each claim of :data:`CLAIMS` with the verdicts that bear on it and their counts."""
    out = []
    for claim, who, against, unstable in CLAIMS:
        found = []
        for e in tasks:
            if unstable and "unstable" not in e["regime"]:
                continue
            for x in against:
                x = {"<best>": e["best_baseline"], "<best_trajectory>": e.get("best_trajectory_baseline")}.get(x, x)
                v = e["verdicts"].get(f"{who} vs {x}")
                if v:
                    found.append({"where": f"{e['task']}/{e['regime']}", "vs": x, "verdict": v["verdict"]})
        counts = Counter(f["verdict"] for f in found)
        out.append({"claim": claim, "counts": {v: counts[v] for v in stats.VERDICTS}, "comparisons": found})
    return out


_SCALARS = re.compile(r"\[(?:[-0-9.eE+,\s]|null|true|false)*\]")


def dumps(doc: dict[str, Any]) -> str:
    """The summary as indented JSON with each per-seed list of numbers on one line."""
    text = json.dumps(doc, indent=1)
    return _SCALARS.sub(lambda m: " ".join(m.group(0).split()).replace("[ ", "[").replace(" ]", "]"), text) + "\n"


def write(root: Path, path: Path, allow_mixed: bool = False) -> Path:
    """Writes the summary of the runs under ``root`` to ``path``."""
    groups = load_runs(root)
    if not groups:
        raise FileNotFoundError(f"no runs under {root}: run `sewa experiment NAME` first")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(build(entries(groups, allow_mixed))))
    return path
