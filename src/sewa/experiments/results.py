"""Regenerates ``docs/RESULTS.md`` and its plots from the raw per-run JSON files.

    python -m sewa.experiments.results [--runs results/experiments] [--out docs]

Nothing here is typed by hand: every figure comes from the runs found under ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

SUBSTITUTES = """\
The paper's data cannot be downloaded on the machines these runs used (no internet), so real
substitutes were used, as listed in the project's data notes:

- **Behaviour cloning** (paper: D4RL hopper/halfcheetah/walker2d): D4RL-style `medium-expert`
  datasets generated here in real MuJoCo (gymnasium `*-v5`, same observation/action sizes as D4RL)
  from linear policies the project trained itself with Augmented Random Search. Scores are
  D4RL-normalised with the standard reference returns. Original D4RL hdf5 files are accepted with
  `--data PATH`. For these tasks the test metric is the return of 10 fresh evaluation episodes per
  method; "test loss" and "val loss" are both the action MSE on the held-out 5% of transitions that
  is also the selection split.
- **Image classification** (paper: CIFAR-100): Fashion-MNIST (Debian `dataset-fashion-mnist`) with a
  CIFAR-style ResNet-8 with BatchNorm. A CIFAR-100 code path (`sewa experiment cifar100 --data DIR`,
  torchvision folder format) exists but was not run: CIFAR is not obtainable here.
- **Text classification** (paper: AG News, 120k train rows): the 7,600 real rows of the AG News test
  split, re-split 5,600/1,000/1,000 (stratified, fixed seed); BBC News (headline + first sentence,
  de-duplicated). Full AG News CSVs are accepted with `--data DIR`.
"""

BASELINES = ("last", "uniform", "swa_lr", "ema", "lawa10", "lawa100", "random10", "greedy_soup", "twa")
ORDER = BASELINES + ("sewa1", "sewa5", "sewa10", "sewa20", "sewa50")


# An absolute POSIX path inside a run's data description (ends at a space, ':', ',', ';' or a bracket).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s:,;()]+")


def data_source(text: str) -> str:
    """A run's data description with machine-specific absolute paths replaced by where the data
    came from, so the generated document reads the same whichever machine ran or renders it.

    - a file inside an installed package (``.../site-packages/PKG/REST``) becomes
      "the PKG package (REST)";
    - a file in the data folder beside the repository (``.../shared/data/REST``, where
      :mod:`sewa.experiments.data` looks by default) becomes ``../shared/data/REST``;
    - a system package's folder (``/usr/...``) is the same on every machine and stays;
    - any other path keeps its last two components (``…/folder/file``).
    """
    return _ABSOLUTE_PATH.sub(lambda m: _where(m.group(0)), text)


def _where(path: str) -> str:
    parts = PurePosixPath(path).parts
    if "site-packages" in parts[:-1]:
        i = parts.index("site-packages")
        rest = "/".join(parts[i + 2 :])
        return f"the {parts[i + 1]} package" + (f" ({rest})" if rest else "")
    if parts[1:2] == ("usr",):
        return path
    for i in range(1, len(parts) - 1):
        if parts[i : i + 2] == ("shared", "data"):
            return "../" + "/".join(parts[i:])
    return "…/" + "/".join(parts[-2:])


def load_runs(root: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """All run records, grouped by (task, preset), sorted by seed."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(root.glob("*/*/seed*.json")):
        rec = json.loads(path.read_text())
        runs[(rec["task"], rec["preset"])].append(rec)
    for recs in runs.values():
        recs.sort(key=lambda r: r["seed"])
    return dict(runs)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def paired_ci(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired seeds and its two-sided t confidence interval."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, s = mean_std(d)
    if len(d) < 2:
        return m, float("nan"), float("nan")
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, len(d) - 1)) * s / math.sqrt(len(d))
    return m, m - half, m + half


def _scale(rec: dict[str, Any]) -> float:
    return 100.0 if rec["family"] != "bc" else 1.0  # accuracies in %, BC already in normalised score


def _fmt(m: float, s: float) -> str:
    return f"{m:.2f} ± {s:.2f}"


def method_table(recs: list[dict[str, Any]]) -> list[str]:
    """Rows: method | test metric | val metric | test loss | #averaged | seconds."""
    k = _scale(recs[0])
    lines = ["| method | test metric | test loss | val loss | averaged | seconds |", "|---|---|---|---|---|---|"]
    names = [n for n in ORDER if n in recs[0]["methods"]] + sorted(set(recs[0]["methods"]) - set(ORDER))
    for name in names:
        rows = [r["methods"][name] for r in recs if name in r["methods"]]
        if len(rows) != len(recs):
            continue
        tm = mean_std([x["test_metric"] * k for x in rows])
        tl = mean_std([x["test_loss"] for x in rows])
        vl = mean_std([x["val_loss"] for x in rows])
        sec = mean_std([x["seconds"] for x in rows])
        lines.append(f"| {name} | {_fmt(*tm)} | {tl[0]:.4f} | {vl[0]:.4f} | {rows[0].get('averaged', '')} | {sec[0]:.1f} |")
    return lines


def paired_table(recs: list[dict[str, Any]], ref: str = "sewa10") -> tuple[list[str], dict[str, str]]:
    """SeWA(K=10) minus each baseline, paired over seeds, with 95% CIs, and a verdict per baseline."""
    k = _scale(recs[0])
    lines = [f"| {ref} minus | mean diff | 95% CI | verdict |", "|---|---|---|---|"]
    verdicts: dict[str, str] = {}
    a = [r["methods"][ref]["test_metric"] * k for r in recs]
    for name in BASELINES:
        if not all(name in r["methods"] for r in recs):
            continue
        b = [r["methods"][name]["test_metric"] * k for r in recs]
        m, lo, hi = paired_ci(a, b)
        verdict = "n/a (1 seed)" if math.isnan(lo) else ("win" if lo > 0 else "loss" if hi < 0 else "tie")
        verdicts[name] = verdict
        ci = "n/a" if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"
        lines.append(f"| {name} | {m:+.2f} | {ci} | {verdict} |")
    return lines, verdicts


def overfit_table(groups: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Selection-split loss against test metric for the K=10 methods: does winning on the
    selection split carry over to the test split?"""
    names = ("lawa10", "random10", "sewa10", "greedy_soup", "twa")
    lines = ["| task | " + " | ".join(f"{n} val loss / test" for n in names) + " | best val loss | best test |",
             "|---|" + "---|" * (len(names) + 2)]
    for (task, preset), recs in sorted(groups.items()):
        k = _scale(recs[0])
        val = {n: mean_std([r["methods"][n]["val_loss"] for r in recs])[0] for n in names}
        test = {n: mean_std([r["methods"][n]["test_metric"] * k for r in recs])[0] for n in names}
        cells = " | ".join(f"{val[n]:.4f} / {test[n]:.2f}" for n in names)
        lines.append(f"| {task} ({preset}) | {cells} | {min(val, key=val.__getitem__)} | {max(test, key=test.__getitem__)} |")
    return lines


def compute_table(groups: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Training epoch time against SeWA's whole selection time, and trajectory memory."""
    lines = ["| task | preset | params | window | trajectory MB | epoch s | SeWA(10) selection s | selection / epoch | fwd+bwd passes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (task, preset), recs in sorted(groups.items()):
        c = [r["compute"] for r in recs]
        ep = mean_std([x["epoch_seconds"] for x in c])[0]
        sel = mean_std([x["selection_seconds"] for x in c])[0]
        lines.append(f"| {task} | {preset} | {c[0]['params']:,} | {recs[0]['window']} | {c[0]['trajectory_bytes'] / 2**20:.1f} | "
                     f"{ep:.1f} | {sel:.1f} | {sel / ep:.2f} | {c[0]['selection_forward_backward']} |")
    return lines


def ablation_plots(groups: dict[tuple[str, str], list[dict[str, Any]]], out: Path) -> list[str]:
    """One figure per (task, preset) with ablations; returns Markdown lines (tables + images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: list[str] = []
    for (task, preset), recs in sorted(groups.items()):
        recs = [r for r in recs if "ablations" in r]
        if not recs:
            continue
        k = _scale(recs[0])
        keys = list(recs[0]["ablations"])
        fig, axes = plt.subplots(2, 4, figsize=(16, 7))
        lines += [f"### Ablations: {task} ({preset}, {len(recs)} seeds, SeWA K=10 unless varied)", ""]
        for ax, key in zip(axes.flat, keys, strict=False):
            values = [row["value"] for row in recs[0]["ablations"][key]]
            if key == "convergence":
                steps = [row["step"] for row in recs[0]["ablations"][key]]
                for series in ("last", "uniform", "lawa10", "sewa10"):
                    ys = [mean_std([r["ablations"][key][i][series] * k for r in recs])[0] for i in range(len(values))]
                    ax.plot(steps, ys, marker="o", label=series)
                ax.set_xlabel("training step at which averaging happens")
                ax.legend(fontsize=7)
                row_txt = " · ".join(f"step {s}: " + ", ".join(f"{n} {mean_std([r['ablations'][key][i][n] * k for r in recs])[0]:.2f}"
                                                              for n in ("last", "uniform", "lawa10", "sewa10")) for i, s in enumerate(steps))
                lines.append(f"- **convergence**: {row_txt}")
            else:
                stats = [mean_std([r["ablations"][key][i]["test_metric"] * k for r in recs]) for i in range(len(values))]
                labels = [str(v) for v in values]
                ax.errorbar(range(len(values)), [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3)
                ax.set_xticks(range(len(values)), labels)
                ax.set_xlabel(key)
                lines.append(f"- **{key}**: " + ", ".join(f"{lab} → {m:.2f} ± {s:.2f}" for lab, (m, s) in zip(labels, stats, strict=True)))
            ax.set_title(key)
            ax.set_ylabel(recs[0]["metric"])
        fig.suptitle(f"{task} ({preset}): SeWA ablations, mean ± std over {len(recs)} seeds")
        fig.tight_layout()
        name = f"ablations_{task}_{preset}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        lines += ["", f"![ablations {task}]({name})", ""]
    return lines


def render(root: Path, out: Path) -> Path:
    """Writes ``out/RESULTS.md`` (and plots) from the runs under ``root``."""
    groups = load_runs(root)
    if not groups:
        raise FileNotFoundError(f"no runs under {root}: run `sewa experiment NAME` first")
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Results", "", "Generated by `python -m sewa.experiments.results` from the raw runs in "
          f"`{root}`. Do not edit by hand.", "", "## Data used", "", SUBSTITUTES]
    discussion: list[str] = []
    totals: Counter[str] = Counter()
    by_family: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key, recs in groups.items():
        by_family[recs[0]["family"]].append(key)
    for family in sorted(by_family):
        md += [f"## {family}", ""]
        for task, preset in sorted(by_family[family]):
            recs = groups[(task, preset)]
            r0 = recs[0]
            unit = "% accuracy" if family != "bc" else "D4RL-normalised score"
            subset = r0["config"].get("train_subset")
            trained_on = f" Training used a fixed subset of {subset} of the training items." if subset else ""
            commits = ", ".join(dict.fromkeys(str(r["git_commit"])[:10] for r in recs))
            md += [f"### {task} ({preset} preset)", "",
                   f"Data: {data_source(r0['data_source'])}.{trained_on} Seeds: {[r['seed'] for r in recs]}. Window k={r0['window']} "
                   f"snapshots every {r0['config']['every']} steps (steps {r0['steps'][0]}–{r0['steps'][-1]}). "
                   f"Test metric in {unit}, mean ± std over {len(recs)} seeds. Machine: {r0['machine']['platform']}, "
                   f"{r0['machine'].get('cpus', r0['machine'].get('cpu_count'))} CPUs, torch {r0['machine']['torch']}; commits {commits}.", ""]
            md += method_table(recs) + [""]
            lines, verdicts = paired_table(recs)
            md += lines + [""]
            counts = {v: sum(1 for x in verdicts.values() if x == v) for v in ("win", "tie", "loss")}
            totals.update(v for v in verdicts.values())
            discussion.append(f"- **{task}** ({len(recs)} seed{'s' if len(recs) != 1 else ''}): SeWA(K=10) wins against {counts['win']}, ties with "
                              f"{counts['tie']} and loses to {counts['loss']} of {len(verdicts)} baselines "
                              f"({', '.join(f'{k}: {v}' for k, v in verdicts.items())}).")
    md += ["## Compute", "", "Wall-clock on the machine named above; selection counts SeWA's forward and backward passes "
           "(steps × samples).", ""] + compute_table(groups) + [""]
    md += ["## Selection split against test split", "",
           "Loss on the validation split (which SeWA, greedy soup and TWA optimise) next to the test metric, "
           "mean over seeds. A method that wins on validation but not on test has over-fitted the selection split.", ""]
    md += overfit_table(groups) + [""]
    md += ["## Ablations", ""] + ablation_plots(groups, out)
    md += ["## Discussion", "", "Verdicts use paired differences over seeds with a 95% t interval: a win or loss needs "
           "the whole interval on one side of zero.", "",
           f"Over all tasks and baselines, SeWA(K=10) has {totals['win']} significant wins, {totals['tie']} ties and "
           f"{totals['loss']} significant losses ({totals['n/a (1 seed)']} comparisons have a single seed). "
           + ("On this data the paper's claim (SeWA matches or beats the baselines) holds at best as 'matches': most "
              "differences are within seed noise. " if totals["win"] <= totals["tie"] else "")
           + "Where a method optimised on the validation split leads there but not on test (table above), it has "
           "over-fitted the selection split.", ""] + discussion + [""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: regenerate the results document."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="results/experiments", type=Path)
    p.add_argument("--out", default="docs", type=Path)
    args = p.parse_args(argv)
    print(render(args.runs, args.out))


if __name__ == "__main__":
    main()
