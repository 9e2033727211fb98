"""The Monte-Carlo credit ground truth (credit_truth.py) on every finished run of an experiment, pooled over seeds.

For each run DIR/runs/<ablation>/seed<k>/ with a done.json: credit_truth on its last checkpoint, with the
experiment's base config and the ablation's overrides (experiment.json), written to the run's credit_truth/
(skipped when its summary.md exists, so a rerun resumes). Then one table per experiment, DIR/credit_truth.md and
.csv: per ablation and signal, each agreement metric's mean over seeds with a t-interval over seeds, the truth's
and each signal's share of mass on each token type, and how much of the truth is sampling noise (credit_truth's
noise_fraction, and excess_share: the noise-corrected share of the squared truth per type); each run's figures
in DIR/credit_truth_per_seed.csv, to re-derive the intervals or pool new seeds.
`--rescore` first recomputes every analyzed run's tables from its units.csv (credit_truth --rescore: no sampling).

    python experiments/credit_truth_runs.py experiments/mitigations_char --episodes 64 --k 8

Run it from the directory the experiment ran in (its config's data and model paths are relative to it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stats import t_interval  # noqa: E402

METRICS = ("rank_correlation", "sign_agreement", "top_quartile_mass", "top_quartile_overlap", "excess_enrichment")
RUNNER_KEYS = ("training.", "data.task=", "eval.")  # set per run by the runner, not part of what an ablation is
RENAMED = {"mitigation.epsilon=": "mitigation.logprob_offset="}  # experiments recorded before a key's rename


def current_names(overrides: list[str]) -> list[str]:
    out = []
    for o in overrides:
        for old, new in RENAMED.items():
            o = new + o[len(old):] if o.startswith(old) else o
        out.append(o)
    return out


def last_checkpoint(run: Path) -> Path:
    steps = sorted((run / "ckpt").glob("step_*"))
    if not steps:
        raise FileNotFoundError(f"{run}: no checkpoint under ckpt/")
    return steps[-1]


def analyze_run(run: Path, config: str, overrides: list[str], episodes: int, k: int) -> Path:
    out = run / "credit_truth"
    if not (out / "summary.md").is_file():
        cmd = [sys.executable, str(ROOT / "credit_truth.py"), "--checkpoint", str(last_checkpoint(run)), "--config",
               config, "--episodes", str(episodes), "--k", str(k), "--output_dir", str(out), "--num_threads", "1",
               *[o for o in current_names(overrides) if not o.startswith(RUNNER_KEYS)]]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    return out


def rescore_run(out: Path) -> None:
    """credit_truth --rescore in this process (its imports once, not once per run)."""
    import credit_truth  # torch and the model stack: only when asked to rescore

    credit_truth.write_report(credit_truth.rescore(out, credit_truth.build_parser().get_default("bootstrap")), out)


def per_seed(frames: dict[tuple[str, int], pd.DataFrame]) -> pd.DataFrame:
    """One row per (ablation, seed, signal, figure): each run's overall metrics and per-type figures."""
    rows = []
    for (ablation, seed), df in frames.items():
        overall = df[(df.breakdown == "all")]
        for r in overall.itertuples():
            rows.append((ablation, seed, r.signal, r.metric, r.value))
        by_type = df[(df.breakdown == "type") & df.metric.isin(["mass_share", "excess_share", "noise_fraction"])]
        for r in by_type.itertuples():
            rows.append((ablation, seed, r.signal, f"{r.metric}_{r.group}", r.value))
    return pd.DataFrame(rows, columns=["ablation", "seed", "signal", "figure", "value"])


def pooled(long: pd.DataFrame) -> pd.DataFrame:
    """Per ablation, signal and figure: the mean over seeds and its 95% t-interval."""
    out = []
    for (ablation, signal, figure), g in long.groupby(["ablation", "signal", "figure"], sort=False):
        ci = t_interval(g.value.dropna().tolist()) if g.value.notna().any() else None
        out.append({"ablation": ablation, "signal": signal, "figure": figure, "seeds": int(g.value.notna().sum()),
                    "mean": ci.mean if ci else float("nan"), "ci95": ci.half_width if ci else float("nan")})
    return pd.DataFrame(out)


def markdown(table: pd.DataFrame, figure: str) -> str:
    wide = table[table.figure == figure].pivot(index="ablation", columns="signal", values="mean")
    half = table[table.figure == figure].pivot(index="ablation", columns="signal", values="ci95")
    cols = [c for c in ("mc_advantage", "grpo", "abs_logprob", "grad_proxy", "outcome_conditional", "inverse_logprob",
                        "attention_credit", "entropy_weighted", "entropy_masking", "attribution") if c in wide.columns]
    lines = [f"### {figure}", "", "| trained with | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for ab in wide.index:
        cells = [("n/a" if pd.isna(wide.loc[ab, c]) else f"{wide.loc[ab, c]:.3f}"
                  + ("" if pd.isna(half.loc[ab, c]) else f" ± {half.loc[ab, c]:.3f}")) for c in cols]
        lines.append(f"| `{ab}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def truth_markdown(table: pd.DataFrame, metric: str) -> str:
    """The truth's own figure per ablation (rows) and token type (columns)."""
    sub = table[(table.signal == "mc_advantage") & table.figure.str.startswith(metric + "_")]
    if sub.empty:
        return ""
    sub = sub.assign(group=sub.figure.str[len(metric) + 1:])
    wide, half = (sub.pivot(index="ablation", columns="group", values=v) for v in ("mean", "ci95"))
    lines = [f"### the truth's {metric} by token type", "", "| trained with | " + " | ".join(wide.columns) + " |",
             "|---" * (len(wide.columns) + 1) + "|"]
    for ab in wide.index:
        cells = [f"{wide.loc[ab, c]:.3f} ± {half.loc[ab, c]:.3f}" for c in wide.columns]
        lines.append(f"| `{ab}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", type=Path)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rescore", action="store_true", help="recompute every analyzed run's tables from its units.csv")
    p.add_argument("--seeds", type=int, nargs="*", help="analyze only these seeds (default: every finished one); "
                   "runs analyzed earlier are pooled whatever this says")
    args = p.parse_args(argv)
    spec = json.loads((args.experiment / "experiment.json").read_text())
    # the runner records the config's absolute path; in another clone, the same file name in the current directory
    config = spec["config"] if Path(spec["config"]).is_file() else Path(spec["config"]).name
    frames = {}
    for ablation, overrides in spec["ablations"].items():
        for run in sorted((args.experiment / "runs" / ablation).glob("seed*")):
            seed, done = int(run.name[4:]), (run / "credit_truth" / "summary.md").is_file()
            if not done and (run / "done.json").is_file() and (not args.seeds or seed in args.seeds):
                analyze_run(run, config, list(overrides), args.episodes, args.k)
                done = True
            if done and args.rescore:
                rescore_run(run / "credit_truth")
            if done:
                frames[(ablation, seed)] = pd.read_csv(run / "credit_truth" / "agreement.csv")
    long = per_seed(frames)
    long.to_csv(args.experiment / "credit_truth_per_seed.csv", index=False)  # to re-derive or pool new seeds
    table = pooled(long)
    table.to_csv(args.experiment / "credit_truth.csv", index=False)
    figures = [*METRICS, *sorted(f for f in table.figure.unique() if f.startswith("mass_share_"))]
    figures += ["noise_fraction"] if "noise_fraction" in set(table.figure) else []
    text = [f"# Credit ground truth per ablation ({args.experiment.name})", "",
            f"credit_truth.py on each run's last checkpoint: {args.episodes} completions of held-out problems, "
            f"token values from K = {args.k} continuations; per run the figure over its episodes, here the mean "
            "over seeds ± the 95% t-interval half-width over seeds. Rows: the policy trained with that ablation; "
            "columns: the credit signal scored on it (mc_advantage: the truth against itself).", "",
            "    python experiments/credit_truth_runs.py " + " ".join(sys.argv[1:] if argv is None else argv), ""]
    text += [markdown(table, f) + "\n" for f in figures]
    text += [truth_markdown(table, m) for m in ("excess_share", "noise_fraction")]
    (args.experiment / "credit_truth.md").write_text("\n".join(text))
    print(f"wrote {args.experiment / 'credit_truth.md'}")


if __name__ == "__main__":
    main()
