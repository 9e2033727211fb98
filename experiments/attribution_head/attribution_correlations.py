import json, statistics as st
import sys
base = sys.argv[1] if len(sys.argv) > 1 else "experiments/attribution_head/runs"
for ab in ["attribution", "attribution_regression"]:
    for window in [(1, 10), (141, 150)]:
        vals = {}
        for s in (1, 2, 3):
            try:
                rows = [json.loads(l) for l in open(f"{base}/{ab}/seed{s}/logs/metrics.jsonl")]
            except FileNotFoundError:
                continue
            sel = [r for r in rows if window[0] <= r["step"] <= window[1]]
            for k in ("corr_log_prob", "corr_entropy", "corr_rel_position", "entropy", "std", "max", "min", "regression_mse"):
                v = [r[f"attribution/{k}"] for r in sel if f"attribution/{k}" in r]
                if v:
                    vals.setdefault(k, []).append(sum(v) / len(v))
        print(ab, window, {k: (round(st.mean(v), 3), [round(x, 3) for x in v]) for k, v in vals.items()})
