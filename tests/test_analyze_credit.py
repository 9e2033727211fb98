"""analyze_credit.py against straightforward loop/numpy recomputations on synthetic credit logs."""
import math
import pickle
import time
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import analyze_credit as ac

TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<|im_end|>")
REASONING_CHARS = set("0123456789+-*/=()")
TEMPLATES = (
    "let me think. 12+3=15</think>\n<answer>12+3</answer><|im_end|>",
    "<think>we try (7*8)-6 = 50, so the answer is (7*8)-6</think>\n<answer>(7*8)-6</answer><|im_end|>",
    "hmm 4/2 = 2 ok</think>\n<answer>4/2</answer>",
)
FILLERS = ("so ", "well, ", "first we add. ", "ok ", "the answer needs care. ")


# ----------------------------------------------------------------------------- fixtures

def _all_chars():
    return sorted(set("".join(TEMPLATES + FILLERS)) | set("abcdefghijklmnopqrstuvwxyz"))


def char_tokenizer():
    """One token per character; every tag and <|im_end|> is a single special token."""
    vocab = {c: i for i, c in enumerate(_all_chars())}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(TAGS))
    return tok


def split_tag_tokenizer():
    """Tags spread over several tokens: '<answer>' -> '<', 'answer', '>'; '>\\n' is one token."""
    words = [">\n", "answer", "think"]
    vocab = {c: i for i, c in enumerate(_all_chars() + words)}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r">\n|answer|think|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|im_end|>"])
    return tok


def bpe_tokenizer():
    """A small byte-level BPE like Qwen's: learns merges such as '</', '>(' across tag edges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(TEMPLATES + FILLERS) * 20, trainer)
    return tok


def episode_texts(rng, n):
    return ["".join(rng.choice(FILLERS, size=rng.integers(0, 4))) + TEMPLATES[rng.integers(len(TEMPLATES))]
            for _ in range(n)]


def make_log(tokenizer, seed=0, n_steps=3, n_groups=2, group_size=4, with_length=False,
             with_grad=False, weighted=False, shuffle=False):
    """One row per generated token; plain-GRPO advantages normalized within each group."""
    rng = np.random.default_rng(seed)
    rows, episode_idx = [], 0
    for step in range(1, n_steps + 1):
        for group in range(n_groups):
            texts = episode_texts(rng, group_size)
            rewards = rng.integers(0, 2, size=group_size).astype(float)
            advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
            for text, reward, adv in zip(texts, rewards, advantages):
                ids = tokenizer.encode(text).ids
                for pos, tid in enumerate(ids):
                    log_prob = -rng.exponential(0.5)
                    weight = rng.uniform(0.5, 1.5) if weighted else 1.0
                    row = dict(step=step, episode_idx=episode_idx, group_idx=group, position=pos,
                               token_id=tid, log_prob=log_prob, entropy=rng.uniform(0, 3),
                               reward=reward, advantage=adv, weight=weight,
                               contribution=adv * log_prob, weighted_contribution=weight * adv * log_prob)
                    if with_length:
                        row["length"] = len(ids)
                    if with_grad:
                        row["logit_grad_norm"] = rng.uniform(0, 1.4)
                    rows.append(row)
                episode_idx += 1
    df = pd.DataFrame(rows)
    if shuffle:
        df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    df.attrs = {"format_version": 1, "mitigation": "token_weight" if weighted else "none"}
    return df


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def log(tok):
    return make_log(tok, seed=0, with_grad=True, shuffle=True)


# ----------------------------------------------------------------------------- reference computations

def episodes(df):
    """{episode_idx: rows sorted by position} via plain iteration."""
    out = defaultdict(list)
    for row in df.itertuples(index=False):
        out[row.episode_idx].append(row)
    return {k: sorted(v, key=lambda r: r.position) for k, v in out.items()}


def ref_types_from_offsets(text, offsets, token_texts, special=()):
    """Expected type per token: the tokenizer's added token -> special; overlapping a tag occurrence in
    text -> structure; whitespace only -> whitespace; else by its stripped chars."""
    spans = []
    for tag in TAGS:
        start = text.find(tag)
        while start >= 0:
            spans.append((start, start + len(tag)))
            start = text.find(tag, start + 1)
    types = []
    for (a, b), t, is_special in zip(offsets, token_texts, special or [False] * len(token_texts)):
        if is_special:
            types.append("special")
        elif any(a < e and b > s for s, e in spans):
            types.append("structure")
        elif t and not t.strip():
            types.append("whitespace")
        elif t.strip() and all(c in REASONING_CHARS for c in t.strip()):
            types.append("reasoning")
        else:
            types.append("filler")
    return types


def ref_types(df, tokenizer):
    """Per row (aligned with df.index), from each episode's own encoding offsets."""
    out = {}
    for rows in episodes(df).values():
        ids = [r.token_id for r in rows]
        pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        text = "".join(pieces)
        enc = tokenizer.encode(text)
        assert enc.ids == ids  # the synthetic text re-encodes to the logged tokens
        added = set(tokenizer.get_added_tokens_decoder())
        for r, t in zip(rows, ref_types_from_offsets(text, enc.offsets, pieces, [i in added for i in ids])):
            out[(r.episode_idx, r.position)] = t
    return [out[(e, p)] for e, p in zip(df["episode_idx"], df["position"])]


def ref_bin(position, length, n_bins):
    return min(n_bins - 1, math.floor(n_bins * position / length))


def ref_lengths(df):
    if "length" in df.columns:
        return list(df["length"])
    counts = Counter(df["episode_idx"])
    return [counts[e] for e in df["episode_idx"]]


def assert_close(a, b, **kw):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float),
                               rtol=1e-9, atol=1e-12, equal_nan=True, **kw)


# ----------------------------------------------------------------------------- token types

def test_char_tokenizer_types(tok, log):
    got = ac.classify_tokens(log, tok)
    assert list(got.index) == list(log.index)
    assert list(got) == ref_types(log, tok)
    # single-token tags are the tokenizer's own (special); nothing is left to find from context
    assert set(got) == set(ac.TOKEN_TYPES) - {"structure"}


def test_tags_split_over_several_tokens_are_structure():
    tok = split_tag_tokenizer()
    assert tok.encode("<answer>").tokens == ["<", "answer", ">"]
    df = make_log(tok, seed=1, shuffle=True)
    got = ac.classify_tokens(df, tok)
    assert list(got) == ref_types(df, tok)
    # every piece of every tag is structure; the word 'answer' in prose is filler
    answer_id = tok.token_to_id("answer")
    ep = episodes(df.assign(type=got.to_numpy()))
    saw_prose_answer = False
    for rows in ep.values():
        toks = [tok.decode([r.token_id]) for r in rows]
        for i in range(len(rows) - 2):
            if toks[i:i + 3] == ["<", "answer", ">"] or toks[i:i + 3] == ["<", "answer", ">\n"]:
                assert [r.type for r in rows[i:i + 3]] == ["structure"] * 3
        for i, r in enumerate(rows):
            if r.token_id == answer_id and toks[i - 1] == " ":
                assert r.type == "filler"
                saw_prose_answer = True
    assert saw_prose_answer


def test_byte_level_bpe_types():
    tok = bpe_tokenizer()
    df = make_log(tok, seed=2, n_steps=2)
    got = list(ac.classify_tokens(df, tok))
    assert got == ref_types(df, tok)
    # the BPE really splits tags, and a merge across a tag edge such as '>(' is structure
    assert tok.encode("<answer>").tokens != ["<answer>"]
    pieces = [tok.decode([i]) for i in df["token_id"]]
    assert any(p.startswith(">") and len(p) > 1 and t == "structure" for p, t in zip(pieces, got))


def test_special_token_and_whitespace(tok):
    ids = [tok.token_to_id(c) for c in [" ", "1", "+", " ", "a", "<|im_end|>"]]
    df = pd.DataFrame({"step": 1, "episode_idx": 0, "position": range(len(ids)), "token_id": ids})
    assert list(ac.classify_tokens(df, tok)) == ["whitespace", "reasoning", "reasoning", "whitespace",
                                                 "filler", "special"]


def test_tag_does_not_match_across_episodes():
    tok = split_tag_tokenizer()
    first, second = tok.encode("ok <").ids, tok.encode("answer> ok").ids
    df = pd.DataFrame({"step": 1, "episode_idx": [0] * len(first) + [1] * len(second),
                       "position": list(range(len(first))) + list(range(len(second))),
                       "token_id": first + second})
    assert "structure" not in set(ac.classify_tokens(df, tok))


def test_classify_300k_rows_is_fast(tok):
    base = make_log(tok, seed=3, n_steps=2)
    reps = 300_000 // len(base) + 1
    big = pd.concat([base.assign(episode_idx=base["episode_idx"] + k * 1000) for k in range(reps)],
                    ignore_index=True)
    start = time.perf_counter()
    types = ac.classify_tokens(big, tok)
    assert time.perf_counter() - start < 20.0
    assert list(types.iloc[:len(base)]) == list(ac.classify_tokens(base, tok))


# ----------------------------------------------------------------------------- tables

def test_position_bins_against_loop(log):
    table = ac.position_bins_table(log)
    groups = defaultdict(list)
    for row, length in zip(log.itertuples(index=False), ref_lengths(log)):
        groups[ref_bin(row.position, length, 10)].append(row)
    assert list(table["position_bin"]) == list(range(10))
    for b, rows in groups.items():
        got = table.set_index("position_bin").loc[b]
        c = np.array([r.contribution for r in rows])
        assert got["count"] == len(rows)
        assert_close(got["mean_contribution"], c.mean())
        assert_close(got["std_contribution"], c.std(ddof=1))
        assert_close(got["mean_abs_contribution"], np.abs(c).mean())
        assert_close(got["mean_log_prob"], np.mean([r.log_prob for r in rows]))
        assert_close(got["mean_abs_weighted_contribution"],
                     np.mean([abs(r.weighted_contribution) for r in rows]))
        assert_close(got["mean_grad_proxy"],
                     np.mean([abs(r.advantage) * r.logit_grad_norm for r in rows]))


def test_position_bins_uses_length_column_and_clamps(tok):
    df = make_log(tok, seed=4, n_steps=1, n_groups=1, group_size=3, with_length=True)
    # episode 0: logged length shorter than its rows (positions past it clamp to bin 9);
    # episode 1: longer (its tokens sit in early bins only)
    n0 = int((df["episode_idx"] == 0).sum())
    df.loc[df["episode_idx"] == 0, "length"] = n0 // 2
    df.loc[df["episode_idx"] == 1, "length"] = 10_000
    bins = ac.relative_position_bins(df, 10)
    expected = [ref_bin(p, L, 10) for p, L in zip(df["position"], df["length"])]
    assert list(bins) == expected
    assert (bins[(df["episode_idx"] == 0).to_numpy()] == 9).sum() > 1
    assert bins[(df["episode_idx"] == 1).to_numpy()].max() == 0
    table = ac.position_bins_table(df)
    assert list(table["count"]) == [expected.count(b) for b in range(10)]
    assert "mean_grad_proxy" not in table.columns


def test_position_bin_edges_exact():
    df = pd.DataFrame({"step": 1, "episode_idx": 0, "position": range(10), "length": 10})
    assert list(ac.relative_position_bins(df, 10)) == list(range(10))
    assert list(ac.relative_position_bins(df, 5)) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    df7 = pd.DataFrame({"step": 1, "episode_idx": 0, "position": range(7)})  # no length column
    assert list(ac.relative_position_bins(df7, 10)) == [math.floor(10 * p / 7) for p in range(7)]


def test_token_types_table(tok, log):
    types = ac.classify_tokens(log, tok)
    table = ac.token_types_table(log, types).set_index("type")
    ref = ref_types(log, tok)
    assert list(table.index) == ["reasoning", "filler", "whitespace", "special", "structure"]
    for name in ac.TOKEN_TYPES:
        rows = [r for r, t in zip(log.itertuples(index=False), ref) if t == name]
        got = table.loc[name]
        assert got["count"] == len(rows)
        assert_close(got["percent"], 100 * len(rows) / len(log))
        if not rows:  # a type absent from this log: its means are NaN
            assert np.isnan(got["mean_contribution"])
            continue
        assert_close(got["mean_contribution"], np.mean([r.contribution for r in rows]))
        assert_close(got["mean_abs_contribution"], np.mean([abs(r.contribution) for r in rows]))
        assert_close(got["mean_log_prob"], np.mean([r.log_prob for r in rows]))
        assert_close(got["mean_entropy"], np.mean([r.entropy for r in rows]))
        assert_close(got["mean_grad_proxy"], np.mean([abs(r.advantage) * r.logit_grad_norm for r in rows]))


def test_position_type_table(tok, log):
    types = ac.classify_tokens(log, tok)
    table = ac.position_type_table(log, types)
    assert len(table) == 5 * len(ac.TOKEN_TYPES)
    assert list(table["position_range"].unique()) == ["0-20%", "20-40%", "40-60%", "60-80%", "80-100%"]
    cells = defaultdict(list)
    for row, length, t in zip(log.itertuples(index=False), ref_lengths(log), ref_types(log, tok)):
        cells[(ref_bin(row.position, length, 5), t)].append(row)
    for rec in table.itertuples(index=False):
        rows = cells.get((rec.position_bin, rec.type), [])
        assert rec.count == len(rows)
        if rows:
            assert_close(rec.mean_abs_contribution, np.mean([abs(r.contribution) for r in rows]))
            assert_close(rec.mean_log_prob, np.mean([r.log_prob for r in rows]))
        else:
            assert math.isnan(rec.mean_abs_contribution)


def test_reward_split_table(log):
    table = ac.reward_split_table(log).set_index("advantage_sign")
    assert list(table.index) == ["positive", "zero", "negative"]
    assert table.loc["zero", "count"] > 0  # groups whose rewards were all equal
    for name, keep in (("positive", lambda a: a > 0), ("zero", lambda a: a == 0), ("negative", lambda a: a < 0)):
        rows = [r for r in log.itertuples(index=False) if keep(r.advantage)]
        got = table.loc[name]
        assert got["count"] == len(rows)
        assert got["episodes"] == len({r.episode_idx for r in rows})
        assert_close(got["mean_contribution"], np.mean([r.contribution for r in rows]))
        assert_close(got["mean_abs_contribution"], np.mean([abs(r.contribution) for r in rows]))
        assert_close(got["mean_log_prob"], np.mean([r.log_prob for r in rows]))
    # log_prob < 0: positive-advantage tokens carry negative contribution
    assert table.loc["positive", "mean_contribution"] < 0


def ref_tstats(df):
    by_pos = defaultdict(list)
    for row in df.itertuples(index=False):
        by_pos[row.position].append(row.contribution)
    out = {}
    for pos in range(max(by_pos) + 1):
        values = np.array(by_pos.get(pos, []))
        n = len(values)
        mean = values.mean() if n else math.nan
        std = values.std(ddof=1) if n >= 2 else math.nan
        t = mean / (std / math.sqrt(n)) if n >= 2 and std > 0 else math.nan
        out[pos] = (n, mean, std, t)
    return out


def test_tstats_table_and_shares(log):
    table = ac.tstats_table(log)
    ref = ref_tstats(log)
    assert list(table["position"]) == list(ref)
    assert list(table["n"]) == [v[0] for v in ref.values()]
    assert_close(table["mean"], [v[1] for v in ref.values()])
    assert_close(table["std"], [v[2] for v in ref.values()])
    assert_close(table["t"], [v[3] for v in ref.values()])
    t = np.abs([v[3] for v in ref.values() if not math.isnan(v[3])])
    shares = ac.tstat_shares(table)
    assert shares["t_positions"] == len(t)
    assert_close(shares["share_abs_t_gt_3"], np.mean(t > 3))
    assert_close(shares["share_abs_t_lt_1_5"], np.mean(t < 1.5))
    assert_close(shares["mean_abs_t"], t.mean())


def test_tstats_degenerate_positions():
    df = pd.DataFrame({"position": [0, 0, 0, 1, 2, 2], "contribution": [0.5, 0.5, 0.5, 1.0, 1.0, 3.0]})
    table = ac.tstats_table(df)
    assert list(table["n"]) == [3, 1, 2]
    assert math.isnan(table["t"][0]) and math.isnan(table["t"][1])  # std 0, n < 2
    assert_close(table["t"][2], 2.0 / (math.sqrt(2) / math.sqrt(2)))
    shares = ac.tstat_shares(table)
    assert shares["t_positions"] == 1 and shares["share_abs_t_gt_3"] == 0.0
    assert shares["share_abs_t_lt_1_5"] == 0.0
    assert math.isnan(ac.tstat_shares(table.iloc[:2])["mean_abs_t"])


def test_top_tokens_table(tok, log):
    types = ac.classify_tokens(log, tok)
    table = ac.top_tokens_table(log, types, tok)
    ref = ref_types(log, tok)
    for name in ac.TOKEN_TYPES:
        counts = Counter(tid for tid, t in zip(log["token_id"], ref) if t == name)
        expected = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        got = table[table["type"] == name]
        assert list(got["rank"]) == list(range(1, len(expected) + 1))
        assert list(zip(got["token_id"], got["count"])) == expected
        assert list(got["text"]) == [repr(tok.decode([tid], skip_special_tokens=False))
                                     for tid, _ in expected]
        if not expected:
            continue
        top_id = expected[0][0]
        rows = [r for r, t in zip(log.itertuples(index=False), ref) if t == name and r.token_id == top_id]
        assert_close(got["mean_abs_contribution"].iloc[0], np.mean([abs(r.contribution) for r in rows]))
    assert "' '" in set(table["text"])  # whitespace stays visible


# ----------------------------------------------------------------------------- key numbers, comparison

def ref_key(df, tokenizer):
    ref = ref_types(df, tokenizer)
    abs_c = np.abs(df["contribution"].to_numpy())
    bins10 = np.array([ref_bin(p, L, 10) for p, L in zip(df["position"], ref_lengths(df))])
    bins5 = np.array([ref_bin(p, L, 5) for p, L in zip(df["position"], ref_lengths(df))])
    types = np.array(ref)
    t = np.abs([v[3] for v in ref_tstats(df).values() if not math.isnan(v[3])])
    out = {
        "tokens": len(df), "episodes": df["episode_idx"].nunique(), "steps": df["step"].nunique(),
        "mean_abs_contribution": abs_c.mean(),
        "filler_reasoning_ratio": abs_c[types == "filler"].mean() / abs_c[types == "reasoning"].mean(),
        "early_late_ratio": abs_c[bins10 == 0].mean() / abs_c[bins10 == 9].mean(),
        "first_last_20_ratio": abs_c[bins5 == 0].mean() / abs_c[bins5 == 4].mean(),
        "share_abs_t_gt_3": np.mean(t > 3), "share_abs_t_lt_1_5": np.mean(t < 1.5),
        "mean_weight": df["weight"].mean(),
    }
    if "logit_grad_norm" in df.columns:
        g = np.abs(df["advantage"].to_numpy()) * df["logit_grad_norm"].to_numpy()
        out["grad_proxy_filler_reasoning_ratio"] = g[types == "filler"].mean() / g[types == "reasoning"].mean()
        out["grad_proxy_early_late_ratio"] = g[bins10 == 0].mean() / g[bins10 == 9].mean()
        out["grad_proxy_first_last_20_ratio"] = g[bins5 == 0].mean() / g[bins5 == 4].mean()
    else:
        for k in ("filler_reasoning", "early_late", "first_last_20"):
            out[f"grad_proxy_{k}_ratio"] = math.nan
    return out


def test_comparison_rows(tok, log):
    other = make_log(tok, seed=5, n_steps=2, with_length=True, weighted=True)
    runs = {"base": ac.compute_analysis(log, tok), "weighted": ac.compute_analysis(other, tok)}
    table = ac.comparison_table(runs)
    assert list(table["label"]) == ["base", "weighted"]
    for (_, row), df in zip(table.iterrows(), (log, other)):
        for key, value in ref_key(df, tok).items():
            assert_close(row[key], value, err_msg=key)
    assert table["mitigation"].tolist() == ["none", "token_weight"]
    assert table["mean_weight"][1] != pytest.approx(1.0)


def test_ratios_without_denominator_are_nan_and_print_na(tok, tmp_path):
    ids = [tok.token_to_id(c) for c in "so ok"]
    df = pd.DataFrame({"step": 1, "episode_idx": 0, "group_idx": 0, "position": range(len(ids)),
                       "token_id": ids, "log_prob": -0.5, "entropy": 1.0, "reward": 0.0,
                       "advantage": 0.0, "weight": 1.0, "contribution": 0.0,
                       "weighted_contribution": 0.0})
    key = ac.analyze(df, tok, tmp_path)
    assert math.isnan(key["filler_reasoning_ratio"]) and math.isnan(key["early_late_ratio"])
    summary = (tmp_path / "summary.md").read_text()
    assert "filler / reasoning mean |contribution|: n/a" in summary
    assert "gradient-proxy ratios are n/a" in summary


# ----------------------------------------------------------------------------- loading

def write_run_dir(path, df):
    path.mkdir()
    for step, part in df.groupby("step"):
        part.to_pickle(path / f"credit_logs_step_{step:06d}.pkl")
    df.to_pickle(path / "credit_logs_final.pkl")


def test_load_dir_uses_step_files_once(tok, tmp_path):
    df = make_log(tok, seed=6, n_steps=3)
    write_run_dir(tmp_path / "run", df)
    loaded = ac.load_credit_logs(tmp_path / "run")
    assert len(loaded) == len(df)
    pd.testing.assert_frame_equal(loaded.reset_index(drop=True), df.reset_index(drop=True))
    assert loaded["step"].is_monotonic_increasing
    assert loaded.attrs["mitigation"] == "none"
    # without step files the final file is the run
    for f in (tmp_path / "run").glob("credit_logs_step_*.pkl"):
        f.unlink()
    assert len(ac.load_credit_logs(tmp_path / "run")) == len(df)
    assert len(ac.load_credit_logs(tmp_path / "run" / "credit_logs_final.pkl")) == len(df)


def test_load_a_run_whose_final_file_is_the_index(tok, tmp_path):
    """The logger's layout since format 2: step files and a final file that lists them (no rows of its own)."""
    df = make_log(tok, seed=6, n_steps=3)
    run = tmp_path / "run"
    run.mkdir()
    names = []
    for step, part in df.groupby("step"):
        names.append(f"credit_logs_step_{step:06d}.pkl")
        part.to_pickle(run / names[-1])
    index = pd.DataFrame({"file": names, "last_step": sorted(df["step"].unique())})
    index.attrs.update({"format_version": 2, "kind": "index", "mitigation": "none"})
    index.to_pickle(run / "credit_logs_final.pkl")
    for source in (run, run / "credit_logs_final.pkl"):
        pd.testing.assert_frame_equal(ac.load_credit_logs(source).reset_index(drop=True), df.reset_index(drop=True))
    (run / names[1]).unlink()
    with pytest.raises(ac.CreditLogError, match=names[1]):
        ac.load_credit_logs(run / "credit_logs_final.pkl")


def test_step_files_in_numeric_order(tok, tmp_path):
    df = make_log(tok, seed=7, n_steps=2)
    (tmp_path / "run").mkdir()
    df[df["step"] == 1].to_pickle(tmp_path / "run" / "credit_logs_step_9.pkl")
    df[df["step"] == 2].assign(step=10).to_pickle(tmp_path / "run" / "credit_logs_step_10.pkl")
    assert list(ac.load_credit_logs(tmp_path / "run")["step"].unique()) == [1, 10]


def test_load_errors(tok, tmp_path):
    df = make_log(tok, seed=8, n_steps=1)
    with pytest.raises(ValueError, match="does not exist"):
        ac.load_credit_logs(tmp_path / "nope")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ac.CreditLogError, match="no credit log files"):
        ac.load_credit_logs(tmp_path / "empty_dir")
    (tmp_path / "garbage.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ac.CreditLogError, match="cannot read"):
        ac.load_credit_logs(tmp_path / "garbage.pkl")
    with open(tmp_path / "dict.pkl", "wb") as f:
        pickle.dump({"step": [1]}, f)
    with pytest.raises(ac.CreditLogError, match="holds a dict"):
        ac.load_credit_logs(tmp_path / "dict.pkl")
    df.drop(columns=["weight", "entropy"]).to_pickle(tmp_path / "old.pkl")
    with pytest.raises(ac.CreditLogError) as info:
        ac.load_credit_logs(tmp_path / "old.pkl")
    message = str(info.value)
    assert "weight" in message.split("Required")[0] and "entropy" in message.split("Required")[0]
    assert "older" in message and "weighted_contribution" in message
    df.iloc[:0].to_pickle(tmp_path / "empty.pkl")
    with pytest.raises(ac.CreditLogError, match="empty"):
        ac.load_credit_logs(tmp_path / "empty.pkl")


# ----------------------------------------------------------------------------- CLI

def test_cli_end_to_end(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    write_run_dir(tmp_path / "credit_logs", make_log(tok, seed=9, with_grad=True))
    write_run_dir(tmp_path / "credit_logs_w", make_log(tok, seed=10, weighted=True))
    out = tmp_path / "analysis"
    key = ac.main(["--log_path", str(tmp_path / "credit_logs"), "--tokenizer_path", str(tmp_path),
                   "--output_dir", str(out), "--compare", str(tmp_path / "credit_logs_w"),
                   "--labels", "base", "weighted"])
    assert key["has_grad_proxy"] and math.isfinite(key["grad_proxy_early_late_ratio"])
    for name in ac.TABLE_FILES + ("summary.md", "comparison.csv"):
        assert (out / name).stat().st_size > 0, name
    for png in (out / "credit_analysis.png", out / "comparison.png",
                out / "compare" / "weighted" / "credit_analysis.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (out / "compare" / "weighted" / "token_types.csv").is_file()
    comparison = pd.read_csv(out / "comparison.csv")
    assert list(comparison["label"]) == ["base", "weighted"]
    assert list(comparison["tokens"]) == [key["tokens"], len(make_log(tok, seed=10, weighted=True))]
    summary = (out / "summary.md").read_text()
    for heading in ("## Run size", "## Key ratios", "## Token types", "## Comparison"):
        assert heading in summary
    assert "onehot(y) - p" in summary
    bins = pd.read_csv(out / "position_bins.csv")
    assert list(bins["position_bin"]) == list(range(10)) and "mean_grad_proxy" in bins.columns


def test_cli_errors(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(SystemExit):
        ac.main(["--log_path", str(tmp_path / "missing"), "--tokenizer_path", str(tmp_path),
                 "--output_dir", str(tmp_path / "out")])
    write_run_dir(tmp_path / "run", make_log(tok, seed=11, n_steps=1))
    with pytest.raises(SystemExit):  # one label for two runs
        ac.main(["--log_path", str(tmp_path / "run"), "--tokenizer_path", str(tmp_path),
                 "--output_dir", str(tmp_path / "out"), "--compare", str(tmp_path / "run"),
                 "--labels", "only_one"])


def test_default_labels(tmp_path):
    (tmp_path / "credit_logs_x").mkdir()
    (tmp_path / "credit_logs_x" / "credit_logs_final.pkl").write_bytes(b"")
    assert ac.default_label(tmp_path / "credit_logs_x") == "credit_logs_x"
    assert ac.default_label(tmp_path / "credit_logs_x" / "credit_logs_final.pkl") == "credit_logs_x"
    assert ac._unique_labels(["a", "a", "b"]) == ["a", "a_2", "b"]
