"""Offline credit-assignment analysis of GRPO credit logs.

GRPO broadcasts one episode-level advantage A to every generated token, so the per-token
policy-gradient term is A * grad log pi(y_t). The trainer's credit logger records, per token,
`contribution = advantage * log_prob` and the mitigation's `weight`; this tool answers where that
credit goes: by relative position in the episode, by token type (reasoning / whitespace / special /
structure / filler),
by advantage sign, and how consistent its direction is across episodes at a fixed position (t-stat).

|A * log pi(y)| is the measure the credit-assignment write-ups tabulate, but it is not a gradient
magnitude: d(A * log pi(y)) / d logits = A * (onehot(y) - p), whose norm goes to 0 as p_y -> 1,
while |log pi(y)| is only the token's surprise. When the log carries `logit_grad_norm`
(= ||onehot(y) - p||_2) we also report the gradient proxy |A| * ||onehot(y) - p||_2 beside it.

Usage:
    python analyze_credit.py --log_path credit_logs/ --tokenizer_path tokenizer.json \
        --output_dir analysis_baseline [--compare credit_logs_x/ ...] [--labels base x ...]

This is an offline front end: it reads pickled DataFrames and a tokenizer.json, and imports
nothing from the training code.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tokenizers import Tokenizer

import cli
from credit_logger import FINAL_FILE, STEP_FILE_GLOB, run_files

REQUIRED_COLUMNS = (
    "step", "episode_idx", "group_idx", "position", "token_id", "log_prob", "entropy",
    "reward", "advantage", "weight", "contribution", "weighted_contribution",
)
OPTIONAL_COLUMNS = ("length", "logit_grad_norm", "in_answer")
TOKEN_TYPES = ("reasoning", "filler", "whitespace", "special", "structure")
TYPE_COLORS = ("tab:green", "tab:red", "tab:cyan", "tab:purple", "tab:gray")
N_POSITION_BINS = 10
N_COARSE_BINS = 5
T_HIGH, T_LOW = 3.0, 1.5
TOP_K = 10
MAX_SCATTER_POINTS = 20_000

# Structure: the format tags and chat markers such as <|im_end|> written out of ordinary BPE pieces
# ("<", "answer", ">"), found as text spans in each episode so every piece counts. The tokenizer's own
# special and added tokens (<think> in Qwen3, <|im_end|>) are `special`, whatever the context.
STRUCTURE_PATTERN = re.compile(r"</?(?:think|answer)>|<\|[^<>|\s]{1,64}\|>")
# Reasoning: the token's text, whitespace stripped, is non-empty and only digits, + - * /, = or parentheses.
REASONING_PATTERN = re.compile(r"[0-9+\-*/=()]+")
# Appended to each episode's rebuilt text so no tag match can cross two episodes (a control
# character no tag contains; not NUL, which numpy strips from string scalars).
_EPISODE_SEPARATOR = "\x1e"

TABLE_FILES = (
    "position_bins.csv", "token_types.csv", "position_type.csv",
    "reward_split.csv", "tstats.csv", "top_tokens.csv",
)


class CreditLogError(ValueError):
    """A credit log that cannot be analyzed: missing, unreadable, wrong type, wrong columns, empty."""


# ----------------------------------------------------------------------------- loading

def load_credit_logs(path: str | Path) -> pd.DataFrame:
    """Load a credit log file, or a run directory's logs (credit_logger.run_files).

    A directory is read as its `credit_logs_step_*.pkl` files concatenated in step order (each holds
    one interval, together they partition the run), so no token is counted twice; `credit_logs_final.pkl`
    is their index (read: the step files it lists), or in runs logged before that index (format 1) the whole
    run again, used only when there are no step files.
    """
    path = Path(path)
    if not path.exists():
        raise CreditLogError(f"credit log path does not exist: {path}")
    try:
        files = run_files(path)
    except Exception as exc:  # an unreadable final file, or one listing step files that are gone
        raise CreditLogError(f"cannot read credit log {path}: {type(exc).__name__}: {exc}") from exc
    if not files:
        raise CreditLogError(f"no credit log files in {path}: expected {STEP_FILE_GLOB} or {FINAL_FILE}")
    frames = [_read_one_log(f) for f in files]
    df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    df.attrs = dict(frames[0].attrs)
    df.attrs.setdefault("source", str(path))
    if len(df) == 0:
        raise CreditLogError(f"credit log is empty (0 token rows): {path}")
    return df


def _read_one_log(path: Path) -> pd.DataFrame:
    try:
        obj = pd.read_pickle(path)
    except Exception as exc:  # unpickling can fail in many ways; all mean "not a readable log"
        raise CreditLogError(f"cannot read credit log {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, pd.DataFrame):
        raise CreditLogError(
            f"credit log {path} holds a {type(obj).__name__}, expected a pandas DataFrame")
    check_columns(obj, source=str(path))
    return obj


def check_columns(df: pd.DataFrame, source: str = "credit log") -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CreditLogError(
            f"{source} is missing column(s) {', '.join(missing)}; it may be an older credit-log "
            f"format. Required columns: {', '.join(REQUIRED_COLUMNS)}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json, or a directory containing one."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise CreditLogError(f"tokenizer not found: {file} (pass --tokenizer_path a tokenizer.json or the "
                             f"model directory that holds one)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises a bare Exception for a file it cannot parse
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CreditLogError(f"{file} is not a tokenizer.json this tokenizers library can read ({first})") from exc


def check_token_ids(token_ids: np.ndarray, tokenizer: Tokenizer) -> None:
    """Every id must be in the tokenizer's vocabulary: an unknown id decodes silently to '' and would be
    counted as filler. The usual cause is a log analyzed with another model's tokenizer."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    bad = token_ids[(token_ids < 0) | (token_ids >= size)]
    if len(bad):
        raise CreditLogError(f"token id {int(bad[0])} is outside the tokenizer's vocabulary of {size} ids "
                             f"({len(bad)} such tokens); was the log written by a model with another tokenizer?")


# ----------------------------------------------------------------------------- token types

def decode_tokens(tokenizer: Tokenizer, token_ids) -> dict[int, str]:
    """Each distinct id decoded on its own (special tokens kept), once."""
    ids = sorted({int(i) for i in token_ids})
    valid = [i for i in ids if i >= 0]
    texts = tokenizer.decode_batch([[i] for i in valid], skip_special_tokens=False)
    decoded = dict(zip(valid, texts))
    decoded.update({i: "" for i in ids if i < 0})
    return decoded


def _special_token_ids(tokenizer: Tokenizer) -> set[int]:
    """The tokenizer's special and added tokens (Qwen3's <think> is added but not marked special)."""
    return set(tokenizer.get_added_tokens_decoder())


def _episode_codes(df: pd.DataFrame) -> np.ndarray:
    # (step, episode_idx): episode_idx is unique within a run, and the step keeps a resumed run
    # whose counter restarted from merging two episodes.
    keys = ["step", "episode_idx"] if "step" in df.columns else ["episode_idx"]
    return df.groupby(keys, sort=False).ngroup().to_numpy()


def classify_tokens(df: pd.DataFrame, tokenizer: Tokenizer) -> pd.Series:
    """Token type per row: 'special' > 'structure' > 'whitespace' > 'reasoning' > 'filler'.

    special: the tokenizer's special and added tokens. structure: pieces of a BPE-split tag, found from
    context (each episode's text is rebuilt from its tokens in position order, the tags are found in it,
    and every token overlapping one is structure). whitespace: decodes to whitespace only (Qwen's lone
    'Ġ' before a digit, newlines). reasoning: digits, operators, = and parentheses. The rest is filler.
    """
    token_ids = df["token_id"].to_numpy(dtype=np.int64)
    check_token_ids(token_ids, tokenizer)
    unique_ids, inverse = np.unique(token_ids, return_inverse=True)
    decoded = decode_tokens(tokenizer, unique_ids)
    unique_texts = np.array([decoded[int(i)] for i in unique_ids], dtype=object)
    special = _special_token_ids(tokenizer)
    unique_special = np.array([int(i) in special for i in unique_ids], dtype=bool)
    unique_reasoning = np.array(
        [REASONING_PATTERN.fullmatch(t.strip()) is not None for t in unique_texts], dtype=bool)
    unique_whitespace = np.array([t != "" and t.strip() == "" for t in unique_texts], dtype=bool)

    n = len(df)
    codes = _episode_codes(df)
    order = np.lexsort((df["position"].to_numpy(), codes))
    texts = unique_texts[inverse[order]]  # object array, one text per row in episode order
    last_of_episode = np.ones(n, dtype=bool)
    last_of_episode[:-1] = codes[order][1:] != codes[order][:-1]
    for i in np.flatnonzero(last_of_episode):
        texts[i] = texts[i] + _EPISODE_SEPARATOR
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    spans = np.array([m.span() for m in STRUCTURE_PATTERN.finditer("".join(texts))],
                     dtype=np.int64).reshape(-1, 2)
    # Token i overlaps span [s, e) iff starts[i] < e and ends[i] > s; tokens are contiguous, so
    # the overlapping ones form the index range [first, last].
    first = np.searchsorted(ends, spans[:, 0], side="right")
    last = np.searchsorted(starts, spans[:, 1], side="left") - 1
    keep = first <= last
    marks = np.zeros(n + 1, dtype=np.int64)
    np.add.at(marks, first[keep], 1)
    np.add.at(marks, last[keep] + 1, -1)
    in_tag_sorted = np.cumsum(marks[:n]) > 0
    in_tag = np.empty(n, dtype=bool)
    in_tag[order] = in_tag_sorted

    types = np.where(unique_reasoning[inverse], "reasoning", "filler").astype(object)
    types[unique_whitespace[inverse]] = "whitespace"
    types[in_tag] = "structure"
    types[unique_special[inverse]] = "special"
    return pd.Series(types, index=df.index, name="type", dtype=object)


# ----------------------------------------------------------------------------- tables

def relative_position_bins(df: pd.DataFrame, n_bins: int = N_POSITION_BINS) -> np.ndarray:
    """bin = min(n_bins - 1, floor(n_bins * position / length)), length = the episode's token count
    (the `length` column when logged, else the episode's row count)."""
    codes = _episode_codes(df)
    length = np.bincount(codes)[codes] if len(codes) else np.zeros(0, dtype=np.int64)
    if "length" in df.columns:
        logged = pd.to_numeric(df["length"], errors="coerce").to_numpy(dtype=float)
        length = np.where(np.isfinite(logged), logged, length)
    length = np.maximum(length.astype(np.int64), 1)
    position = df["position"].to_numpy(dtype=np.int64)
    return np.clip((n_bins * position) // length, 0, n_bins - 1)


def _has_grad_proxy(df: pd.DataFrame) -> bool:
    return "logit_grad_norm" in df.columns and bool(df["logit_grad_norm"].notna().any())


def _metrics(df: pd.DataFrame) -> pd.DataFrame:
    """The per-token quantities the tables average, aligned with df's rows."""
    out = pd.DataFrame({
        "contribution": df["contribution"].to_numpy(dtype=float),
        "abs_contribution": np.abs(df["contribution"].to_numpy(dtype=float)),
        "abs_weighted_contribution": np.abs(df["weighted_contribution"].to_numpy(dtype=float)),
        "log_prob": df["log_prob"].to_numpy(dtype=float),
        "entropy": df["entropy"].to_numpy(dtype=float),
        "advantage": df["advantage"].to_numpy(dtype=float),
        "weight": df["weight"].to_numpy(dtype=float),
        "episode": _episode_codes(df),
    })
    if _has_grad_proxy(df):
        out["grad_proxy"] = np.abs(out["advantage"]) * df["logit_grad_norm"].to_numpy(dtype=float)
    return out


def position_bins_table(df: pd.DataFrame) -> pd.DataFrame:
    """Credit by relative position: 10 bins of position / episode length."""
    m = _metrics(df)
    m["position_bin"] = relative_position_bins(df, N_POSITION_BINS)
    aggs = dict(
        mean_contribution=("contribution", "mean"),
        std_contribution=("contribution", "std"),
        mean_abs_contribution=("abs_contribution", "mean"),
        mean_log_prob=("log_prob", "mean"),
        count=("contribution", "size"),
        mean_abs_weighted_contribution=("abs_weighted_contribution", "mean"),
    )
    if "grad_proxy" in m:
        aggs["mean_grad_proxy"] = ("grad_proxy", "mean")
    table = m.groupby("position_bin").agg(**aggs).reindex(range(N_POSITION_BINS))
    table["count"] = table["count"].fillna(0).astype(np.int64)
    return table.rename_axis("position_bin").reset_index()


def token_types_table(df: pd.DataFrame, types: pd.Series) -> pd.DataFrame:
    """Credit by token type (reasoning / filler / whitespace / special / structure)."""
    m = _metrics(df)
    m["type"] = types.to_numpy()
    aggs = dict(
        count=("contribution", "size"),
        mean_contribution=("contribution", "mean"),
        mean_abs_contribution=("abs_contribution", "mean"),
        mean_log_prob=("log_prob", "mean"),
        mean_abs_weighted_contribution=("abs_weighted_contribution", "mean"),
        mean_entropy=("entropy", "mean"),
    )
    if "grad_proxy" in m:
        aggs["mean_grad_proxy"] = ("grad_proxy", "mean")
    table = m.groupby("type").agg(**aggs).reindex(list(TOKEN_TYPES))
    table["count"] = table["count"].fillna(0).astype(np.int64)
    table.insert(1, "percent", 100.0 * table["count"] / max(len(df), 1))
    return table.rename_axis("type").reset_index()


def _coarse_bin_label(b: int) -> str:
    width = 100 // N_COARSE_BINS
    return f"{b * width}-{(b + 1) * width}%"


def position_type_table(df: pd.DataFrame, types: pd.Series) -> pd.DataFrame:
    """Token type within 5 relative-position bins: separates the type effect from the position one."""
    m = _metrics(df)
    m["position_bin"] = relative_position_bins(df, N_COARSE_BINS)
    m["type"] = types.to_numpy()
    aggs = dict(
        count=("contribution", "size"),
        mean_abs_contribution=("abs_contribution", "mean"),
        mean_log_prob=("log_prob", "mean"),
    )
    if "grad_proxy" in m:
        aggs["mean_grad_proxy"] = ("grad_proxy", "mean")
    grid = pd.MultiIndex.from_product([range(N_COARSE_BINS), TOKEN_TYPES],
                                      names=["position_bin", "type"])
    table = m.groupby(["position_bin", "type"]).agg(**aggs).reindex(grid)
    table["count"] = table["count"].fillna(0).astype(np.int64)
    table = table.reset_index()
    table.insert(1, "position_range", [_coarse_bin_label(b) for b in table["position_bin"]])
    return table


ADVANTAGE_SIGNS = ("positive", "zero", "negative")


def reward_split_table(df: pd.DataFrame) -> pd.DataFrame:
    """Tokens by their episode's advantage sign. `zero` is its own row: whole zero-variance groups (often
    most of a batch) carry no gradient and would dilute the negative side. log_prob <= 0, so contribution
    has the advantage's opposite sign."""
    m = _metrics(df)
    adv = m["advantage"].to_numpy()
    m["advantage_sign"] = np.where(adv > 0, "positive", np.where(adv < 0, "negative", "zero"))
    aggs = dict(
        count=("contribution", "size"),
        episodes=("episode", "nunique"),
        mean_contribution=("contribution", "mean"),
        mean_abs_contribution=("abs_contribution", "mean"),
        mean_log_prob=("log_prob", "mean"),
        mean_advantage=("advantage", "mean"),
    )
    if "grad_proxy" in m:
        aggs["mean_grad_proxy"] = ("grad_proxy", "mean")
    table = m.groupby("advantage_sign").agg(**aggs).reindex(list(ADVANTAGE_SIGNS))
    table[["count", "episodes"]] = table[["count", "episodes"]].fillna(0).astype(np.int64)
    return table.rename_axis("advantage_sign").reset_index()


def tstats_table(df: pd.DataFrame, column: str = "contribution") -> pd.DataFrame:
    """Per absolute position, t = mean / (std / sqrt(n)) of `column` across episodes (ddof=1).

    t is NaN where n < 2 or std == 0. It measures whether the credit's direction is consistent
    across episodes at that position, not whether the token there matters.
    """
    grouped = df.groupby("position")[column]
    table = pd.DataFrame({"n": grouped.size(), "mean": grouped.mean(), "std": grouped.std(ddof=1)})
    table = table.reindex(range(int(df["position"].max()) + 1))
    table["n"] = table["n"].fillna(0).astype(np.int64)
    valid = (table["n"] >= 2) & (table["std"] > 0) & np.isfinite(table["std"])
    t = table["mean"] / (table["std"] / np.sqrt(table["n"]))
    table["t"] = t.where(valid)
    return table.rename_axis("position").reset_index()


def tstat_shares(tstats: pd.DataFrame) -> dict:
    t = tstats["t"].to_numpy(dtype=float)
    t = np.abs(t[np.isfinite(t)])
    if len(t) == 0:
        return {"t_positions": 0, "share_abs_t_gt_3": math.nan,
                "share_abs_t_lt_1_5": math.nan, "mean_abs_t": math.nan}
    return {"t_positions": len(t), "share_abs_t_gt_3": float(np.mean(t > T_HIGH)),
            "share_abs_t_lt_1_5": float(np.mean(t < T_LOW)), "mean_abs_t": float(np.mean(t))}


def top_tokens_table(df: pd.DataFrame, types: pd.Series, tokenizer: Tokenizer,
                     k: int = TOP_K) -> pd.DataFrame:
    """Per type, the k most frequent token ids. An id can appear under two types (e.g. '>' closing a
    tag is structure, '>' in prose is filler)."""
    m = _metrics(df)
    m["type"] = types.to_numpy()
    m["token_id"] = df["token_id"].to_numpy(dtype=np.int64)
    stats = m.groupby(["type", "token_id"]).agg(
        count=("contribution", "size"),
        mean_abs_contribution=("abs_contribution", "mean"),
        mean_log_prob=("log_prob", "mean"),
    ).reset_index()
    parts = []
    for type_name in TOKEN_TYPES:
        part = stats[stats["type"] == type_name].sort_values(
            ["count", "token_id"], ascending=[False, True], kind="stable").head(k)
        parts.append(part.assign(rank=np.arange(1, len(part) + 1)))
    table = pd.concat(parts, ignore_index=True)
    decoded = decode_tokens(tokenizer, table["token_id"])
    table["text"] = [repr(decoded[int(i)]) for i in table["token_id"]]
    return table[["type", "rank", "token_id", "text", "count",
                  "mean_abs_contribution", "mean_log_prob"]]


# ----------------------------------------------------------------------------- key numbers

def _ratio(numerator, denominator) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is zero."""
    try:
        a, b = float(numerator), float(denominator)
    except (TypeError, ValueError):
        return math.nan
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.nan
    return a / b


def _lookup(table: pd.DataFrame, key_col: str, key, value_col: str) -> float:
    if value_col not in table.columns:
        return math.nan
    rows = table.loc[table[key_col] == key, value_col]
    return float(rows.iloc[0]) if len(rows) else math.nan


# (key suffix, per-token column in _metrics, column name in the tables)
_RATIO_MEASURES = (
    ("", "abs_contribution", "mean_abs_contribution"),
    ("weighted_", "abs_weighted_contribution", "mean_abs_weighted_contribution"),
    ("grad_proxy_", "grad_proxy", "mean_grad_proxy"),
)


def key_numbers(df: pd.DataFrame, types: pd.Series, tables: Mapping[str, pd.DataFrame]) -> dict:
    """Run size, contribution stats, the filler/reasoning and early/late ratios, t-stat shares."""
    m = _metrics(df)
    contribution = m["contribution"]
    key = {
        "mitigation": str(df.attrs.get("mitigation", "unknown")),
        "tokens": int(len(df)),
        "episodes": int(m["episode"].nunique()),
        "steps": int(df["step"].nunique()),
        "mean_contribution": float(contribution.mean()),
        "std_contribution": float(contribution.std(ddof=1)) if len(df) > 1 else math.nan,
        "mean_abs_contribution": float(m["abs_contribution"].mean()),
        "min_contribution": float(contribution.min()),
        "max_contribution": float(contribution.max()),
        "mean_abs_weighted_contribution": float(m["abs_weighted_contribution"].mean()),
        "mean_weight": float(m["weight"].mean()),
        "has_grad_proxy": "grad_proxy" in m,
        "mean_grad_proxy": float(m["grad_proxy"].mean()) if "grad_proxy" in m else math.nan,
    }
    by_type, by_bin = tables["token_types"], tables["position_bins"]
    coarse = relative_position_bins(df, N_COARSE_BINS)
    for prefix, metric, col in _RATIO_MEASURES:
        key[f"{prefix}filler_reasoning_ratio"] = _ratio(
            _lookup(by_type, "type", "filler", col), _lookup(by_type, "type", "reasoning", col))
        key[f"{prefix}early_late_ratio"] = _ratio(
            _lookup(by_bin, "position_bin", 0, col),
            _lookup(by_bin, "position_bin", N_POSITION_BINS - 1, col))
        if metric in m:
            values = m[metric].to_numpy()
            first = values[coarse == 0].mean() if np.any(coarse == 0) else math.nan
            last = values[coarse == N_COARSE_BINS - 1].mean() if np.any(
                coarse == N_COARSE_BINS - 1) else math.nan
            key[f"{prefix}first_last_20_ratio"] = _ratio(first, last)
        else:
            key[f"{prefix}first_last_20_ratio"] = math.nan
    key.update(tstat_shares(tables["tstats"]))
    return key


# ----------------------------------------------------------------------------- one run

@dataclass
class CreditAnalysis:
    """Everything computed for one run: the log, token types, tables (by file stem), key numbers."""
    df: pd.DataFrame
    types: pd.Series
    tables: dict[str, pd.DataFrame]
    key: dict


def compute_analysis(df: pd.DataFrame, tokenizer: Tokenizer) -> CreditAnalysis:
    check_columns(df)
    if len(df) == 0:
        raise CreditLogError("credit log is empty (0 token rows)")
    types = classify_tokens(df, tokenizer)
    tables = {
        "position_bins": position_bins_table(df),
        "token_types": token_types_table(df, types),
        "position_type": position_type_table(df, types),
        "reward_split": reward_split_table(df),
        "tstats": tstats_table(df),
        "top_tokens": top_tokens_table(df, types, tokenizer),
    }
    return CreditAnalysis(df, types, tables, key_numbers(df, types, tables))


COMPARISON_COLUMNS = (
    "tokens", "episodes", "steps", "mitigation", "mean_abs_contribution", "mean_contribution",
    "filler_reasoning_ratio", "early_late_ratio", "first_last_20_ratio",
    "share_abs_t_gt_3", "share_abs_t_lt_1_5", "mean_abs_t", "mean_weight",
    "mean_abs_weighted_contribution", "weighted_filler_reasoning_ratio", "weighted_early_late_ratio",
    "mean_grad_proxy", "grad_proxy_filler_reasoning_ratio", "grad_proxy_early_late_ratio",
    "grad_proxy_first_last_20_ratio",
)


def comparison_table(runs: Mapping[str, CreditAnalysis]) -> pd.DataFrame:
    """One row per run (label first) of its key numbers."""
    rows = [{"label": label, **{c: run.key[c] for c in COMPARISON_COLUMNS}}
            for label, run in runs.items()]
    return pd.DataFrame(rows, columns=["label", *COMPARISON_COLUMNS])


# ----------------------------------------------------------------------------- writing

def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.4g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table.itertuples(index=False):
        cells = [_fmt(v).replace("|", "\\|") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio_line(name: str, value: float) -> str:
    return f"- {name}: {_fmt(value)}"


def summary_markdown(run: CreditAnalysis, comparison: pd.DataFrame | None = None) -> str:
    k, attrs = run.key, run.df.attrs
    out = ["# Credit assignment analysis", ""]
    out.append(f"Log: `{attrs.get('source', 'in-memory DataFrame')}` · mitigation: {k['mitigation']}"
               f" · format_version: {attrs.get('format_version', 'n/a')}")
    out += ["", "## Run size", "",
            markdown_table(pd.DataFrame([{c: k[c] for c in ("tokens", "episodes", "steps")}])),
            "", "## Contribution = advantage x log_prob", "",
            markdown_table(pd.DataFrame([{
                "mean": k["mean_contribution"], "std": k["std_contribution"],
                "mean_abs": k["mean_abs_contribution"], "min": k["min_contribution"],
                "max": k["max_contribution"], "mean_abs_weighted": k["mean_abs_weighted_contribution"],
                "mean_weight": k["mean_weight"]}])),
            "", "## Key ratios", ""]
    labels = (("|contribution|", ""), ("|weighted contribution|", "weighted_"),
              ("gradient proxy |A| x ||onehot(y) - p||", "grad_proxy_"))
    out.append("- (filler / reasoning compares those two types only: whitespace, special and structure "
               "tokens are left out of both sides)")
    for label, prefix in labels:
        out.append(_ratio_line(f"filler / reasoning mean {label}", k[f"{prefix}filler_reasoning_ratio"]))
        out.append(_ratio_line(f"early / late mean {label} (bin 0 / bin 9)", k[f"{prefix}early_late_ratio"]))
        out.append(_ratio_line(f"first 20% / last 20% mean {label}", k[f"{prefix}first_last_20_ratio"]))
    if not k["has_grad_proxy"]:
        out.append("- (no `logit_grad_norm` in this log: gradient-proxy ratios are n/a)")
    out += ["", "Why |A x log_prob| is not a gradient magnitude: the gradient of A * log pi(y) with respect "
            "to the logits is A * (onehot(y) - p), whose size shrinks to 0 as p_y -> 1, whereas "
            "|log_prob| is only the token's surprise; |A| x ||onehot(y) - p||_2 is the size of the "
            "signal at the logits.",
            "", "## Direction consistency across episodes (t-statistic per absolute position)", "",
            f"- positions with a defined t: {k['t_positions']}",
            f"- share |t| > {T_HIGH:g}: {_fmt(k['share_abs_t_gt_3'])}",
            f"- share |t| < {T_LOW:g}: {_fmt(k['share_abs_t_lt_1_5'])}",
            f"- mean |t|: {_fmt(k['mean_abs_t'])}",
            "",
            "A high |t| says the sign of the credit at that position agrees across episodes; "
            "it does not say the token there matters. Per-position values are in tstats.csv.",
            ""]
    sections = (
        ("Relative position (10 bins of position / episode length)", "position_bins"),
        ("Token types", "token_types"),
        ("Token type within relative position (controls for the position confound)", "position_type"),
        ("Advantage sign: positive, zero (zero-variance groups, no gradient), negative; log_prob <= 0, so "
         "contribution has the opposite sign of A", "reward_split"),
        ("Most frequent tokens per type", "top_tokens"),
    )
    for title, name in sections:
        out += [f"## {title}", "", markdown_table(run.tables[name]), ""]
    if comparison is not None:
        out += ["## Comparison", "", markdown_table(comparison), "",
                "Per-run tables are under compare/<label>/; see comparison.csv and comparison.png.", ""]
    return "\n".join(out)


def _new_figure(nrows: int, ncols: int, size: tuple[float, float]):
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def plot_credit(run: CreditAnalysis, path: Path) -> None:
    """2x2: |contribution| by position bin, contribution histogram, log_prob vs A, per-step credit."""
    df, bins = run.df, run.tables["position_bins"]
    fig, axes = _new_figure(2, 2, (13, 9))
    ax = axes[0, 0]
    x = bins["position_bin"].to_numpy()
    has_proxy = "mean_grad_proxy" in bins.columns
    width = 0.4 if has_proxy else 0.8
    ax.bar(x - (width / 2 if has_proxy else 0), bins["mean_abs_contribution"], width,
           color="tab:blue", label="mean |A x log_prob|")
    ax.set_xlabel("relative position bin (10 x position / length)")
    ax.set_ylabel("mean |contribution|")
    ax.set_xticks(x)
    ax.set_title("Credit by relative position")
    if has_proxy:
        twin = ax.twinx()
        twin.bar(x + width / 2, bins["mean_grad_proxy"], width, color="tab:orange",
                 label="mean |A| x ||onehot - p||")
        twin.set_ylabel("mean gradient proxy", color="tab:orange")
        twin.margins(y=0.2)
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=8, loc="upper center", ncol=2)
    else:
        ax.legend(fontsize=8, loc="upper center")
    ax.margins(y=0.2)

    ax = axes[0, 1]
    contribution = df["contribution"].to_numpy(dtype=float)
    contribution = contribution[np.isfinite(contribution)]
    ax.hist(contribution, bins=100, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("contribution = A x log_prob")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title("Distribution of contribution")

    ax = axes[1, 0]
    n = len(df)
    rng = np.random.default_rng(0)
    idx = rng.choice(n, MAX_SCATTER_POINTS, replace=False) if n > MAX_SCATTER_POINTS else np.arange(n)
    idx.sort()
    adv = df["advantage"].to_numpy(dtype=float)[idx]
    log_prob = df["log_prob"].to_numpy(dtype=float)[idx]
    types = run.types.to_numpy()[idx]
    for type_name, color in zip(TOKEN_TYPES, TYPE_COLORS):
        sel = types == type_name
        if sel.any():
            ax.scatter(adv[sel], log_prob[sel], s=3, alpha=0.3, color=color, label=type_name)
    ax.set_xlabel("advantage")
    ax.set_ylabel("log_prob")
    ax.set_title(f"log_prob vs advantage ({len(idx)} of {n} tokens)")
    ax.legend(fontsize=8, markerscale=3)

    ax = axes[1, 1]
    per_step = pd.DataFrame({"step": df["step"].to_numpy(),
                             "contribution": df["contribution"].to_numpy(dtype=float),
                             "abs_weighted": np.abs(df["weighted_contribution"].to_numpy(dtype=float))})
    per_step["abs_contribution"] = per_step["contribution"].abs()
    per_step = per_step.groupby("step").mean()
    ax.plot(per_step.index, per_step["abs_contribution"], label="mean |contribution|")
    ax.plot(per_step.index, per_step["contribution"], label="mean contribution")
    if not np.allclose(df["weight"].to_numpy(dtype=float), 1.0):
        ax.plot(per_step.index, per_step["abs_weighted"], label="mean |weighted contribution|")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel("step")
    ax.set_title("Credit over training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_comparison(runs: Mapping[str, CreditAnalysis], path: Path) -> None:
    """Mean |contribution| per token type per run (grouped bars), and per position bin per run."""
    fig, axes = _new_figure(1, 2, (13, 5))
    ax = axes[0, 0]
    width = 0.8 / max(len(runs), 1)
    x = np.arange(len(TOKEN_TYPES))
    for i, (label, run) in enumerate(runs.items()):
        by_type = run.tables["token_types"].set_index("type").reindex(list(TOKEN_TYPES))
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, by_type["mean_abs_contribution"], width,
               label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(TOKEN_TYPES)
    ax.set_ylabel("mean |contribution|")
    ax.set_title("Credit by token type")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for label, run in runs.items():
        bins = run.tables["position_bins"]
        ax.plot(bins["position_bin"], bins["mean_abs_contribution"], marker="o", label=label)
    ax.set_xlabel("relative position bin")
    ax.set_ylabel("mean |contribution|")
    ax.set_title("Credit by relative position")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_analysis(run: CreditAnalysis, output_dir: str | Path,
                   comparison: pd.DataFrame | None = None) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, table in run.tables.items():
        table.to_csv(output_dir / f"{name}.csv", index=False)
    (output_dir / "summary.md").write_text(summary_markdown(run, comparison))
    plot_credit(run, output_dir / "credit_analysis.png")


def _dir_name(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("._") or "run"


def analyze(df: pd.DataFrame, tokenizer: Tokenizer, output_dir: str | Path, *,
            label: str = "run", compare: Mapping[str, pd.DataFrame] | None = None) -> dict:
    """Analyze one credit log, write its tables, summary.md and credit_analysis.png to output_dir,
    and return its key numbers.

    `compare` maps labels to other runs' logs: each is analyzed into output_dir/compare/<label>/,
    and comparison.csv, comparison.png and a comparison section in summary.md are written.
    """
    output_dir = Path(output_dir)
    run = compute_analysis(df, tokenizer)
    comparison = None
    if compare:
        runs = {label: run}
        for other_label, other_df in compare.items():
            if other_label in runs:
                raise ValueError(f"duplicate run label {other_label!r}")
            runs[other_label] = compute_analysis(other_df, tokenizer)
            write_analysis(runs[other_label], output_dir / "compare" / _dir_name(other_label))
        comparison = comparison_table(runs)
        output_dir.mkdir(parents=True, exist_ok=True)
        comparison.to_csv(output_dir / "comparison.csv", index=False)
        plot_comparison(runs, output_dir / "comparison.png")
    write_analysis(run, output_dir, comparison)
    return run.key


# ----------------------------------------------------------------------------- CLI

def default_label(path: str | Path) -> str:
    """A run directory's name; for a credit_logs_*.pkl file, its directory's name."""
    path = Path(path)
    if path.is_file() and path.name.startswith("credit_logs_") and path.parent.name:
        return path.parent.resolve().name
    return path.resolve().name if path.is_dir() else path.stem


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}_{seen[label]}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(  # --log_path or --log-path, as every front end
        description="Credit-assignment analysis of GRPO credit logs (contribution = A x log_prob).")
    parser.add_argument("--log_path", required=True,
                        help="a credit_logs_*.pkl file or a run's credit-log directory")
    parser.add_argument("--tokenizer_path", required=True,
                        help="tokenizer.json, or a directory containing one")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--compare", nargs="+", default=[], metavar="LOG_PATH",
                        help="other runs' credit logs to compare against --log_path")
    parser.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                        help="one label per run: --log_path first, then each --compare path")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = [args.log_path, *args.compare]
    if args.labels is not None and len(args.labels) != len(paths):
        parser.error(f"--labels needs one name per run ({len(paths)}: --log_path and each "
                     f"--compare path), got {len(args.labels)}")
    labels = _unique_labels(args.labels or [default_label(p) for p in paths])
    try:
        tokenizer = load_tokenizer(args.tokenizer_path)
        logs = [load_credit_logs(p) for p in paths]
        key = analyze(logs[0], tokenizer, args.output_dir, label=labels[0],
                      compare=dict(zip(labels[1:], logs[1:])) or None)
    except CreditLogError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"analyzed {key['tokens']} tokens, {key['episodes']} episodes, {key['steps']} steps "
          f"-> {args.output_dir}")
    for name in ("mean_abs_contribution", "filler_reasoning_ratio", "early_late_ratio",
                 "first_last_20_ratio", "grad_proxy_filler_reasoning_ratio",
                 "grad_proxy_early_late_ratio", "share_abs_t_gt_3", "share_abs_t_lt_1_5"):
        print(f"  {name}: {_fmt(key[name])}")
    return key


if __name__ == "__main__":
    main()
