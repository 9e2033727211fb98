"""The benchmarks run from a fresh clone and print what BENCHMARKS.md reads: a short run of each, checked for
its table and its JSON line (the figures themselves are measured, never asserted, in BENCHMARKS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_bench(*args: str) -> tuple[str, dict]:
    out = subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True, text=True).stdout
    return out, json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_rollout_prints_the_ratio_and_each_sides_peak_memory():
    pytest.importorskip("transformers")
    out, result = run_bench("bench/bench_rollout.py", "--shape", "small", "--repeats", "1", "--new_tokens", "2",
                            "--rows", "4")
    assert "| distinct | 4 |" in out and "| grpo | 128 |" in out
    for name in ("distinct", "grpo"):
        r = result[name]
        assert r["ratio"] > 0 and r["ours_tokens_per_s"] > 0
        # one round: the paired ratio is that round's, with no interval
        assert r["paired_ratio"] == pytest.approx(r["reference_s"][0] / r["ours_s"][0])
        assert r["ours_peak_bytes"] > 0 and r["reference_peak_bytes"] > 0


@pytest.mark.slow
def test_bench_train_compares_variants_with_the_same_parameter_change():
    out, result = run_bench("bench/bench_train.py", "--shape", "small", "--rows", "4", "--new_tokens", "8",
                            "--prompt_tokens", "8", "--group", "2")
    assert "| chunked_shared_prompts |" in out
    assert result["max_abs_param_change_diff"] < 1e-3 * result["max_abs_param_change"]
    assert all(result[v]["peak_gib_above_model"] >= 0 for v in ("full_logits", "chunked", "chunked_shared_prompts"))
    # the warm-up update (CUDA's default, asked for here) runs at learning rate 0: the timed update's change is the same
    _, warm = run_bench("bench/bench_train.py", "--shape", "small", "--rows", "4", "--new_tokens", "8",
                        "--prompt_tokens", "8", "--group", "2", "--warmup", "1")
    assert warm["warmup"] == 1 and result["warmup"] == 0
    assert warm["max_abs_param_change"] == result["max_abs_param_change"] > 0


@pytest.mark.slow
def test_bench_step_runs_a_configs_real_step_at_a_shape_and_reuses_its_workdir(tmp_path):
    args = ("bench/bench_step.py", "--config", "config_tiny.yaml", "--shape", "qwen2.5-0.5b", "--hidden", "64",
            "--layers", "1", "--steps", "1", "--workdir", str(tmp_path),
            "--set", "training.num_questions_per_batch=2", "training.max_new_tokens=8")
    out, result = run_bench(*args)
    assert "| 1 |" in out and result["rows"] == 16 and result["layers"] == 1 and result["hidden"] == 64
    step = result["steps"][0]
    # a random model scores 0 everywhere; the bench's coin-flip rewards give the groups spread, so the update
    # takes a real backward and step (a zero gradient norm would mean it measured a step without one)
    assert step["grad_norm"] > 0 and 0 < step["response_length"] <= 8 and step["peak_rss_bytes"] > 0
    # 16 rows x (prompt + 8, rounded up to 64 positions) x 1 layer x k and v x 2 kv heads x 64 dims x 4 bytes
    assert result["kv_cache_bytes"] % (16 * 64 * 2 * 2 * 64 * 4) == 0 and result["kv_cache_bytes"] > 0
    weights = tmp_path / "model" / "model.safetensors"
    built = weights.stat().st_mtime_ns
    run_bench(*args)
    assert weights.stat().st_mtime_ns == built  # the model is built once per workdir
    other = subprocess.run([sys.executable, *args, "--hidden", "32"], cwd=REPO, capture_output=True, text=True)
    assert other.returncode != 0 and "another shape" in other.stderr  # never a model of the wrong shape


@pytest.mark.slow
def test_bench_model_matches_transformers_logits_and_greedy_tokens():
    pytest.importorskip("transformers")
    out, result = run_bench("bench/bench_model.py", "--hidden", "64", "--layers", "1", "--vocab", "128", "--batch", "2",
                            "--seq", "8", "--gen_batch", "2", "--new_tokens", "3", "--repeats", "1")
    assert "| forward+backward |" in out
    assert result["max_abs_logit_diff"] < 1e-4 and result["greedy_tokens_identical"] == 1.0
    assert all(result[name]["ours"] > 0 and result[name]["transformers"] > 0
               for name in ("forward", "forward+backward", "greedy generation (KV cache)"))


@pytest.mark.slow
def test_probe_engines_compares_engines_in_one_process_and_refuses_an_unknown_one():
    out = subprocess.run([sys.executable, "bench/probe_engines.py", "--engines", "eager,eager+pack", "--rounds", "2",
                          "--new_tokens", "2", "--threads", "1"], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout
    assert "rows with the first engine's tokens: {'eager': 32," in out  # the first engine against itself
    assert "eager / eager+pack: " in out and "x [" in out  # two rounds: a ratio with its interval
    bad = subprocess.run([sys.executable, "bench/probe_engines.py", "--engines", "eager,fast"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--engines: 'fast'" in bad.stderr


@pytest.mark.slow
def test_probe_ops_profiles_a_rollout_by_op():
    out = subprocess.run([sys.executable, "bench/probe_ops.py", "rollout", "--workload", "grpo", "--new_tokens", "2",
                          "--threads", "1"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    assert "small, grpo: rollout s" in out and "Self CPU time total" in out


def test_harness_ratio_text_and_table():
    sys.path.insert(0, str(REPO / "bench"))
    import harness

    assert harness.ratio_text((1.7312, 1.4449, 1.8901)) == "1.73x [1.44, 1.89]"
    assert harness.ratio_text(harness.paired_ratio([2.0], [1.0])) == "2.00x"  # one round: no interval
    mean, low, high = harness.paired_ratio([2.0, 4.0], [1.0, 1.0])
    assert mean == pytest.approx(8 ** 0.5) and low < mean < high
    assert harness.markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"
    calls = []
    times = harness.alternate({"f": lambda: calls.append("f"), "g": lambda: calls.append("g")}, 2)
    assert calls == ["f", "g", "f", "g"] and [len(t) for t in times.values()] == [2, 2]
