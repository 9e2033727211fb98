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
