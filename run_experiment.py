"""One command per comparison: ablations x seeds, scheduled over GPUs (or run in turn on CPU), summarized
with confidence intervals, exact tests and a record of the code and config each run used.

    python run_experiment.py --task bandit --ablations baseline,softmax --seeds 3 --steps 30 --out runs/exp/bandit
    python run_experiment.py --task countdown --ablations drgrpo_all --seeds 3 --steps 100 --gpus 0,1,2,3 --out DIR
    python run_experiment.py ... --gpus 0,1,2,3 --gpus-per-job 2 --out DIR   # each job: torchrun on 2 GPUs
    python run_experiment.py ... --seed-scope all --out DIR     # a seed also varies the warm-up and the eval draw

Ablations are named presets of config overrides (ablations.yaml), or preset groups from the same file.
Every ablation runs on the same seeds. Each run is `train.py` in its own directory DIR/runs/<ablation>/seed<k>/
(metrics.jsonl, TensorBoard events, checkpoints, credit logs, run.json: the commit, dirty flag, resolved config
and overrides of every launch); one job per GPU (CUDA_VISIBLE_DEVICES), a queue when there are more jobs than
GPUs. Rerunning the command skips finished runs, resumes interrupted ones from their last checkpoint, and takes
a finished run whose directory is gone from per_seed.csv (so committed per-seed values pool with new seeds
without re-running them). One invocation at a time per --out (a lock; a dead process's lock is taken over);
on an error, Ctrl-C or SIGTERM the running jobs are stopped (rerun to resume). The results:
- DIR/summary.csv, DIR/summary.md: per ablation, final and area-under-curve eval success (mean, 95% t-interval
  over seeds); per comparison with the baseline, the pairs tested, the paired difference with its interval, the
  t-test p, Holm's adjustment over the comparisons in the summary, the exact sign and Wilcoxon p, the minimum
  difference detectable at 80% power, and a verdict that says no more than those support; where the code and
  config came from (runs at other commits are pooled and listed); the credit figures' filler/reasoning ratios;
- DIR/per_seed.csv: one row per run (ablation, seed, final, AUC, eval curve, commit, config hash, credit
  figures): every number in the summary can be re-derived from it;
- DIR/curves.png: eval success against step, mean and 95% band per ablation;
- DIR/credit/: analyze_credit's comparison of the ablations' credit logs (all seeds pooled).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent
ABLATIONS_FILE = REPO / "ablations.yaml"
TASK_CONFIGS = {"countdown": "config_tiny.yaml", "bandit": "config_bandit.yaml"}
SPEC_FILE = "experiment.json"
PER_SEED_FILE = "per_seed.csv"
RUN_RECORD = "run.json"
LOCK_FILE = ".run_experiment.lock"
SEED_SCOPES = {
    "training": "a seed sets training.seed only (question order, sampling noise, initialization of added heads); "
                "every run starts from the same warmed-up model and is evaluated on the same eval draw, so the "
                "intervals leave out those two sources of variation",
    "all": "a seed k also sets tiny.seed = k (its own warmed-up model, built once per seed before the runs) and "
           "eval.seed = k (its own eval sampling noise and transfer problems)",
}
# keys the runner sets itself (from the flag named): --set or a preset may not set them
RUNNER_KEYS = {"training.seed": "--seeds", "training.max_steps": "--steps", "data.task": "--task",
               "training.log_dir": "--out", "training.ckpt_dir": "--out", "credit.dir": "--out"}
SCOPE_ALL_KEYS = {"tiny.seed": "--seed-scope all", "eval.seed": "--seed-scope all"}
# where a run is and who it is, not what it computes: left out of the config hash, so one ablation's seeds share it
IDENTITY_KEYS = ("training.seed", "tiny.seed", "eval.seed", "model.path", "model.device", "training.num_threads",
                 "training.log_dir", "training.ckpt_dir", "credit.dir")
UNRECORDED = "unrecorded"


class ExperimentError(ValueError):
    """A bad experiment request, reported before any job starts."""


# ============================================================================ the project's config and tasks
# The runner's only uses of config.py and tasks.py, kept here so a move there is one edit here.


def task_names() -> list[str]:
    from parts import tasks  # parts: every built-in task registered

    return sorted(tasks.TASKS)


def import_modules(config_path: str | None, overrides: Sequence[str], imports: Sequence[str]) -> list[str]:
    """Import the modules that the base config, the overrides and --import name (parts.with_imports), so the
    tasks and parts they register can be named here; returns the override that hands --import's modules (with
    the config's own) to every job, so that its run.json and config hash record them too."""
    from config import ConfigError, load_raw
    from parts import with_imports

    try:
        data = with_imports(load_raw(config_path, list(overrides)), imports)
    except ConfigError as e:
        raise ExperimentError(f"config error: {e}") from e
    return [f"imports={json.dumps(data['imports'])}"] if imports else []


def resolve_config(config_path: str, overrides: Sequence[str]) -> Any:
    """The validated Config train.py would run with these overrides (its `imports` imported first); a bad one is
    an ExperimentError."""
    from config import ConfigError
    from parts import load_config

    try:
        return load_config(config_path, list(overrides))
    except ConfigError as e:
        raise ExperimentError(f"config error: {e}") from e


def config_dict(cfg: Any) -> dict[str, Any]:
    return cfg.to_dict()


def config_hash(resolved: dict[str, Any]) -> str:
    """sha256 (12 hex digits) of the resolved config without its IDENTITY_KEYS: equal for the seeds of one
    ablation, different when a preset, a --set or a config default differs."""
    data = json.loads(json.dumps(resolved))
    for key in IDENTITY_KEYS:
        section, name = key.split(".")
        data.get(section, {}).pop(name, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def build_data_and_model(config_path: str, overrides: Sequence[str]) -> Path:
    """The run's data and built-in model, built here when missing (once, before any job: never by racing jobs).
    Returns the model directory."""
    from tasks import build_task

    cfg = resolve_config(config_path, overrides)
    task = build_task(cfg)
    train_set, _ = task.load()
    path = Path(cfg.model.path)
    if cfg.model.build_tiny and not (path / "config.json").is_file():
        task.build_model(path, train_set)
    return path


# ============================================================================ planning


def override_key(text: str) -> str:
    return text.split("=", 1)[0].strip()


def check_runner_keys(overrides: Sequence[str], where: str, seed_scope: str) -> None:
    """--set and presets may not set what the runner sets per run (the summary would say one thing, the run do
    another)."""
    owned = {**RUNNER_KEYS, **(SCOPE_ALL_KEYS if seed_scope == "all" else {})}
    for text in overrides:
        if override_key(text) in owned:
            raise ExperimentError(f"{where} {text!r}: {override_key(text)} is set by the runner per run "
                                  f"({owned[override_key(text)]}); remove it")


def load_presets(path: Path = ABLATIONS_FILE) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    data = yaml.safe_load(path.read_text())
    presets = {str(k): [str(o) for o in (v or [])] for k, v in data["presets"].items()}
    groups = {str(k): [str(n) for n in v] for k, v in (data.get("groups") or {}).items()}
    return presets, groups


def resolve_ablations(names: str, presets: dict[str, list[str]], groups: dict[str, list[str]]) -> list[str]:
    """Comma-separated preset or group names -> preset names in order, each once. Groups may share members (a
    common baseline); a preset named on its own may not also be named again or come from a group, in either
    order (its runs would share one directory)."""
    out: list[str] = []
    source: dict[str, str] = {}  # preset -> "" when named on its own, else the group that brought it
    for name in (n.strip() for n in names.split(",") if n.strip()):
        members = groups.get(name, [name] if name in presets else None)
        if members is None:
            raise ExperimentError(f"unknown ablation {name!r}; presets: {', '.join(presets)}; "
                                  f"groups: {', '.join(groups)}")
        here = name if name in groups else ""
        for member in members:
            if member in source and not (here and source[member]):
                where = " and ".join(f"in group {s!r}" if s else "on its own" for s in (source[member], here))
                raise ExperimentError(f"ablation {member!r} is listed twice ({where}); its runs would share one "
                                      f"directory")
            if member not in source:
                source[member] = here
                out.append(member)
    if not out:
        raise ExperimentError("--ablations names no ablation")
    return out


@dataclass
class Job:
    ablation: str
    seed: int
    overrides: list[str]
    dir: Path
    steps: int = 0
    model_dir: Path | None = None
    slot: str = ""
    status: str = "pending"  # pending | running | done | failed | skipped (finished before) | recorded
    #                          (per_seed.csv holds it) | interrupted
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


def seed_overrides(seed: int, seed_scope: str, model_path: str | None) -> list[str]:
    """What a seed sets beyond training.seed under --seed-scope all (nothing under `training`)."""
    if seed_scope == "training":
        return []
    return [f"tiny.seed={seed}", f"eval.seed={seed}"] + ([f"model.path={model_path}_seed{seed}"] if model_path else [])


def plan_jobs(ablations: Sequence[str], presets: dict[str, list[str]], seeds: Sequence[int], steps: int,
              out: Path, task: str, common: Sequence[str] = (), seed_scope: str = "training",
              model_path: str | None = None) -> list[Job]:
    """Seed-major order, so a partial experiment already holds every ablation at the first seeds. `model_path`:
    the built-in model's directory, made per seed under --seed-scope all (None: a model that is not built)."""
    jobs = []
    for seed in seeds:
        for ab in ablations:
            d = out / "runs" / ab / f"seed{seed}"
            overrides = [f"data.task={task}", f"training.seed={seed}", f"training.max_steps={steps}",
                         f"training.log_dir={d / 'logs'}", f"training.ckpt_dir={d / 'ckpt'}",
                         f"credit.dir={d / 'credit'}", *common, *presets[ab],
                         *seed_overrides(seed, seed_scope, model_path)]
            jobs.append(Job(ab, seed, overrides, d, steps))
    return jobs


def check_output_dir(out: Path, spec: dict) -> None:
    """`out` must not sit inside another experiment or hold one below it, and if it holds this experiment
    already, with the same task, config, steps, seed scope and the same overrides for every ablation they share.
    (An experiment.json from before --seed-scope existed ran with `training`.)"""
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
    defaults = {"overrides": [], "seed_scope": "training"}
    for key in ("task", "config", "steps", "overrides", "seed_scope"):
        if old.get(key, defaults.get(key)) != spec[key]:
            raise ExperimentError(f"--out {out} holds an experiment with {key}={old.get(key, defaults.get(key))!r} "
                                  f"(this one: {spec[key]!r}); use another --out")
    for ab, overrides in spec["ablations"].items():
        if ab in old["ablations"] and old["ablations"][ab] != overrides:
            raise ExperimentError(f"--out {out}: ablation {ab!r} ran there with other overrides "
                                  f"({old['ablations'][ab]}); use another --out")


def visible_devices() -> list[str]:
    """The devices CUDA numbers 0, 1, ... in this process: CUDA_VISIBLE_DEVICES's entries (ids, UUIDs or MIG
    names) when it is set, else 0..count-1."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(count)]
    return [e.strip() for e in env.split(",") if e.strip()][:count]


def check_gpus(gpus: str | None, per_job: int = 1) -> list[str]:
    """The GPU slots, as positions among the visible devices: one per job, or with `per_job` > 1 groups of that
    many ("0,1", "2,3") that each run one job under torchrun. `device_env` turns a slot into the job's
    CUDA_VISIBLE_DEVICES."""
    if per_job < 1:
        raise ExperimentError("--gpus-per-job must be >= 1")
    if gpus is None:
        if per_job > 1:
            raise ExperimentError("--gpus-per-job needs --gpus")
        return []
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    visible = visible_devices()
    bad = [g for g in ids if not g.isdigit() or int(g) >= len(visible)]
    if bad or not ids or len(set(ids)) != len(ids):
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        within = f" (positions within CUDA_VISIBLE_DEVICES={env})" if env is not None else ""
        valid = (", ".join(map(str, range(len(visible)))) + within if visible
                 else "none (no CUDA device is visible; omit --gpus to run on CPU)")
        raise ExperimentError(f"--gpus {gpus}: GPU id(s) {', '.join(bad) or gpus} do not exist or repeat; valid: {valid}")
    if len(ids) % per_job:
        raise ExperimentError(f"--gpus {gpus}: {len(ids)} GPUs do not split into groups of --gpus-per-job {per_job}")
    return [",".join(ids[i:i + per_job]) for i in range(0, len(ids), per_job)]


def device_env(slot: str, visible: Sequence[str]) -> str:
    """A slot's positions -> the entries of this process's visible devices (CUDA_VISIBLE_DEVICES=4,6 and slot
    "1" -> "6"), so a job sees the GPUs its slot names and not the physical ids that share their numbers."""
    return ",".join(visible[int(p)] for p in slot.split(","))


def mark_finished(jobs: Sequence[Job], recorded: set[tuple[str, int]] = frozenset()) -> None:
    """Finished runs are skipped; a run per_seed.csv holds (`recorded`) whose directory is gone or never finished
    here is taken from there, not re-run; interrupted ones with a checkpoint resume; others restart clean."""
    from checkpoint import latest_checkpoint

    for job in jobs:
        if (job.dir / "done.json").is_file():
            job.status = "skipped"
        elif (job.ablation, job.seed) in recorded:
            job.status = "recorded"
        elif latest_checkpoint(job.dir / "ckpt") is not None:
            job.resume = True
        elif job.dir.exists():  # started but never checkpointed: nothing to resume
            shutil.rmtree(job.dir)


# ============================================================================ records


def code_version(repo: Path = REPO) -> tuple[str, bool | None]:
    """(HEAD's commit, whether tracked files differ from it); ("unknown", None) outside a git checkout.
    Untracked files are not counted: scratch output is everywhere, and a new module is caught when imported by
    a tracked one, which then differs."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    try:
        return git("rev-parse", "HEAD").strip(), bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None


def resolve_commit(ref: str, repo: Path = REPO) -> str:
    """--assume-commit's value -> a full commit hash of this repository."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                             capture_output=True, text=True)
    except OSError as e:
        raise ExperimentError(f"--assume-commit {ref}: git is not available ({e})") from e
    if out.returncode != 0:
        raise ExperimentError(f"--assume-commit {ref}: not a commit of the repository at {repo}")
    return out.stdout.strip()


def write_run_record(job: Job, config_path: str, seed_scope: str) -> None:
    """Append this launch (commit, dirty flag, time, resume) to the run's run.json, which also holds the
    overrides, the resolved config and its hash. A run resumed at another commit lists both."""
    path = job.dir / RUN_RECORD
    resolved = config_dict(resolve_config(config_path, job.overrides))
    old = json.loads(path.read_text()) if path.is_file() else None
    commit, dirty = code_version()
    record = {"ablation": job.ablation, "seed": job.seed, "seed_scope": seed_scope, "overrides": job.overrides,
              "config_hash": config_hash(resolved), "config": resolved,
              # a run interrupted before records existed, resumed now: its first part's code is unknown
              "started_unrecorded": old["started_unrecorded"] if old else job.resume,
              "launches": (old["launches"] if old else []) + [{"commit": commit, "dirty": dirty, "time": time.time(),
                                                               "resume": job.resume}]}
    from fileio import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=1), RUN_RECORD)


@dataclass
class Provenance:
    """Where one run's numbers came from: the code (commit, dirty), the config (hash), the seed scope."""

    commit: str = UNRECORDED  # "a+b" when resumed at another commit; "<hash> (assumed)" from --assume-commit
    dirty: bool | None = None
    config_hash: str = ""
    seed_scope: str = "training"  # what an experiment from before --seed-scope ran with


def run_provenance(job: Job, assumed: str | None, seed_scope: str) -> Provenance:
    """From the run's run.json; a run finished before records existed has none: its commit is `assumed` (the
    label "<hash> (assumed)") or unrecorded."""
    path = job.dir / RUN_RECORD
    if not path.is_file():
        return Provenance(assumed or UNRECORDED, None, "", seed_scope)
    record = json.loads(path.read_text())
    commits = ([UNRECORDED] if record.get("started_unrecorded") else []) + [l["commit"][:12] for l in record["launches"]]
    unique = list(dict.fromkeys(commits))
    dirty = [l["dirty"] for l in record["launches"]]
    return Provenance("+".join(unique), None if None in dirty else any(dirty), record["config_hash"],
                      record.get("seed_scope", seed_scope))


# ============================================================================ running


class Process:
    """What the scheduler needs of a running job (subprocess.Popen has it; tests pass fakes)."""

    def poll(self) -> int | None: ...


class Interrupted(Exception):
    """SIGTERM (or SIGINT) arrived: stop the running jobs and exit."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_raise() -> Iterator[None]:
    """While running jobs, SIGTERM and SIGINT raise Interrupted, so the scheduler's cleanup runs."""
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_process(proc: Process, grace: float = 10.0) -> None:
    """SIGTERM the job's process group (torchrun's workers too), SIGKILL what is left after `grace` seconds."""
    pid = getattr(proc, "pid", None)
    if pid is None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        try:  # the leader may be gone while its group lives on: probe the group itself
            os.killpg(pid, 0)
        except ProcessLookupError:
            return


def schedule(jobs: Sequence[Job], slots: Sequence[str], start: Callable[[Job, str], Process],
             on_tick: Callable[[Sequence[Job]], None] = lambda jobs: None, poll_seconds: float = 1.0,
             stop: Callable[[Process], None] = stop_process) -> None:
    """Run the pending jobs, at most one per slot at a time, starting the next one as a slot frees up. Whatever
    ends the loop early (an error, Interrupted) first stops the running jobs: no orphans keep writing."""
    queue = [j for j in jobs if j.status == "pending"]
    running: dict[str, tuple[Job, Process]] = {}
    try:
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
    finally:
        for job, proc in running.values():
            stop(proc)
            job.status = "interrupted"


def finish(job: Job) -> None:
    """done.json for a run that exited 0 with its last step logged; else failed, with its log's tail."""
    metrics = read_metrics(job.dir / "logs" / "metrics.jsonl")
    if job.returncode == 0 and metrics and metrics[-1].get("step") == job.steps:
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


def _die_with_parent() -> None:
    """In the child before exec: its own process group (stop_process signals the group; a terminal's Ctrl-C
    reaches the runner, which stops the jobs), and on Linux SIGTERM when the runner dies, even by SIGKILL."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launcher(config: str, gpu: bool, threads: int, seed_scope: str = "training",
             visible: Sequence[str] = ()) -> Callable[[Job, str], Process]:
    """Start a job's `job_command`, its GPUs alone visible to it (CUDA_VISIBLE_DEVICES), after appending the
    launch to its run.json."""
    def start(job: Job, slot: str) -> Process:
        job.dir.mkdir(parents=True, exist_ok=True)
        write_run_record(job, config, seed_scope)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=device_env(slot, visible) if gpu else "")
        cmd = job_command(config, job, slot, gpu, threads)
        log = open(job.log, "a")
        try:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    preexec_fn=_die_with_parent)
        finally:
            log.close()
    return start


class OutputLock:
    """One invocation per --out: an exclusive flock on DIR/.run_experiment.lock, held while this process lives.
    The kernel drops it when its holder dies, however it dies, so a lock file left by a dead process is free and
    is taken over; a live holder is named in the refusal."""

    def __init__(self, out: Path):
        self.path, self.fd = out / LOCK_FILE, -1

    def __enter__(self) -> OutputLock:
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.path.read_text().strip() or "unknown"
                os.close(fd)
                raise ExperimentError(f"--out {self.path.parent} is in use by another run_experiment.py ({holder}); "
                                      f"wait for it to finish or stop it") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # its previous holder removed it between our open and our flock: retry
                same = False
            if not same:
                os.close(fd)
                continue
            old = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            if old:
                print(f"[experiment] taking over a stale lock left by a process that has exited ({old})", flush=True)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
            self.fd = fd
            return self
        raise ExperimentError(f"--out {self.path.parent}: could not take {LOCK_FILE} (it keeps changing hands)")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


class Progress:
    """A line per job when it starts, every `every` seconds while it runs (step and ETA), and when it ends."""

    def __init__(self, total: int, steps: int, every: float = 30.0):
        self.total, self.steps, self.every = total, steps, every
        self.seen: dict[str, tuple[str, float]] = {}
        self.first: dict[str, tuple[int, float]] = {}  # a job's first step seen and when: the rate of a resumed run

    def __call__(self, jobs: Sequence[Job]) -> None:
        now = time.time()
        for i, job in enumerate(jobs, 1):
            if job.status not in ("running", "done", "failed") or not job.slot:
                continue
            last_status, last_time = self.seen.get(job.name, ("", 0.0))
            if job.status == last_status and (job.status != "running" or now - last_time < self.every):
                continue
            self.seen[job.name] = (job.status, now)
            where = f"gpu {job.slot}" if job.slot[0].isdigit() else job.slot
            step = job.last_step = last_step(job.log)
            eta = ""
            first_step, first_time = self.first.setdefault(job.name, (step, now))
            if job.status == "running" and step > first_step:
                eta = f", eta {fmt_seconds((now - first_time) / (step - first_step) * (self.steps - step))}"
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


def cpu_count() -> int:
    """The CPUs this process may run on (a taskset or container pins fewer than os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ============================================================================ per-seed values


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

    @property
    def auc(self) -> float:
        """normalized_auc of the eval curve; NaN with one eval point (no range to average over)."""
        from stats import normalized_auc

        return normalized_auc(self.steps, self.evals) if len(set(self.steps)) >= 2 else math.nan


def run_result(rows: list[dict]) -> RunResult | None:
    evals = {r["step"]: r["success_rate/eval"] for r in rows if r.get("success_rate/eval") is not None}
    train_rows = [r for r in rows if r.get("step", 0) > 0]
    if not evals:
        return None

    def mean_of(key: str) -> float:
        vals = [r[key] for r in train_rows if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else math.nan

    steps = sorted(evals)  # a step logged twice keeps its last value
    return RunResult(steps, [evals[s] for s in steps], mean_of("response_length"), mean_of("entropy"))


CREDIT_FIGURES = ("filler_reasoning_ratio", "weighted_filler_reasoning_ratio", "grad_proxy_filler_reasoning_ratio",
                  "mean_abs_contribution", "mean_grad_proxy")


@dataclass
class SeedRow:
    """One row of per_seed.csv: a run's summary numbers, provenance and credit figures (NaN without credit logs).
    The eval curve is JSON [[step, success], ...], so curves and AUC can be rebuilt without the run directory."""

    ablation: str
    seed: int
    final_eval: float
    auc_eval: float
    response_length: float
    entropy: float
    commit: str
    dirty: bool | None
    config_hash: str
    seed_scope: str
    credit_tokens: float = math.nan
    filler_percent: float = math.nan
    filler_reasoning_ratio: float = math.nan
    weighted_filler_reasoning_ratio: float = math.nan
    grad_proxy_filler_reasoning_ratio: float = math.nan
    mean_abs_contribution: float = math.nan
    mean_grad_proxy: float = math.nan
    eval_curve: str = "[]"
    source: str = "run"  # "run" (its directory) | "per_seed.csv" (directory gone)

    def result(self) -> RunResult:
        curve = json.loads(self.eval_curve)
        return RunResult([int(s) for s, _ in curve], [float(v) for _, v in curve], self.response_length, self.entropy)


PER_SEED_COLUMNS = [f.name for f in fields(SeedRow) if f.name != "source"]


def credit_figures(credit_dir: Path, model_dir: Path | None) -> dict[str, float]:
    """analyze_credit's key numbers for one run's credit logs: the filler/reasoning ratios of mean |A x log pi|
    (raw and mitigation-weighted) and of the gradient-size proxy |A| x ||onehot - p||, the filler share of
    tokens. Empty when the run has no credit logs."""
    import analyze_credit as ac

    try:
        df = ac.load_credit_logs(credit_dir)
        analysis = ac.compute_analysis(df, ac.load_tokenizer(model_dir or credit_dir))
    except ac.CreditLogError:
        return {}
    by_type = analysis.tables["token_types"].set_index("type")
    return {"credit_tokens": float(len(df)), "filler_percent": float(by_type.loc["filler", "percent"]),
            **{k: float(analysis.key[k]) for k in CREDIT_FIGURES}}


def seed_row(job: Job, provenance: Provenance) -> SeedRow | None:
    """The per_seed.csv row of a finished run, from its directory; None without an eval point."""
    result = run_result(read_metrics(job.dir / "logs" / "metrics.jsonl"))
    if result is None:
        return None
    curve = json.dumps([[s, v] for s, v in zip(result.steps, result.evals)])
    return SeedRow(job.ablation, job.seed, result.final, result.auc, result.response_length, result.entropy,
                   provenance.commit, provenance.dirty, provenance.config_hash, provenance.seed_scope,
                   **credit_figures(job.dir / "credit", job.model_dir), eval_curve=curve)


def read_per_seed(out: Path) -> dict[tuple[str, int], SeedRow]:
    path = out / PER_SEED_FILE
    if not path.is_file():
        return {}
    import pandas as pd

    table = pd.read_csv(path, dtype={"commit": str, "config_hash": str, "seed_scope": str, "dirty": str},
                        keep_default_na=False, na_values=[""])
    rows = {}
    for record in table.to_dict("records"):
        values = {c: record.get(c, math.nan) for c in PER_SEED_COLUMNS}
        values["dirty"] = {"True": True, "False": False}.get(str(values["dirty"]))
        for key, default in (("commit", UNRECORDED), ("config_hash", ""), ("seed_scope", "training")):
            if not isinstance(values[key], str):
                values[key] = default
        row = SeedRow(**values, source="per_seed.csv")
        row.seed = int(row.seed)
        rows[(row.ablation, row.seed)] = row
    return rows


def write_per_seed(rows: Sequence[SeedRow], out: Path) -> None:
    import pandas as pd

    table = pd.DataFrame([{c: asdict(r)[c] for c in PER_SEED_COLUMNS} for r in rows], columns=PER_SEED_COLUMNS)
    table.to_csv(out / PER_SEED_FILE, index=False)


def assumed_label(commit: str) -> str:
    return f"{commit[:12]} (assumed)"


def collect_rows(jobs: Sequence[Job], old: dict[tuple[str, int], SeedRow], assume_commit: str | None,
                 seed_scope: str, noted: dict[str, str] | None = None) -> dict[tuple[str, int], SeedRow]:
    """A row for every finished job (from its directory, else from per_seed.csv), and every old row no job of
    this invocation covers (another ablation or seed run into the same --out): nothing is lost. A run without
    run.json gets --assume-commit's commit, else the one an earlier --assume-commit left in experiment.json
    (`noted`: "<ablation>/seed<k>" -> label)."""
    rows = dict(old)
    for job in jobs:
        row = None
        if job.status in ("done", "skipped"):
            assumed = assumed_label(assume_commit) if assume_commit else (noted or {}).get(run_key(job))
            row = seed_row(job, run_provenance(job, assumed, seed_scope))
        if row is not None:
            rows[(job.ablation, job.seed)] = row
        elif job.status != "recorded":
            rows.pop((job.ablation, job.seed), None)  # re-run and failed, or not finished: not a result
    return rows


# ============================================================================ summary

METRICS = {"": "final", "auc_": "AUC"}  # column prefix -> what it compares
COMPARISON_FIELDS = ("diff_vs_baseline", "diff_ci95", "p_value", "p_holm", "p_sign", "p_wilcoxon", "mdd80")


@dataclass
class Summary:
    rows: list[dict[str, Any]]
    curves: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # ablation -> step -> per-seed values
    failed: list[Job] = field(default_factory=list)
    baseline: str = ""
    family: int = 0  # comparisons with the baseline: the size of each Holm family (final, AUC)


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def compare(res: dict[int, SeedRow], base: dict[int, SeedRow], metric: str) -> dict[str, Any]:
    """Paired comparison of one metric ("final_eval" or "auc_eval") over the seeds both have a finite value for."""
    from stats import paired_test

    seeds = [s for s in sorted(res) if s in base and math.isfinite(getattr(res[s], metric))
             and math.isfinite(getattr(base[s], metric))]
    cmp = paired_test([getattr(res[s], metric) for s in seeds], [getattr(base[s], metric) for s in seeds])
    return {"n": len(seeds), "diff_vs_baseline": cmp.diff.mean, "diff_ci95": cmp.diff.half_width,
            "p_value": cmp.p_value, "p_sign": cmp.p_sign, "p_wilcoxon": cmp.p_wilcoxon, "mdd80": cmp.mdd80}


def ablation_row(ab: str, res: dict[int, SeedRow], base: dict[int, SeedRow] | None) -> dict[str, Any]:
    """One summary.csv row: means and intervals over seeds, the comparisons with the baseline (None for the
    baseline itself), the seeds' commits and credit ratios (geometric mean and interval over seeds)."""
    from stats import ratio_interval, t_interval

    rows = [res[s] for s in sorted(res)]
    final, auc = t_interval([r.final_eval for r in rows]), t_interval(_finite([r.auc_eval for r in rows]))
    row: dict[str, Any] = {"ablation": ab, "n_seeds": len(rows), "final_eval_mean": final.mean,
                           "final_eval_ci95": final.half_width, "auc_eval_mean": auc.mean, "auc_eval_ci95": auc.half_width}
    for prefix, metric in (("", "final_eval"), ("auc_", "auc_eval")):
        cmp = compare(res, base, metric) if base is not None else {}
        row.update({prefix + f: cmp.get(f) for f in COMPARISON_FIELDS})
        row[f"{prefix}n_pairs"] = cmp.get("n")
    row["response_length_mean"] = t_interval([r.response_length for r in rows]).mean
    row["entropy_mean"] = t_interval([r.entropy for r in rows]).mean
    row["commits"] = ";".join(sorted({r.commit for r in rows}))
    for name in ("filler_reasoning_ratio", "weighted_filler_reasoning_ratio", "grad_proxy_filler_reasoning_ratio"):
        ratios = [v for v in _finite([getattr(r, name) for r in rows]) if v > 0]
        mean, low, high = ratio_interval(ratios) if ratios else (math.nan, math.nan, math.nan)
        row.update({name: mean, f"{name}_low": low, f"{name}_high": high})
    row["n_credit_seeds"] = len(_finite([r.filler_reasoning_ratio for r in rows]))
    return row


def summarize(seed_rows: dict[tuple[str, int], SeedRow], ablations: Sequence[str], baseline: str,
              failed: Sequence[Job] = ()) -> Summary:
    """Per ablation: final and AUC eval success over seeds, and the paired comparisons with the baseline, their
    t-test p-values Holm-adjusted over the ablations compared (final and AUC each a family)."""
    from stats import holm

    by_ab: dict[str, dict[int, SeedRow]] = {ab: {} for ab in ablations}
    for (ab, seed), row in seed_rows.items():
        if ab in by_ab:
            by_ab[ab][seed] = row
    summary = Summary(rows=[], baseline=baseline, failed=list(failed))
    for ab in ablations:
        row = ablation_row(ab, by_ab[ab], None if ab == baseline else by_ab.get(baseline, {}))
        row["failed_runs"] = sum(j.ablation == ab for j in summary.failed)
        summary.rows.append(row)
        curve: dict[int, list[float]] = {}
        for r in by_ab[ab].values():
            result = r.result()
            for step, value in zip(result.steps, result.evals):
                curve.setdefault(step, []).append(value)
        summary.curves[ab] = dict(sorted(curve.items()))
    compared = [r for r in summary.rows if r["ablation"] != baseline]
    summary.family = sum(r["n_pairs"] is not None and r["n_pairs"] >= 2 for r in compared)
    for prefix in METRICS:
        ps = [math.nan if r[prefix + "p_value"] is None else r[prefix + "p_value"] for r in compared]
        for r, adjusted in zip(compared, holm(ps)):
            r[prefix + "p_holm"] = None if math.isnan(adjusted) else adjusted
    return summary


def _judge(c: dict[str, Any], baseline: str, family: int) -> str:
    """One metric's comparison in words, never stronger than its tests: undetermined below 3 pairs or without
    spread; significant only when Holm's adjusted p is below 0.05; below 6 pairs, where the exact tests cannot
    reach 0.05, a t-test result is called suggestive."""
    from stats import exact_p_floor

    n, d = c["n_pairs"], c["diff_vs_baseline"]
    if n < 3:
        return f"undetermined: {n} pair{'' if n == 1 else 's'} with {baseline} (at least 3 needed)"
    p, ph = c["p_value"], c["p_holm"]
    exact = f"exact p: sign {c['p_sign']:.3f}, Wilcoxon {c['p_wilcoxon']:.3f}"
    if p is None or math.isnan(p):
        return (f"undetermined: the same difference ({d:+.3f}) on all {n} pairs leaves no spread to test it "
                f"against ({exact})")
    h = c["diff_ci95"]
    holm_text = f", Holm p = {ph:.3f} over {family}" if family > 1 else ""
    span = f"{d:+.3f} [{d - h:+.3f}, {d + h:+.3f}], t-test p = {p:.3f}{holm_text}; {exact}"
    direction = "better" if d > 0 else "worse"
    if p >= 0.05:
        return (f"no significant difference from {baseline} at {n} pairs ({span}); a true difference of "
                f"±{c['mdd80']:.3f} or more would be detected with 80% power")
    if ph is not None and ph >= 0.05:
        return (f"no significant difference from {baseline} after Holm's correction over {family} comparisons "
                f"at {n} pairs (t-test p < 0.05 before it; {span})")
    if n < 6:
        return (f"{direction} than {baseline} by the t-test only ({span}): at {n} pairs the exact tests, which do "
                f"not assume normal differences, cannot go below p = {exact_p_floor(n):.3f}; suggestive, "
                f"not established")
    return f"{direction} than {baseline} at 95% at {n} pairs ({span})"


def verdict(row: dict[str, Any], baseline: str, family: int = 1) -> str:
    """What the tests support, in words; never more. Final success and the whole curve (AUC) each get their own
    paired comparison."""
    if row["ablation"] == baseline:
        return "baseline"
    if row.get("n_pairs") is None:
        return f"not compared (no run of {baseline})"
    parts = []
    for prefix, label in METRICS.items():
        c = {f: row.get(prefix + f) for f in COMPARISON_FIELDS}
        c["n_pairs"] = row.get(f"{prefix}n_pairs") or 0
        parts.append(f"{label}: " + _judge(c, baseline, family))
    return "; ".join(parts)


def records_lines(seed_rows: Sequence[SeedRow], ablations: Sequence[str], seed_scope: str) -> list[str]:
    """Where the numbers come from: commits (pooled, and said so), runs without records, config hashes per
    ablation, the seed scope, rows taken from per_seed.csv."""
    rows = [r for r in seed_rows if r.ablation in ablations]
    by_commit: dict[str, dict[str, list[int]]] = {}
    for r in sorted(rows, key=lambda r: (ablations.index(r.ablation), r.seed)):
        by_commit.setdefault(r.commit, {}).setdefault(r.ablation, []).append(r.seed)
    dirty = {r.commit for r in rows if r.dirty}

    def who(seeds: dict[str, list[int]]) -> str:
        return "; ".join(f"`{ab}` seeds {', '.join(map(str, s))}" for ab, s in seeds.items())

    def label(c: str) -> str:
        return f"`{c}`" + (" with uncommitted changes to tracked files" if c in dirty else "")

    if len(by_commit) == 1:
        lines = [f"- Code: every run at commit {label(next(iter(by_commit)))}."]
    else:
        lines = [f"- Code: the runs come from {len(by_commit)} commits, pooled in every figure below:"]
        lines += [f"  - {label(c)}: {who(s)}" for c, s in by_commit.items()]
    if UNRECORDED in by_commit or any(UNRECORDED in c for c in by_commit):
        lines.append(f"- `{UNRECORDED}`: runs recorded before records existed (no commit or config hash); rerun "
                     f"with `--assume-commit REV` to name the commit they ran at.")
    if any(c.endswith("(assumed)") for c in by_commit):
        lines.append("- `(assumed)`: a commit named by `--assume-commit` for runs recorded before records existed.")
    hashes = {ab: sorted({r.config_hash for r in rows if r.ablation == ab and r.config_hash}) for ab in ablations}
    mixed = {ab: h for ab, h in hashes.items() if len(h) > 1}
    if mixed:
        lines += [f"- Config: `{ab}` pools runs of {len(h)} resolved configs ({', '.join(h)}); each run's run.json "
                  f"holds its config" for ab, h in mixed.items()]
    elif any(hashes.values()):
        lines.append(f"- Config: one resolved config per ablation (its hash in {PER_SEED_FILE}, the config itself "
                     f"in each run's run.json).")
    lines.append(f"- Seed scope `{seed_scope}`: {SEED_SCOPES[seed_scope]}.")
    recorded = [r for r in rows if r.source == PER_SEED_FILE]
    if recorded:
        lines.append(f"- From {PER_SEED_FILE} (run directory absent): "
                     + ", ".join(f"`{r.ablation}` seed {r.seed}" for r in recorded) + ".")
    return lines


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _pm(mean: Any, half: Any, digits: int = 3) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + ("" if half is None or math.isnan(half) else f" ± {half:.{digits}f}")


def _p(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def tables_markdown(summary: Summary) -> list[str]:
    """The ablation table, the comparison table and (when any run logged credit) the credit table."""
    lines = ["## Eval success per ablation", "", "| ablation | seeds | final eval (95% CI) | AUC eval (95% CI) | "
             "mean length | mean entropy | failed runs | commits |", "|---|---|---|---|---|---|---|---|"]
    for r in summary.rows:
        lines.append(f"| `{r['ablation']}` | {r['n_seeds']} | {_pm(r['final_eval_mean'], r['final_eval_ci95'])} | "
                     f"{_pm(r['auc_eval_mean'], r['auc_eval_ci95'])} | {_pm(r['response_length_mean'], None, 1)} | "
                     f"{_pm(r['entropy_mean'], None)} | {r['failed_runs']} | {r['commits']} |")
    lines += ["", f"## Against `{summary.baseline}`, paired by seed", "",
              "| ablation | metric | pairs | diff [95% CI] | t-test p | Holm p | sign p | Wilcoxon p | MDD (80%) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.rows:
        for prefix, label in METRICS.items():
            if r["ablation"] == summary.baseline or r[prefix + "n_pairs"] is None:
                continue
            d, h = r[prefix + "diff_vs_baseline"], r[prefix + "diff_ci95"]
            diff = "—" if d is None or math.isnan(d) else (
                f"{d:+.3f}" + ("" if h is None or math.isnan(h) else f" [{d - h:+.3f}, {d + h:+.3f}]"))
            lines.append(f"| `{r['ablation']}` | {label} | {r[prefix + 'n_pairs']} | {diff} | "
                         + " | ".join(_p(r[prefix + k]) for k in ("p_value", "p_holm", "p_sign", "p_wilcoxon"))
                         + f" | {_p(r[prefix + 'mdd80'])} |")
    if any(r["n_credit_seeds"] for r in summary.rows):
        lines += ["", "## Credit: filler / reasoning ratios per ablation", "",
                  "| ablation | seeds with credit logs | mean \\|A x log π\\| | weighted by the mitigation | "
                  "gradient proxy \\|A\\| x \\|\\|onehot - p\\|\\| |", "|---|---|---|---|---|"]
        for r in summary.rows:
            cells = [(_p(r[k]) + ("" if r[f"{k}_low"] is None or math.isnan(r[f"{k}_low"])
                                  else f" [{r[f'{k}_low']:.3f}, {r[f'{k}_high']:.3f}]"))
                     for k in ("filler_reasoning_ratio", "weighted_filler_reasoning_ratio",
                               "grad_proxy_filler_reasoning_ratio")]
            lines.append(f"| `{r['ablation']}` | {r['n_credit_seeds']} | " + " | ".join(cells) + " |")
    return lines


EXPLANATION = (
    "Final = eval success at the last eval point; AUC = the eval curve's average height (trapezoid area / step "
    "range); ± = half-width of the t-based 95% interval over seeds. Comparisons use the per-seed differences "
    "(ablation - baseline) over the seeds both have (pairs). t-test p: two-sided paired t-test. Holm p: Holm's "
    "step-down adjustment over the {family} comparisons with the baseline in this summary (final and AUC each "
    "their own family). Sign p, Wilcoxon p: the exact two-sided sign and signed-rank tests, which do not assume "
    "normal differences; with n pairs neither goes below 2/2^n (0.125 at 4, 0.0625 at 5). MDD (80%): the "
    "smallest true difference the t-test would detect with 80% power at two-sided alpha 0.05, from these "
    "differences' SD (noncentral t). Credit ratios: per seed, the filler / reasoning ratio of mean |A x log π| "
    "(raw and weighted by the mitigation) and of the gradient proxy from analyze_credit, then their geometric "
    "mean and 95% interval over seeds (computed on logs). Every figure is re-derivable from per_seed.csv.")


def write_summary(summary: Summary, out: Path, header: str, records: Sequence[str] = ()) -> str:
    import pandas as pd

    pd.DataFrame(summary.rows).to_csv(out / "summary.csv", index=False)
    lines = [header, "", "## Records", "", *records, "", *tables_markdown(summary), "",
             EXPLANATION.format(family=summary.family), "", "## Verdicts", ""]
    lines += [f"- `{r['ablation']}`: {verdict(r, summary.baseline, summary.family)}" for r in summary.rows]
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
    import cli

    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="a registered task: countdown | countdown_words | bandit | gsm8k (or one of --import's)")
    p.add_argument("--ablations", required=True, help="comma-separated presets or groups from ablations.yaml")
    p.add_argument("--seeds", type=int, default=3, help="runs per ablation, seeds 1..N (default 3)")
    p.add_argument("--steps", type=int, required=True, help="training steps per run")
    p.add_argument("--out", required=True, type=Path, help="the experiment's directory")
    p.add_argument("--config", default=None, help="base config (default: config_tiny.yaml for countdown, "
                                                  "config_bandit.yaml for bandit; required for gsm8k)")
    p.add_argument("--seed-scope", choices=sorted(SEED_SCOPES), default="training",
                   help="what a seed varies: 'training' (default) sets training.seed only, every run sharing one "
                        "warmed-up model and one eval draw; 'all' also sets tiny.seed and eval.seed to the seed, "
                        "with a built-in model per seed at <model.path>_seed<k>, built before the runs start")
    p.add_argument("--gpus", default=None, help="GPU positions among the visible devices (within "
                                                "CUDA_VISIBLE_DEVICES when it is set), one job per GPU at a time "
                                                "(default: CPU, one job at a time)")
    p.add_argument("--gpus-per-job", type=int, default=1,
                   help="GPUs per job: each job runs under torchrun over a group of this many of --gpus")
    p.add_argument("--cpu-workers", type=int, default=1, help="on CPU, jobs at a time (the CPUs this process may "
                                                              "use are split between them)")
    p.add_argument("--baseline", default=None, help="the ablation others are compared with (default: baseline "
                                                    "if listed, else the first)")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value", dest="overrides",
                   help="a config override for every run (repeatable), e.g. --set eval.transfer_num_numbers=[]; "
                        "a bare section.key=value word is the same; "
                        f"not the keys the runner sets ({', '.join(RUNNER_KEYS)}; under --seed-scope all also "
                        f"{', '.join(SCOPE_ALL_KEYS)})")
    p.add_argument("words", nargs="*", metavar="section.key=value", help="config overrides, the same as --set")
    p.add_argument("--import", action="append", default=[], dest="imports", metavar="MODULE",
                   help="import MODULE (a name importable from the repository's root, or a .py file's path) here and "
                        "in every run, as the config's `imports` do: the tasks and parts it registers can be named")
    p.add_argument("--assume-commit", default=None, metavar="REV",
                   help="the commit that runs finished before records existed (no run.json) ran at; recorded as "
                        "'<hash> (assumed)' in per_seed.csv, experiment.json and the summary, and kept there for "
                        f"later invocations. Without it (and none kept) they are summarized as '{UNRECORDED}'")
    p.add_argument("--no-credit", action="store_true", help="skip the credit-log comparison")
    return p


@dataclass
class Plan:
    """Everything `prepare` checked, for `main` to run."""

    ablations: list[str]
    jobs: list[Job]
    spec: dict[str, Any]
    slots: list[str]
    baseline: str
    assume_commit: str | None


def prepare(args: argparse.Namespace) -> Plan:
    """Every check before anything starts: task, ablations, seeds, runner-owned keys, GPUs, config, output
    directory. Nothing is written."""
    config = args.config or TASK_CONFIGS.get(args.task)
    args.overrides = [*args.overrides, *import_modules(config, args.overrides, getattr(args, "imports", []))]
    if args.task not in task_names():
        raise ExperimentError(f"unknown task {args.task!r}; valid: {', '.join(task_names())}")
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
    check_runner_keys(args.overrides, "--set", args.seed_scope)
    for ab in ablations:
        check_runner_keys(presets[ab], f"preset {ab!r} in {ABLATIONS_FILE.name}:", args.seed_scope)
    slots = check_gpus(args.gpus, args.gpus_per_job) or [f"cpu{i}" for i in range(args.cpu_workers)]
    base = resolve_config(config, [f"data.task={args.task}", *args.overrides])
    model_path = base.model.path if base.model.build_tiny else None
    jobs = plan_jobs(ablations, presets, list(range(1, args.seeds + 1)), args.steps, args.out, args.task,
                     args.overrides, args.seed_scope, model_path)
    for ab in ablations:  # every ablation's config is valid before any job starts
        resolve_config(config, next(j for j in jobs if j.ablation == ab).overrides)
    spec = {"task": args.task, "config": config, "steps": args.steps, "overrides": args.overrides,
            "seed_scope": args.seed_scope, "ablations": {a: presets[a] for a in ablations}}
    check_output_dir(args.out, spec)
    assume = resolve_commit(args.assume_commit) if args.assume_commit else None
    return Plan(ablations, jobs, spec, slots, baseline, assume)


def build_models(plan: Plan) -> None:
    """The data and each distinct model directory the jobs use, built here one after another before any job
    starts; under --seed-scope all a model already there must have been warmed up with its seed."""
    built: dict[str, Path] = {}
    for job in plan.jobs:
        key = next((o for o in reversed(job.overrides) if o.startswith("model.path=")), "")
        if key not in built:
            built[key] = build_data_and_model(plan.spec["config"], job.overrides)
            check_model_seed(built[key], job.seed if plan.spec["seed_scope"] == "all" else None)
        job.model_dir = built[key]


def check_model_seed(model_dir: Path, seed: int | None) -> None:
    info = model_dir / "warmup.json"
    if seed is None or not info.is_file():
        return
    built_with = json.loads(info.read_text()).get("seed")
    if built_with != seed:
        raise ExperimentError(f"{model_dir} was warmed up with tiny.seed={built_with}, not {seed}: remove it (it is "
                              f"rebuilt) or pass another --set model.path")


def write_spec(out: Path, spec: dict[str, Any], runs: dict[str, Any] | None = None) -> None:
    """experiment.json: the spec, every ablation ever run into `out`, and per run its record (commit, dirty
    flag, config hash, overrides) once summarized; records of runs not summarized now are kept."""
    old = json.loads((out / SPEC_FILE).read_text()) if (out / SPEC_FILE).is_file() else {}
    merged = {**spec, "ablations": {**old.get("ablations", {}), **spec["ablations"]},
              "runs": {**old.get("runs", {}), **(runs or {})}}
    (out / SPEC_FILE).write_text(json.dumps(merged, indent=1))


def run_key(job: Job) -> str:
    return f"{job.ablation}/seed{job.seed}"


def assumed_commits(out: Path) -> dict[str, str]:
    """The commits an earlier --assume-commit named, from experiment.json's run records."""
    spec = json.loads((out / SPEC_FILE).read_text()) if (out / SPEC_FILE).is_file() else {}
    return {k: r["commit"] for k, r in spec.get("runs", {}).items() if str(r.get("commit")).endswith("(assumed)")}


def run_records(jobs: Sequence[Job], rows: dict[tuple[str, int], SeedRow]) -> dict[str, Any]:
    out = {}
    for job in jobs:
        row = rows.get((job.ablation, job.seed))
        if row is not None:
            out[run_key(job)] = {"commit": row.commit, "dirty": row.dirty,
                                                     "config_hash": row.config_hash, "overrides": job.overrides,
                                                     "seed_scope": row.seed_scope, "source": row.source}
    return out


def run_all(plan: Plan, args: argparse.Namespace) -> int | None:
    """Mark what is finished, build the models, run the rest. An exit code when interrupted, else None."""
    old_rows = read_per_seed(args.out)
    mark_finished(plan.jobs, set(old_rows))
    build_models(plan)
    todo = [j for j in plan.jobs if j.status == "pending"]
    recorded = sum(j.status == "recorded" for j in plan.jobs)
    print(f"[experiment] {len(plan.jobs)} runs ({len(plan.ablations)} ablations x {args.seeds} seeds, {args.steps} "
          f"steps, seed scope {args.seed_scope}): {len(plan.jobs) - len(todo)} already finished"
          + (f" ({recorded} from {PER_SEED_FILE})" if recorded else "")
          + f", {sum(j.resume for j in todo)} to resume, on {', '.join(plan.slots)}", flush=True)
    threads = max(1, cpu_count() // len(plan.slots))
    start = launcher(plan.spec["config"], bool(args.gpus), threads, args.seed_scope,
                     visible_devices() if args.gpus else ())
    try:
        with signals_raise():
            schedule(plan.jobs, plan.slots, start, Progress(len(plan.jobs), args.steps))
    except (Interrupted, KeyboardInterrupt) as e:
        stopped = [j.name for j in plan.jobs if j.status == "interrupted"]
        print(f"[experiment] interrupted ({e or 'SIGINT'}): stopped {len(stopped)} running job(s)"
              f"{': ' + ', '.join(stopped) if stopped else ''}; rerun the same command to resume", flush=True)
        return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.overrides = [*args.words, *args.overrides]
    args.out = args.out.resolve()
    if args.config is not None:  # relative to where the command was typed; the runs then start in the repo
        args.config = str(Path(args.config).resolve())
    args.imports = [str(Path(m).resolve()) if m.endswith(".py") else m for m in args.imports]
    os.chdir(REPO)  # the configs' own relative paths (runs/tiny/model, ...) are relative to the repo
    try:
        plan = prepare(args)
        args.out.mkdir(parents=True, exist_ok=True)
        with OutputLock(args.out):
            check_output_dir(args.out, plan.spec)  # again, now that no other invocation can write there
            write_spec(args.out, plan.spec)
            interrupted = run_all(plan, args)
            if interrupted is not None:
                return interrupted
            return report(plan, args, argv)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def report(plan: Plan, args: argparse.Namespace, argv: list[str] | None) -> int:
    """per_seed.csv, summary.csv/.md, experiment.json's run records, curves.png, the credit comparison."""
    rows = collect_rows(plan.jobs, read_per_seed(args.out), plan.assume_commit, args.seed_scope,
                        assumed_commits(args.out))
    order = {ab: i for i, ab in enumerate(plan.spec["ablations"])}
    write_per_seed(sorted(rows.values(), key=lambda r: (order.get(r.ablation, len(order)), r.ablation, r.seed)),
                   args.out)
    planned = {(j.ablation, j.seed) for j in plan.jobs}
    summary = summarize({k: r for k, r in rows.items() if k in planned}, plan.ablations, plan.baseline,
                        [j for j in plan.jobs if j.status == "failed"])
    header = (f"# Experiment: {args.task}, {', '.join(plan.ablations)}\n\n{args.seeds} seeds x {args.steps} steps, "
              f"config `{plan.spec['config']}`, seed scope `{args.seed_scope}`. Command:\n\n"
              f"    python run_experiment.py {' '.join(argv or sys.argv[1:])}")
    records = records_lines([rows[k] for k in sorted(planned) if k in rows], plan.ablations, args.seed_scope)
    text = write_summary(summary, args.out, header, records)
    write_spec(args.out, plan.spec, run_records(plan.jobs, rows))
    plot_curves(summary, args.out / "curves.png")
    if not args.no_credit:
        model_dir = next((j.model_dir for j in plan.jobs if j.model_dir is not None), None)
        if model_dir is not None:
            print(credit_comparison(plan.jobs, plan.ablations, model_dir, args.out / "credit"))
    print(text)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
