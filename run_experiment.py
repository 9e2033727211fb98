"""One command per comparison: ablations x seeds, scheduled over GPUs (or run in turn on CPU), summarized
with confidence intervals.

    python run_experiment.py --task bandit --ablations baseline,softmax --seeds 3 --steps 30 --out runs/exp/bandit
    python run_experiment.py --task countdown --ablations drgrpo_all --seeds 3 --steps 100 --gpus 0,1,2,3 --out DIR
    python run_experiment.py ... --gpus 0,1,2,3 --gpus-per-job 2 --out DIR   # each job: torchrun on 2 GPUs

Ablations are named presets of config overrides (ablations.yaml), or preset groups from the same file.
Every ablation runs on the same seeds. Each run is `train.py` in its own directory DIR/runs/<ablation>/seed<k>/
(metrics.jsonl, TensorBoard events, checkpoints, credit logs); one job per GPU (CUDA_VISIBLE_DEVICES), a queue
when there are more jobs than GPUs. Rerunning the command skips finished runs and resumes interrupted ones
from their last checkpoint. The results:
- DIR/summary.csv and DIR/summary.md: per ablation, the final and area-under-curve eval success (mean and 95%
  t-interval over seeds), the paired difference to the baseline with its interval and p-value, mean response
  length and entropy, and any failed run with the tail of its log;
- DIR/curves.png: eval success against step, mean and 95% band per ablation;
- DIR/credit/: analyze_credit's comparison of the ablations' credit logs (all seeds pooled).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent
ABLATIONS_FILE = REPO / "ablations.yaml"
TASK_CONFIGS = {"countdown": "config_tiny.yaml", "bandit": "config_bandit.yaml"}
SPEC_FILE = "experiment.json"


class ExperimentError(ValueError):
    """A bad experiment request, reported before any job starts."""


# ============================================================================ planning


def load_presets(path: Path = ABLATIONS_FILE) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    data = yaml.safe_load(path.read_text())
    presets = {str(k): [str(o) for o in (v or [])] for k, v in data["presets"].items()}
    groups = {str(k): [str(n) for n in v] for k, v in (data.get("groups") or {}).items()}
    return presets, groups


def resolve_ablations(names: str, presets: dict[str, list[str]], groups: dict[str, list[str]]) -> list[str]:
    """Comma-separated preset or group names -> preset names in order, each once."""
    out: list[str] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name in groups:
            out += [n for n in groups[name] if n not in out]
        elif name in presets:
            if name in out:
                raise ExperimentError(f"ablation {name!r} is listed twice (its runs would share one directory)")
            out.append(name)
        else:
            raise ExperimentError(f"unknown ablation {name!r}; presets: {', '.join(presets)}; "
                                  f"groups: {', '.join(groups)}")
    if not out:
        raise ExperimentError("--ablations names no ablation")
    return out


@dataclass
class Job:
    ablation: str
    seed: int
    overrides: list[str]
    dir: Path
    slot: str = ""
    status: str = "pending"  # pending | running | done | failed | skipped
    returncode: int | None = None
    log_tail: str = ""
    started: float = 0.0
    last_step: int = 0
    resume: bool = False

    @property
    def name(self) -> str:
        return f"{self.ablation} seed={self.seed}"

    @property
    def log(self) -> Path:
        return self.dir / "train.log"


def plan_jobs(ablations: Sequence[str], presets: dict[str, list[str]], seeds: Sequence[int], steps: int,
              out: Path, task: str, common: Sequence[str] = ()) -> list[Job]:
    """Seed-major order, so a partial experiment already holds every ablation at the first seeds."""
    jobs = []
    for seed in seeds:
        for ab in ablations:
            d = out / "runs" / ab / f"seed{seed}"
            overrides = [f"data.task={task}", f"training.seed={seed}", f"training.max_steps={steps}",
                         f"training.log_dir={d / 'logs'}", f"training.ckpt_dir={d / 'ckpt'}",
                         f"credit.dir={d / 'credit'}", *common, *presets[ab]]
            jobs.append(Job(ab, seed, overrides, d))
    return jobs


def check_output_dir(out: Path, spec: dict) -> None:
    """`out` must not sit inside another experiment or hold one below it, and if it holds this experiment
    already, with the same task, config, steps and the same overrides for every ablation they share."""
    for parent in out.resolve().parents:
        if (parent / SPEC_FILE).is_file():
            raise ExperimentError(f"--out {out} is inside the experiment at {parent}; choose a directory outside it")
    if out.is_dir():
        nested = [p.parent for p in out.rglob(SPEC_FILE) if p.parent.resolve() != out.resolve()]
        if nested:
            raise ExperimentError(f"--out {out} already holds another experiment at {nested[0]}")
    old_file = out / SPEC_FILE
    if not old_file.is_file():
        return
    old = json.loads(old_file.read_text())
    for key in ("task", "config", "steps", "overrides"):
        if old.get(key, [] if key == "overrides" else None) != spec[key]:
            raise ExperimentError(f"--out {out} holds an experiment with {key}={old.get(key)!r} (this one: "
                                  f"{spec[key]!r}); use another --out")
    for ab, overrides in spec["ablations"].items():
        if ab in old["ablations"] and old["ablations"][ab] != overrides:
            raise ExperimentError(f"--out {out}: ablation {ab!r} ran there with other overrides "
                                  f"({old['ablations'][ab]}); use another --out")


def check_gpus(gpus: str | None, per_job: int = 1) -> list[str]:
    """The GPU slots: one id per job, or with `per_job` > 1 groups of that many ids ("0,1", "2,3") that each
    run one job under torchrun."""
    if per_job < 1:
        raise ExperimentError("--gpus-per-job must be >= 1")
    if gpus is None:
        if per_job > 1:
            raise ExperimentError("--gpus-per-job needs --gpus")
        return []
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bad = [g for g in ids if not g.isdigit() or int(g) >= count]
    if bad or not ids or len(set(ids)) != len(ids):
        valid = ", ".join(map(str, range(count))) if count else "none (no CUDA device is visible; omit --gpus to run on CPU)"
        raise ExperimentError(f"--gpus {gpus}: GPU id(s) {', '.join(bad) or gpus} do not exist or repeat; valid: {valid}")
    if len(ids) % per_job:
        raise ExperimentError(f"--gpus {gpus}: {len(ids)} GPUs do not split into groups of --gpus-per-job {per_job}")
    return [",".join(ids[i:i + per_job]) for i in range(0, len(ids), per_job)]


def mark_finished(jobs: Sequence[Job]) -> None:
    """Finished runs are skipped; interrupted ones with a checkpoint resume; others restart clean."""
    from checkpoint import latest_checkpoint

    for job in jobs:
        if (job.dir / "done.json").is_file():
            job.status = "skipped"
        elif latest_checkpoint(job.dir / "ckpt") is not None:
            job.resume = True
        elif job.dir.exists():  # started but never checkpointed: nothing to resume
            shutil.rmtree(job.dir)


# ============================================================================ running


class Process:
    """What the scheduler needs of a running job (subprocess.Popen has it; tests pass fakes)."""

    def poll(self) -> int | None: ...


def schedule(jobs: Sequence[Job], slots: Sequence[str], start: Callable[[Job, str], Process],
             on_tick: Callable[[Sequence[Job]], None] = lambda jobs: None, poll_seconds: float = 1.0) -> None:
    """Run the pending jobs, at most one per slot at a time, starting the next one as a slot frees up."""
    queue = [j for j in jobs if j.status == "pending"]
    running: dict[str, tuple[Job, Process]] = {}
    while queue or running:
        for slot in slots:
            if slot not in running and queue:
                job = queue.pop(0)
                job.slot, job.status, job.started = slot, "running", time.time()
                running[slot] = (job, start(job, slot))
        for slot, (job, proc) in list(running.items()):
            rc = proc.poll()
            if rc is not None:
                job.returncode = rc
                finish(job)
                del running[slot]
        on_tick(jobs)
        if queue or running:
            time.sleep(poll_seconds)


def finish(job: Job) -> None:
    """done.json for a run that exited 0 with its last step logged; else failed, with its log's tail."""
    metrics = read_metrics(job.dir / "logs" / "metrics.jsonl")
    steps = int(next(o.split("=", 1)[1] for o in job.overrides if o.startswith("training.max_steps=")))
    if job.returncode == 0 and metrics and metrics[-1].get("step") == steps:
        job.status = "done"
        (job.dir / "done.json").write_text(json.dumps({"ablation": job.ablation, "seed": job.seed,
                                                       "final": metrics[-1]}, indent=1))
    else:
        job.status = "failed"
        job.log_tail = tail(job.log)


def tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return "(no log)"
    text = path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([x for x in text.splitlines() if x.strip() and "it/s]" not in x][-lines:])


def job_command(config: str, job: Job, slot: str, gpu: bool, threads: int) -> list[str]:
    """`train.py` for a job: on its GPU, under torchrun over its GPU group ("0,1": 2 processes), or on CPU
    with `threads` threads."""
    extra = ["model.device=cuda"] if gpu else ["model.device=cpu", f"training.num_threads={threads}"]
    nproc = len(slot.split(",")) if gpu else 1
    run = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                              if nproc > 1 else [])
    return [*run, str(REPO / "train.py"), "--config", config, *job.overrides, *extra] + (["--resume"] if job.resume else [])


def launcher(config: str, gpu: bool, threads: int) -> Callable[[Job, str], Process]:
    """Start a job's `job_command`, its GPUs alone visible to it (CUDA_VISIBLE_DEVICES)."""
    def start(job: Job, slot: str) -> Process:
        job.dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=slot if gpu else "")
        cmd = job_command(config, job, slot, gpu, threads)
        log = open(job.log, "a")
        try:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        finally:
            log.close()
    return start


class Progress:
    """A line per job when it starts, every `every` seconds while it runs (step and ETA), and when it ends."""

    def __init__(self, total: int, steps: int, every: float = 30.0):
        self.total, self.steps, self.every = total, steps, every
        self.seen: dict[str, tuple[str, float]] = {}

    def __call__(self, jobs: Sequence[Job]) -> None:
        now = time.time()
        for i, job in enumerate(jobs, 1):
            if job.status not in ("running", "done", "failed") or not job.slot:
                continue
            last_status, last_time = self.seen.get(job.name, ("", 0.0))
            if job.status == last_status and (job.status != "running" or now - last_time < self.every):
                continue
            self.seen[job.name] = (job.status, now)
            where = f"gpu {job.slot}" if job.slot.isdigit() else job.slot
            step = job.last_step = last_step(job.log)
            eta = ""
            if job.status == "running" and step > 0:
                eta = f", eta {fmt_seconds((now - job.started) / step * (self.steps - step))}"
            print(f"[{i}/{self.total}] {job.name} on {where}: {job.status}, step {step}/{self.steps}{eta}", flush=True)


def last_step(log: Path) -> int:
    if not log.is_file():
        return 0
    step = 0
    for line in log.read_text(errors="replace").splitlines()[-50:]:
        if line.startswith("step ") and "/" in line:
            try:
                step = int(line.split()[1].split("/")[0])
            except ValueError:
                pass
    return step


def fmt_seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


# ============================================================================ summary


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class RunResult:
    """The numbers of one finished run."""

    steps: list[int]
    evals: list[float]
    response_length: float
    entropy: float

    @property
    def final(self) -> float:
        return self.evals[-1]


def run_result(rows: list[dict]) -> RunResult | None:
    points = [(r["step"], r["success_rate/eval"]) for r in rows if r.get("success_rate/eval") is not None]
    train_rows = [r for r in rows if r.get("step", 0) > 0]
    if not points:
        return None

    def mean_of(key: str) -> float:
        vals = [r[key] for r in train_rows if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else math.nan

    return RunResult([p[0] for p in points], [p[1] for p in points], mean_of("response_length"), mean_of("entropy"))


@dataclass
class Summary:
    rows: list[dict[str, Any]]
    curves: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # ablation -> step -> per-seed values
    failed: list[Job] = field(default_factory=list)
    baseline: str = ""


def summarize(jobs: Sequence[Job], ablations: Sequence[str], baseline: str) -> Summary:
    """Per ablation: final and AUC eval success over seeds, and the paired comparison with the baseline."""
    from stats import normalized_auc, paired_test, t_interval

    results: dict[str, dict[int, RunResult]] = {ab: {} for ab in ablations}
    summary = Summary(rows=[], baseline=baseline, failed=[j for j in jobs if j.status == "failed"])
    for job in jobs:
        if job.status in ("done", "skipped"):
            result = run_result(read_metrics(job.dir / "logs" / "metrics.jsonl"))
            if result is not None:
                results[job.ablation][job.seed] = result
    base = results.get(baseline, {})
    for ab in ablations:
        res = results[ab]
        seeds = sorted(res)
        final = t_interval([res[s].final for s in seeds])
        auc = t_interval([normalized_auc(res[s].steps, res[s].evals) for s in seeds])
        row: dict[str, Any] = {"ablation": ab, "n_seeds": len(seeds), "final_eval_mean": final.mean,
                               "final_eval_ci95": final.half_width, "auc_eval_mean": auc.mean,
                               "auc_eval_ci95": auc.half_width, "diff_vs_baseline": None, "diff_ci95": None,
                               "p_value": None, "auc_diff_vs_baseline": None, "auc_diff_ci95": None,
                               "auc_p_value": None}
        paired = [s for s in seeds if s in base]
        if ab != baseline and len(paired) >= 2:
            cmp = paired_test([res[s].final for s in paired], [base[s].final for s in paired])
            row.update(diff_vs_baseline=cmp.diff.mean, diff_ci95=cmp.diff.half_width, p_value=cmp.p_value)
            auc_cmp = paired_test([normalized_auc(res[s].steps, res[s].evals) for s in paired],
                                  [normalized_auc(base[s].steps, base[s].evals) for s in paired])
            row.update(auc_diff_vs_baseline=auc_cmp.diff.mean, auc_diff_ci95=auc_cmp.diff.half_width,
                       auc_p_value=auc_cmp.p_value)
        row["response_length_mean"] = t_interval([res[s].response_length for s in seeds]).mean
        row["entropy_mean"] = t_interval([res[s].entropy for s in seeds]).mean
        row["failed_runs"] = sum(j.ablation == ab for j in summary.failed)
        summary.rows.append(row)
        curve: dict[int, list[float]] = {}
        for s in seeds:
            for step, value in zip(res[s].steps, res[s].evals):
                curve.setdefault(step, []).append(value)
        summary.curves[ab] = curve
    return summary


def _judge(d: float, h: float, p: float, baseline: str, n: int) -> str:
    span = f"{d:+.3f} [{d - h:+.3f}, {d + h:+.3f}], p = {p:.3f}"
    if p < 0.05:
        return f"{'better' if d > 0 else 'worse'} than {baseline} at 95% ({span})"
    return f"no significant difference from {baseline} at {n} seeds ({span})"


def verdict(row: dict[str, Any], baseline: str) -> str:
    """What the intervals support, in words; never more. Final success and the whole curve (AUC) each get
    their own paired test."""
    if row["ablation"] == baseline:
        return "baseline"
    if row["p_value"] is None:
        return "not compared (fewer than 2 seeds paired with the baseline)"
    out = "final: " + _judge(row["diff_vs_baseline"], row["diff_ci95"], row["p_value"], baseline, row["n_seeds"])
    if row.get("auc_p_value") is not None:
        out += "; AUC: " + _judge(row["auc_diff_vs_baseline"], row["auc_diff_ci95"], row["auc_p_value"], baseline,
                                  row["n_seeds"])
    return out


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_summary(summary: Summary, out: Path, header: str) -> str:
    import pandas as pd

    table = pd.DataFrame(summary.rows)
    table.to_csv(out / "summary.csv", index=False)
    cols = list(table.columns)
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in summary.rows]
    lines += ["", "Final = eval success at the last eval point; AUC = its average over the eval points; ci95 = "
              "half-width of the t-based 95% interval over seeds; diff/p = paired t-test against the baseline "
              "on the same seeds, for the final value and for the AUC.", "", "## Verdicts", ""]
    lines += [f"- `{r['ablation']}`: {verdict(r, summary.baseline)}" for r in summary.rows]
    for job in summary.failed:
        lines += ["", f"## Failed: {job.name} (exit {job.returncode})", "", "```", job.log_tail, "```"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def plot_curves(summary: Summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stats import t_interval

    fig, ax = plt.subplots(figsize=(8, 5))
    for ab, curve in summary.curves.items():
        if not curve:
            continue
        steps = sorted(curve)
        ivs = [t_interval(curve[s]) for s in steps]
        mean = [iv.mean for iv in ivs]
        half = [0.0 if math.isnan(iv.half_width) else iv.half_width for iv in ivs]
        ax.plot(steps, mean, marker="o", ms=3, label=f"{ab} (n={max(iv.n for iv in ivs)})")
        ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("eval success rate")
    ax.set_title("eval success: mean over seeds, 95% t-interval band")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def credit_comparison(jobs: Sequence[Job], ablations: Sequence[str], tokenizer_path: Path, out: Path) -> str:
    """analyze_credit over each ablation's credit logs, seeds pooled (steps offset so episodes stay distinct)."""
    import pandas as pd

    import analyze_credit as ac

    logs = {}
    for ab in ablations:
        frames = []
        for k, job in enumerate(j for j in jobs if j.ablation == ab and j.status in ("done", "skipped")):
            try:
                df = ac.load_credit_logs(job.dir / "credit")
            except ac.CreditLogError:
                continue
            frames.append(df.assign(step=df["step"] + 1_000_000 * k) if "step" in df.columns else df)
        if frames:
            logs[ab] = pd.concat(frames, ignore_index=True)
            logs[ab].attrs = dict(frames[0].attrs)  # concat drops them; the mitigation name lives there
    if not logs:
        return "no credit logs to compare"
    first, *rest = logs
    ac.analyze(logs[first], ac.load_tokenizer(tokenizer_path), out, label=first,
               compare={k: logs[k] for k in rest} or None)
    return f"credit comparison of {', '.join(logs)} -> {out}"


# ============================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="countdown | bandit | gsm8k")
    p.add_argument("--ablations", required=True, help="comma-separated presets or groups from ablations.yaml")
    p.add_argument("--seeds", type=int, default=3, help="runs per ablation, seeds 1..N (default 3)")
    p.add_argument("--steps", type=int, required=True, help="training steps per run")
    p.add_argument("--out", required=True, type=Path, help="the experiment's directory")
    p.add_argument("--config", default=None, help="base config (default: config_tiny.yaml for countdown, "
                                                  "config_bandit.yaml for bandit; required for gsm8k)")
    p.add_argument("--gpus", default=None, help="GPU ids, one job per GPU at a time (default: CPU, one job at a time)")
    p.add_argument("--gpus-per-job", type=int, default=1,
                   help="GPUs per job: each job runs under torchrun over a group of this many of --gpus")
    p.add_argument("--cpu-workers", type=int, default=1, help="on CPU, jobs at a time (threads split between them)")
    p.add_argument("--baseline", default=None, help="the ablation others are compared with (default: baseline "
                                                    "if listed, else the first)")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value", dest="overrides",
                   help="a config override for every run (repeatable), e.g. --set eval.transfer_num_numbers=[]")
    p.add_argument("--no-credit", action="store_true", help="skip the credit-log comparison")
    return p


def prepare(args: argparse.Namespace) -> tuple[list[str], list[Job], dict, list[str], str]:
    """Every check before anything starts: task, ablations, seeds, GPUs, config, output directory."""
    from config import ConfigError, load_config
    from tasks import TASKS

    if args.task not in TASKS:
        raise ExperimentError(f"unknown task {args.task!r}; valid: {', '.join(sorted(TASKS))}")
    config = args.config or TASK_CONFIGS.get(args.task)
    if config is None:
        raise ExperimentError(f"--task {args.task} has no default config; pass --config (e.g. a copy of "
                              f"config.yaml with data.path set)")
    if args.seeds < 1 or args.steps < 1 or args.cpu_workers < 1:
        raise ExperimentError("--seeds, --steps and --cpu-workers must be >= 1")
    presets, groups = load_presets()
    ablations = resolve_ablations(args.ablations, presets, groups)
    baseline = args.baseline or ("baseline" if "baseline" in ablations else ablations[0])
    if baseline not in ablations:
        raise ExperimentError(f"--baseline {baseline!r} is not among the ablations ({', '.join(ablations)})")
    slots = check_gpus(args.gpus, args.gpus_per_job) or [f"cpu{i}" for i in range(args.cpu_workers)]
    seeds = list(range(1, args.seeds + 1))
    jobs = plan_jobs(ablations, presets, seeds, args.steps, args.out, args.task, args.overrides)
    try:
        for ab in ablations:  # every ablation's config is valid before any job starts
            load_config(config, next(j for j in jobs if j.ablation == ab).overrides)
    except ConfigError as e:
        raise ExperimentError(f"config error: {e}") from e
    spec = {"task": args.task, "config": config, "steps": args.steps, "overrides": args.overrides,
            "ablations": {a: presets[a] for a in ablations}}
    check_output_dir(args.out, spec)
    return ablations, jobs, spec, slots, baseline


def build_shared_assets(config_path: str, task: str, overrides: Sequence[str]) -> Path:
    """Data and the built-in model are shared by all runs: build them once here, not in racing jobs."""
    from config import load_config
    from tasks import build_task

    cfg = load_config(config_path, [f"data.task={task}", *overrides])
    t = build_task(cfg)
    train_set, _ = t.load()
    path = Path(cfg.model.path)
    if cfg.model.build_tiny and not (path / "config.json").is_file():
        t.build_model(path, train_set)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out = args.out.resolve()
    if args.config is not None:  # relative to where the command was typed; the runs then start in the repo
        args.config = str(Path(args.config).resolve())
    os.chdir(REPO)  # the configs' own relative paths (runs/tiny/model, ...) are relative to the repo
    try:
        ablations, jobs, spec, slots, baseline = prepare(args)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    old = json.loads((args.out / SPEC_FILE).read_text()) if (args.out / SPEC_FILE).is_file() else {"ablations": {}}
    spec["ablations"] = {**old["ablations"], **spec["ablations"]}
    (args.out / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    mark_finished(jobs)
    model_dir = build_shared_assets(spec["config"], args.task, args.overrides)
    todo = [j for j in jobs if j.status == "pending"]
    print(f"[experiment] {len(jobs)} runs ({len(ablations)} ablations x {args.seeds} seeds, {args.steps} steps): "
          f"{len(jobs) - len(todo)} already finished, {sum(j.resume for j in todo)} to resume, "
          f"on {', '.join(slots)}", flush=True)
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    schedule(jobs, slots, launcher(spec["config"], bool(args.gpus), threads), Progress(len(jobs), args.steps))
    summary = summarize(jobs, ablations, baseline)
    header = (f"# Experiment: {args.task}, {', '.join(ablations)}\n\n{args.seeds} seeds x {args.steps} steps, "
              f"config `{spec['config']}`. Command:\n\n    python run_experiment.py {' '.join(argv or sys.argv[1:])}")
    text = write_summary(summary, args.out, header)
    plot_curves(summary, args.out / "curves.png")
    if not args.no_credit:
        print(credit_comparison(jobs, ablations, model_dir, args.out / "credit"))
    print(text)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
