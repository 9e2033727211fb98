"""Rollout time and minor page faults of one engine in a fresh process (as train.py has one), at a given checkout:
    python bench/probes/faults.py grpo|distinct REPO_DIR      (e.g. a git worktree of an older commit)
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import sys, time, torch, resource
R = sys.argv[2]; sys.path.insert(0, R); sys.path.insert(0, R + "/bench")
from bench_rollout import model_config, workloads, load_models, ours_run
cfg = model_config("small", "float32")
m = load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
wl = sys.argv[1]
prompts, g = workloads(8192, 32)[wl]
go = ours_run(m, prompts, g, 96, 8192)
go()
for _ in range(3):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t=time.perf_counter(); go(); dt = time.perf_counter()-t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print("time %.3f faults %d sys %.3f user %.3f" % (dt, r1.ru_minflt-r0.ru_minflt, r1.ru_stime-r0.ru_stime, r1.ru_utime-r0.ru_utime))
