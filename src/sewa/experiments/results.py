"""Regenerates ``docs/RESULTS.md``, its plots and ``results/summary.json`` from the raw runs.

    python -m sewa.experiments.results [--runs results/experiments] [--out docs]
                                       [--summary results/summary.json] [--allow-mixed]

Nothing here is typed by hand: every figure, verdict and count comes from the runs found under
``--runs`` (formats 1 and 2, read by :mod:`sewa.experiments.summary`), with the statistics of
:mod:`sewa.experiments.stats`.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from ..auto import COST_LIMIT
from . import stats, summary
from .plots import _on, _title, ablation_plots, k_curve_plot, mean_std, rank_plot
from .summary import MAIN, Key

SUBSTITUTES = """\
The paper's data cannot be downloaded on the machines these runs used (no internet), so real
substitutes were used, as listed in the project's data notes:

- **Behaviour cloning** (paper: D4RL hopper/halfcheetah/walker2d): D4RL-style `medium-expert`
  datasets generated here in real MuJoCo (gymnasium `*-v5`, same observation/action sizes as D4RL)
  from linear policies the project trained itself with Augmented Random Search. Scores are
  D4RL-normalised with the standard reference returns. Original D4RL hdf5 files are accepted with
  `--data PATH`. Each task's section names its evaluation episodes and selection split.
  halfcheetah is left out: its linear ARS expert scores only 25 normalised (issue 14 asks for at
  least 40), and a stronger expert was not trained here.
- **Image classification** (paper: CIFAR-100): Fashion-MNIST (Debian `dataset-fashion-mnist`) with a
  small CNN (two conv layers, 207k parameters, no BatchNorm): a ResNet would not fit the compute
  budget of this 2-core machine. A CIFAR-100 code path (`sewa experiment cifar100 --data DIR`,
  torchvision folder format) exists but was not run: CIFAR is not obtainable here.
- **Text classification** (paper: AG News, 120k train rows): the 7,600 real rows of the AG News test
  split, re-split (stratified, fixed seed); BBC News (headline + first sentence, de-duplicated).
  Full AG News CSVs are accepted with `--data DIR`.
"""

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


def _spec(measure: str, values: list[float | None]) -> str:
    """The format spec of a measure's numbers: a metric in two decimals; a loss in four, or in scientific notation
    when it is below 0.01 (behaviour cloning's action losses are near 1e-4, where fixed decimals print every method
    alike)."""
    if measure == "test_metric":
        return ".2f"
    return ".4f" if max((abs(v) for v in values if v is not None), default=1.0) >= 0.01 else ".3e"


def _ms(xs: list[float | None], f: str = ".2f", missing: str = "—") -> str:
    """Mean ± std over seeds in format ``f``; ``missing`` where no seed has a value (a failed method, an unrecorded
    metric)."""
    vals = [x for x in xs if x is not None]
    if len(vals) < len(xs) or not vals:
        return missing if not vals else f"{mean_std(vals)[0]:{f}} ({len(xs) - len(vals)} {missing})"
    m, s = mean_std(vals)
    return f"{m:{f}} ± {s:{f}}"


def _span(xs: list[Any]) -> str:
    vals = [x for x in xs if x is not None]
    if not vals:
        return "—"
    lo, hi = min(vals), max(vals)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _p(x: float | None) -> str:
    return "—" if x is None else ("<0.001" if x < 0.001 else f"{x:.3f}")


def method_table(recs: list[dict[str, Any]], entry: dict[str, Any]) -> list[str]:
    """Main table: the reference, then every method with its mean ± std over seeds, losses, the
    range over seeds of how many snapshots it averaged, what it selects on, its mean rank, its time."""
    u = "%" if entry["metric"] == "accuracy" else "pts"
    lines = [f"| method | test ({u}) | val ({u}) | test loss | val loss | averaged (range over seeds) | selects on | "
             "choice by | mean rank | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    ref = entry["reference"]
    if ref:
        lines.append(f"| reference: {ref['name']} | {_ms(ref['per_seed'])} | — | — | — | — | — | — | — | — |")
    else:
        lines.append("| reference | not recorded by these runs | — | — | — | — | — | — | — | — |")
    loss = {split: {label: _avg([r["methods"][label].get(f"{split}_loss") for r in recs]) for label in entry["methods"]}
            for split in ("test", "val")}
    f = _spec("loss", [v for split in loss.values() for v in split.values()])
    for label, row in entry["methods"].items():
        rank = entry["ranks"].get(label)
        lines.append(f"| {label if label in MAIN else label + ' (extra)'} | {_ms(row['test_metric'], missing='failed')} | {_ms(row['val_metric'])} | "
                     f"{_num(loss['test'][label], f)} | {_num(loss['val'][label], f)} | {_span(row['averaged'])} | "
                     f"{row['selected_on'] or '—'} | {row['choice_by'] or '—'} | "
                     f"{'—' if rank is None else f'{mean_std(rank)[0]:.1f}'} | {_ms(row['seconds'], '.1f')} |")
    return lines


def verdict_table(entry: dict[str, Any]) -> list[str]:
    """Paired differences with their t interval, raw and Holm-adjusted p-values, TOST and Wilcoxon."""
    lines = ["| comparison | mean diff | 95% CI | p (t) | p Holm | TOST p Holm | Wilcoxon p | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in entry["verdicts"].items():
        ci = "—" if v["ci"] is None else f"[{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]"
        lines.append(f"| {name} | {v['diff']:+.2f} | {ci} | {_p(v['p'])} | {_p(v['p_holm'])} | {_p(v['p_tost_holm'])} | "
                     f"{_p(v['p_wilcoxon'])} | **{v['verdict']}** |")
    return lines


def ablation_tables(entries: dict[Key, dict[str, Any]]) -> list[str]:
    """The ablations as paired verdicts: each changed setting against the default SeWA(K=10) of the same seed."""
    lines: list[str] = []
    for key, e in sorted(entries.items()):
        ab = e.get("ablation_verdicts")
        if not ab:
            continue
        lines += [f"### Ablations against the default: {_title(key)}, seeds {_seed_list(ab['seeds'])}", "",
                  "Each changed setting against SeWA(K=10) with the spec's settings on the same seed and selection split "
                  "(the `objective: val` row; rows that select its snapshots on every seed are left out), and each choice rule by the "
                  f"loss against the same rule by the metric. Holm over these {len(ab['verdicts'])} contrasts, margin "
                  f"±{e['margin']:g} {e['unit']}, read as the main tables'.", ""] + verdict_table(ab) + [""]
    return lines


def _seed_list(seeds: list[int]) -> str:
    """Seeds as ranges: 0–9, 20–29."""
    runs: list[list[int]] = []
    for s in sorted(seeds):
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


def random_k_table(entry: dict[str, Any]) -> list[str]:
    """The random-K distribution per seed and each method's percentile in it."""
    rk = entry["random_k"]
    if not rk:
        return []
    name, f = _on(rk["measure"]), _spec(rk["measure"], rk[rk["measure"] + "_mean"])
    lo, hi = mean_std(rk[f"{rk['measure']}_p05"])[0], mean_std(rk[f"{rk['measure']}_p95"])[0]
    lines = [f"Random-K (K={rk['k']}, {rk['draws']} draws per seed, scored by the {name}): mean "
             f"{_ms(rk[rk['measure'] + '_mean'], f)}, 5th–95th percentile of the draws {lo:{f}}–{hi:{f}} (mean over "
             "seeds). Each method's percentile in its seed's distribution (the share of draws it beats):", "",
             "| method | mean percentile | range over seeds |", "|---|---|---|"]
    for label, pct in rk["percentiles"].items():
        lines.append(f"| {label} | {mean_std(pct)[0]:.0f} | {min(pct):.0f}–{max(pct):.0f} |")
    return lines + [""]


def k_curve_table(entry: dict[str, Any]) -> list[str]:
    """Mean over seeds at each K, per curve, and the best K of each curve."""
    kc = entry["k_curves"]
    if not kc:
        return []
    series = [s for s in kc if s not in ("Ks", "measure")]
    name, f = _on(kc["measure"]), _spec(kc["measure"], [v for s in series for v in kc[s]])
    lines = ["| K | " + " | ".join(series) + " |", "|---|" + "---|" * len(series)]
    lines += [f"| {k} | " + " | ".join(_num(kc[s][i], f) for s in series) + " |" for i, k in enumerate(kc["Ks"])]
    sign = 1 if kc["measure"] == "test_metric" else -1
    best = ", ".join(f"{s}: K={max((sign * v, k) for v, k in zip(kc[s], kc['Ks'], strict=True) if v is not None)[1]}"
                     for s in series if any(v is not None for v in kc[s]))
    return [f"K-curves (mean {name} over seeds):", ""] + lines + ["", f"Best K per curve: {best}.", ""]


def describe(recs: list[dict[str, Any]], entry: dict[str, Any]) -> str:
    """The paragraph above a task's tables: data, seeds, window, machine and provenance."""
    r0, cfg = recs[0], recs[0]["config"]
    subset = cfg.get("train_subset")
    episodes = f" Test returns come from {cfg['episodes']} evaluation episodes per method." if entry["family"] == "bc" and cfg.get("episodes") else ""
    steps = f" (steps {r0['steps'][0]}–{r0['steps'][-1]})" if r0.get("steps") else ""
    flags = []
    if entry["mixed_commits"]:
        flags.append(f"**runs of {len(entry['commits'])} commits** ({', '.join(c[:10] for c in entry['commits'])})")
    else:
        flags.append(f"commit {entry['commit'][:10]}")
    if entry["format"] == summary.LEGACY_FORMAT:
        flags.append("format-1 runs (no reference, no dirty flag; which split a method selects on is inferred from that runner)")
    if entry["dirty"]:
        flags.append("**at least one run from a tree with uncommitted changes**")
    machines: dict[str, list[int]] = {}
    for r in recs:
        m = r["machine"]
        desc = (f"{m.get('platform')}, {m.get('cpus', m.get('cpu_count'))} CPUs, torch {m.get('torch')}"
                f"{', ' + str(m['device']) if m.get('device') else ''}")
        machines.setdefault(desc, []).append(r["seed"])
    machine = (f"Machine: {next(iter(machines))}." if len(machines) == 1 else
               "Machines: " + "; ".join(f"{d} (seeds {_seed_list(sorted(s))})" for d, s in machines.items()) + ".")
    split = r0.get("selection_split")
    where = f" Selection split: {split['name']} ({split['items']} items)." if split else ""
    note = f" Note: {r0['measure_note']}." if r0.get("measure_note") else ""
    every = f" every {cfg['every']} steps" if cfg.get("every") else ""
    return (f"Data: {data_source(r0['data_source'])}.{f' Training used a fixed subset of {subset} items.' if subset else ''}"
            f"{episodes} Seeds: {_seed_list(entry['seeds'])}. Window k={entry['window']}{every}"
            f"{steps}: {entry['window_note'] or 'placement not recorded'}. Test metric in {entry['unit']}, mean ± std over "
            f"{len(recs)} seed{'s' if len(recs) != 1 else ''}; equivalence margin ±{entry['margin']:g}.{where}{note} {machine} "
            f"Provenance: {'; '.join(flags)}.")


def _avg(xs: list[Any]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return mean_std(vals)[0] if vals and len(vals) == len(xs) else None


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def compute_table(groups: dict[Key, list[dict[str, Any]]], entries: dict[Key, dict[str, Any]]) -> list[str]:
    """Training epoch time against SeWA's selection time, auto's time against SeWA's (with the part
    its judge's validation rollouts took, for BC), and memory."""
    lines = ["| task — regime (preset) | params | window | trajectory MB | epoch s | SeWA(10) selection s | selection / epoch | "
             "fwd+bwd passes | auto s | of it, judge s | auto / SeWA (mean per seed) | highest seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, recs in sorted(groups.items()):
        c = [r.get("compute", {}) for r in recs]
        ep, sel = _avg([x.get("epoch_seconds") for x in c]), _avg([x.get("selection_seconds") for x in c])
        methods = entries[key]["methods"]
        auto = _avg(methods["auto"]["seconds"]) if "auto" in methods else None
        judge = _avg((entries[key].get("auto") or {}).get("judge_seconds") or [None])
        ratios = auto_time_ratios(methods)
        mb = c[0].get("trajectory_bytes")
        lines.append(f"| {_title(key)} | {_num(c[0].get('params'), ',')} | {recs[0]['window']} | "
                     f"{_num(None if mb is None else mb / 2**20, '.1f')} | {_num(ep, '.1f')} | {_num(sel, '.1f')} | "
                     f"{_num(sel / ep if sel is not None and ep else None, '.2f')} | {c[0].get('selection_forward_backward', '—')} | "
                     f"{_num(auto, '.1f')} | {_num(judge, '.1f')} | {_num(sum(ratios) / len(ratios) if ratios else None, '.2f')} | "
                     f"{_num(max(ratios) if ratios else None, '.2f')} |")
    return lines


def selection_table(entries: dict[Key, dict[str, Any]]) -> list[str]:
    """Does the method best on the selection split (its metric, else its loss) stay best on test?"""
    lines = ["| task — regime (preset) | selection score | best on it | its test rank | best on test | its selection rank |",
             "|---|---|---|---|---|---|"]
    for key, e in sorted(entries.items()):
        c = e["selection_check"]
        if c:
            lines.append(f"| {_title(key)} | {c['score'].replace('_', ' ')} | {c['best_on_selection']} | {c['its_test_rank']} of "
                         f"{c['methods']} | {c['best_on_test']} | {c['its_selection_rank']} of {c['methods']} |")
    return lines


def _est_gain(a: dict[str, Any], metric: str) -> str:
    """auto's estimated gain over uniform on the selection split, mean ± mean SE over seeds: a metric in the table's
    units (accuracy in points), a loss as a decrease in its raw units."""
    objectives = sorted({str(o) for o in a["objective"]})
    gain, se = _avg(a["gain_vs_uniform"]), _avg(a.get("gain_vs_uniform_se") or [None])
    if gain is None:
        return f"— ({', '.join(objectives)})"
    scale, f = (100.0, ".2f") if objectives == ["metric"] and metric == "accuracy" else (1.0, ".3g")
    return f"{scale * gain:+{f}}" + ("" if se is None else f" ± {scale * se:{f}}") + f" ({', '.join(objectives)})"


def auto_table(entries: dict[Key, dict[str, Any]]) -> list[str]:
    """Per task-regime: what auto chose on each seed, how often it fell back, its estimated gain over
    uniform on the selection split against its realised gain on test, and its cost."""
    lines = ["| task — regime (preset) | auto's order | chosen per seed | fell back | cross-fitted | judge moved it | "
             "est. gain vs uniform (val ± SE, objective) | test gain vs uniform | forward passes / SeWA's |", "|---|---|---|---|---|---|---|---|---|"]
    for key, e in sorted(entries.items()):
        a, ms = e["auto"], e["methods"]
        if not a:
            continue
        test = _avg([x - y for x, y in zip(ms["auto"]["test_metric"], ms["uniform"]["test_metric"], strict=True)]
                    if "uniform" in ms and None not in ms["auto"]["test_metric"] + ms["uniform"]["test_metric"] else [None])
        n = len(a["chosen"])
        order = ", ".join(sorted({f"{p}{' + refit' if r else ''}{' + loss tie-break' if b else ''}{' + SeWA(K) sets' if k else ''}"
                                  for p, r, b, k in zip(a.get("prefer") or ["simple"] * n, a.get("refit") or [False] * n,
                                                        a.get("loss_tie_break") or [False] * n, a.get("sets_at_k") or [False] * n,
                                                        strict=True)}))
        judged = [m for m in a.get("judge_moved") or [] if m is not None]
        moved = f"{sum(judged)} of {len(judged)}" if judged else "—"
        lines.append(f"| {_title(key)} | {order} | {', '.join(str(c) for c in a['chosen'])} | {sum(bool(f) for f in a['fell_back'])} of "
                     f"{len(a['chosen'])} | {sum(bool(f) for f in a['crossfit'])} of {len(a['chosen'])} | {moved} | "
                     f"{_est_gain(a, e['metric'])} | {_num(test, '+.2f')} | "
                     f"{_num(_avg(a['forward_passes_over_sewa']), '.2f')} |")
    return lines if len(lines) > 2 else []


def expert_check(path: Path) -> list[str]:
    """The BC pipeline's sanity check (``python -m sewa.experiments.mujoco_bc expert-check``):
    BC on expert-only data should come close to the expert."""
    if not path.exists():
        return ["Expert-only sanity check: not run yet (`python -m sewa.experiments.mujoco_bc expert-check --env ...`).", ""]
    data = json.loads(path.read_text())
    commit = data["machine"].get("git_commit") or "unknown"
    lines = [f"**Expert-only sanity check** (`{data['command']}`, commit {commit[:10]}"
             f"{', dirty' if data['machine'].get('dirty') else ''}): BC trained on expert-only data against the expert "
             "itself, D4RL-normalised, on the same test episodes.", "",
             "| env | BC on expert data | expert | BC steps | test episodes |", "|---|---|---|---|---|"]
    lines += [f"| {r['env']} | {r['bc_score']:.1f} | {r['expert_score']:.1f} | {r['steps']} | {r['episodes']} |" for r in data["rows"]]
    return lines + [""]


def auto_time_ratios(methods: dict[str, Any]) -> list[float] | None:
    """auto's time over SeWA's, per seed (both timed in the same run), or None without both."""
    if not {"auto", "sewa"} <= methods.keys() or None in methods["auto"]["seconds"] + methods["sewa"]["seconds"]:
        return None
    return [a / b for a, b in zip(methods["auto"]["seconds"], methods["sewa"]["seconds"], strict=True)]


def cost_claim(tasks: list[dict[str, Any]]) -> list[str]:
    """auto's time against SeWA's: the task-regimes (mean of the per-seed ratios) and seeds
    within :data:`sewa.auto.COST_LIMIT`."""
    limit = COST_LIMIT
    ratios = {f"{e['task']}/{e['regime']}": r for e in tasks if (r := auto_time_ratios(e["methods"]))}
    if not ratios:
        return []
    means = {k: sum(v) / len(v) for k, v in ratios.items()}
    over = [k for k, m in means.items() if m > limit]
    seeds = [x for v in ratios.values() for x in v]
    worst = max(means, key=lambda k: means[k])
    return [f"- **auto takes at most {limit:g}x the time of one default SeWA selection** (both timed in the same run): "
            f"{len(ratios) - len(over)} of {len(ratios)} task-regimes within on the mean"
            + (f" (over: {', '.join(f'{k} {means[k]:.2f}x' for k in over)})" if over else f" (the highest, {worst}: {means[worst]:.2f}x)")
            + f"; {sum(x <= limit for x in seeds)} of {len(seeds)} seeds within (the highest {max(seeds):.2f}x)."]


def ablation_claim(tasks: list[dict[str, Any]]) -> list[str]:
    """The ablations' verdicts per task-regime, naming those that are not inconclusive."""
    parts = []
    for e in tasks:
        ab = e.get("ablation_verdicts")
        if not ab:
            continue
        vs = ab["verdicts"]
        n = Counter(v["verdict"] for v in vs.values())
        named = "; ".join(f"{v}: " + ", ".join(f"{name} ({x['diff']:+.2f})" for name, x in vs.items() if x["verdict"] == v)
                          for v in stats.VERDICTS if n[v] and v != "inconclusive")
        parts.append(f"{e['task']}/{e['regime']} (seeds {_seed_list(ab['seeds'])}): " + ", ".join(f"{n[v]} {v}" for v in stats.VERDICTS)
                     + f" of {len(vs)}" + (f" ({named})" if named else ""))
    return ["- **SeWA's settings, each against the default SeWA(K=10) of the same seeds** (the ablations): "
            + "; ".join(parts) + "."] if parts else []


def discussion(doc: dict[str, Any]) -> list[str]:
    """The paper's claims (and auto's) one by one, each with the counts of the verdicts on it."""
    tasks = doc["tasks"]
    lines = [f"Counts are over the summary's task-regimes ({len(tasks)}); every verdict is Holm-corrected within its "
             f"task-regime at α={stats.ALPHA} and the margins declared in `sewa.experiments.stats`.", ""]
    for c in doc["claims"]:
        if not c["comparisons"]:
            lines.append(f"- **{c['claim']}**: no run bears on it yet.")
            continue
        n, found = c["counts"], c["comparisons"]
        detail = "; ".join(f"{v}: " + ", ".join(f"{x['where']} vs {x['vs']}" for x in found if x["verdict"] == v)
                           for v in stats.VERDICTS if n[v] and v != "inconclusive")
        lines.append(f"- **{c['claim']}**: " + ", ".join(f"{n[v]} {v}" for v in stats.VERDICTS) + f" of {len(found)} comparison{'s' if len(found) != 1 else ''}"
                     + (f" ({detail})." if detail else "."))
    lines += cost_claim(tasks) + ablation_claim(tasks)
    pct = [(e["task"], e["regime"], e["random_k"]["measure"], e["random_k"]["percentiles"]["sewa"]) for e in tasks
           if e["random_k"] and "sewa" in e["random_k"]["percentiles"]]
    lines.append("- **SeWA's selection beats picking K snapshots at random** (SeWA's percentile in the random-K "
                 "distribution): " + ("; ".join(f"{t}/{r}: {mean_std(p)[0]:.0f} by {m.replace('_', ' ')} (range over "
                                               f"seeds {min(p):.0f}–{max(p):.0f})" for t, r, m, p in pct) + "."
        if pct else "no run records a random-K distribution yet."))
    total = Counter(v["verdict"] for e in tasks for v in e["verdicts"].values())
    lines += ["", "All comparisons: " + ", ".join(f"{total[v]} {v}" for v in stats.VERDICTS) + "."]
    return lines


def render(root: Path, out: Path, summary_path: Path | None = None, allow_mixed: bool = False) -> Path:
    """Writes ``out/RESULTS.md``, its plots and (when given) the summary JSON from the runs under ``root``."""
    groups = summary.load_runs(root)
    if not groups:
        raise FileNotFoundError(f"no runs under {root}: run `sewa experiment NAME` first")
    entries = summary.entries(groups, allow_mixed)
    doc = summary.build(entries)
    out.mkdir(parents=True, exist_ok=True)
    if summary_path is not None:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(summary.dumps(doc))
    fewest = min(len(e["seeds"]) for e in entries.values())
    margins = ", ".join(f"{m}: ±{v:g} {summary.UNITS[m][0]}" for m, v in doc["margins"].items())
    md = ["# Results", "", f"Generated by `python -m sewa.experiments.results` from the raw runs in `{root}`"
          + (f" (machine-readable: `{summary_path}`)" if summary_path else "") + ". Do not edit by hand.", "",
          "## Data used", "", SUBSTITUTES, "## How to read the verdicts", "",
          "Every comparison pairs two methods on the same training runs (one difference per seed). The 95% interval is "
          "a t interval of the mean difference; p is the paired t-test; **p Holm** corrects it over the task-regime's "
          f"family of comparisons. **Equivalent** means TOST (Holm-corrected) shows the difference inside the margin "
          f"declared before the runs ({margins}); **better**/**worse** means a Holm-significant difference not shown to "
          f"be inside the margin; everything else is **inconclusive** (a wide interval is never a tie). α={doc['alpha']}. "
          "The Wilcoxon signed-rank p-value is a distribution-free check on the t-test; with n seeds it cannot go below "
          f"2/2^n ({2 / 2**fewest:.3f} at the fewest seeds here, n={fewest}).", ""]
    for family in sorted({e["family"] for e in entries.values()}):
        md += [f"## {family}", ""]
        if family == "bc":
            md += expert_check(root.parent / "bc_expert_check.json")
        for key in sorted(k for k, e in entries.items() if e["family"] == family):
            recs, e = groups[key], entries[key]
            md += [f"### {_title(key)}", "", describe(recs, e), ""] + method_table(recs, e) + [""]
            md += verdict_table(e) + [""] + random_k_table(e) + k_curve_table(e)
    md += ["## Ranks", ""] + rank_plot(entries, out) + k_curve_plot(entries, out)
    auto = auto_table(entries)
    md += ["## Choosing automatically", "", "What `auto` chose on each seed: a fallback is a candidate other than the best-"
           "scoring one, chosen within noise of it by the one-standard-error rule and auto's `prefer` order (see each "
           "run's settings: \"simple\", or from commit c065994 on \"fitted\", whose fitted choice is then refitted on the "
           "whole split; \"loss tie-break\": uniform also yields to a fitted candidate within noise whose loss is lower "
           "beyond noise; \"SeWA(K) sets\": from commit 41c992f on, SeWA sets of k/8 and k/4 from a budget of k/8, a "
           "chosen one refitted as SeWA(K), and fitted candidates chosen within 2.5 SEs; \"judge moved it\": for BC from "
           "commit 92e0754 on, validation rollouts of auto's finalists moved "
           "its choice to another finalist); the estimated gain is on the selection split, the mean over seeds ± the mean "
           "of its per-seed standard errors, in the table's units for an accuracy objective and in the loss's raw units "
           "(a decrease) for a loss, next to the gain realised on test in the table's units.", ""] + auto + [""] if auto else []
    md += ["## Compute", "", "Wall-clock on the machines named above; passes count SeWA's forward and backward passes "
           "(steps × samples). \"of it, judge s\": the part of auto's time its judge spent on validation rollouts "
           "(behaviour cloning); \"highest seed\": the largest per-seed auto / SeWA ratio.", ""] + compute_table(groups, entries) + [""]
    md += ["## Selection split against test split", "", "The method best on the selection (validation) metric and where it "
           "ranks on test, and the reverse: a method that leads on validation but not on test has over-fitted the "
           "selection split, or the split does not track the test metric.", ""] + selection_table(entries) + [""]
    md += ["## Ablations", ""] + ablation_plots(groups, out) + ablation_tables(entries)
    md += ["## Discussion", ""] + discussion(doc) + [""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: regenerate the results document, its plots and the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="results/experiments", type=Path)
    p.add_argument("--out", default="docs", type=Path)
    p.add_argument("--summary", default="results/summary.json", type=Path)
    p.add_argument("--allow-mixed", action="store_true", help="render task-regimes whose runs come from several commits (flagged)")
    args = p.parse_args(argv)
    print(render(args.runs, args.out, args.summary, args.allow_mixed))


if __name__ == "__main__":
    main()
