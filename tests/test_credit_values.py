"""credit_values: Monte-Carlo values of every prefix, against exact values on a policy whose continuations can
all be enumerated (a random Qwen2 over a vocabulary of four tokens), on the bandit (one-token completions),
and the step boundaries on a character vocabulary and on Qwen3's BPE tokenizer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bandit_task
import countdown_task
import credit_values as cv
import distributed
import gsm8k_task
import parts
import tasks
from qwen2_model import ModelConfig, Transformer
from tokenizer import Tokenizer

EOS, VOCAB, MAX_NEW = 0, 4, 4  # token 0 ends a completion; 1-3 are the others


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread runs them faster than two, and never waits on a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def policy() -> Transformer:
    return make_policy()


def make_policy() -> Transformer:
    """A random Qwen2 over 4 tokens with weights large enough that its next-token distributions are far from
    uniform and depend on the context (the same weights in every process)."""
    torch.manual_seed(3)
    cfg = ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                      rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32")
    model = Transformer.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.6)
    return model.eval()


def reward(ids: list[int]) -> float:
    """A deterministic, irregular function of the whole completion (its end token included)."""
    return float(sum((t + 1) * (i + 2) for i, t in enumerate(ids)) % 7) / 6


@torch.no_grad()
def exact_moments(model: Transformer, prompt: list[int], prefix: list[int], temperature: float) -> tuple[float, float]:
    """(E[r], E[r^2]) over every continuation of prompt + prefix, enumerated with full forwards."""
    if len(prefix) == MAX_NEW or (prefix and prefix[-1] == EOS):
        r = reward(prefix)
        return r, r * r
    logits = model(torch.tensor([prompt + prefix]))[0, -1].double()
    probs = torch.softmax(logits / temperature, -1).tolist()
    m1 = m2 = 0.0
    for token, p in enumerate(probs):
        a, b = exact_moments(model, prompt, prefix + [token], temperature)
        m1, m2 = m1 + p * a, m2 + p * b
    return m1, m2


def exact_values(model, prompt, completion, temperature) -> tuple[np.ndarray, np.ndarray]:
    """Exact V(p) and the SD of one continuation's reward, p = 0..len(completion)."""
    moments = [exact_moments(model, prompt, completion[:p], temperature) for p in range(len(completion) + 1)]
    mean = np.array([m for m, _ in moments])
    return mean, np.sqrt(np.maximum(np.array([m2 for _, m2 in moments]) - mean ** 2, 0.0))


PROMPT, COMPLETION = [1, 2], [3, 1, 2, 0]


def estimate(model, k, seed, temperature=1.0, prompt=PROMPT, completion=COMPLETION, positions=None):
    return cv.mc_values(model, prompt, completion, reward, k=k, max_new_tokens=MAX_NEW, eos_token_id=EOS,
                        temperature=temperature, seed=seed, positions=positions)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_estimates_lie_within_a_few_standard_errors_of_the_exact_values(policy, temperature):
    exact, sd = exact_values(policy, PROMPT, COMPLETION, temperature)
    assert (sd[:-1] > 0.01).all(), "the policy should leave every unfinished state uncertain"
    k = 256
    values, stderr = estimate(policy, k, seed=11, temperature=temperature)
    assert values[-1] == reward(COMPLETION) and stderr[-1] == 0.0  # finished: its reward, exactly
    for done in ([2, 0], [1, 1, 1, 1]):  # ended by the end token / full
        v, s = estimate(policy, 4, seed=1, temperature=temperature, completion=done)
        assert v[-1] == reward(done) and s[-1] == 0.0
    z = (values[:-1] - exact[:-1]) / (sd[:-1] / math.sqrt(k))
    assert np.abs(z).max() < 4.0, z
    # the reported errors are the true ones: a sample SD of 256 draws is within ~10% of the SD where the
    # rewards are not dominated by rare outcomes (there it is itself noisy: the next test covers every state)
    spread = sd > 0.15
    assert spread.sum() >= 2
    np.testing.assert_allclose(stderr[spread], sd[spread] / math.sqrt(k), rtol=0.2)


def test_reported_errors_match_the_spread_of_estimates_over_seeds_and_small_k_is_unbiased(policy):
    exact, sd = exact_values(policy, PROMPT, COMPLETION, 1.0)
    seeds, k = 120, 2
    engine = cv.RolloutEngine(policy)  # one KV cache for every call
    query = [cv.ValueQuery(PROMPT, COMPLETION, reward)]
    runs = [cv.estimate_values(policy, query, k=k, max_new_tokens=MAX_NEW, eos_token_id=EOS, seed=seed,
                               engine=engine)[0][0] for seed in range(seeds)]
    values = np.array([e.values for e in runs])[:, :-1]
    variances = np.array([e.stderr ** 2 for e in runs])[:, :-1]
    true_var = sd[:-1] ** 2 / k
    # unbiased: the mean of many K = 2 estimates is the exact value
    z = (values.mean(0) - exact[:-1]) / np.sqrt(true_var / seeds)
    assert np.abs(z).max() < 4.0, z
    # the reported variance (sample variance / K) is unbiased for the estimate's variance, and matches the
    # spread of the estimates across seeds
    spread = sd[:-1] > 0.15  # states whose rewards are not dominated by rare outcomes
    np.testing.assert_allclose(variances.mean(0)[spread], true_var[spread], rtol=0.3)
    np.testing.assert_allclose(values.var(0, ddof=1)[spread], true_var[spread], rtol=0.3)


QUERIES = [  # two groups sharing prompts (their prompt-alone state is one state), one unfinished completion, and
    # the state [1, 2, 3] reached by three episodes with different budgets (3, 3 and 4 more tokens)
    (PROMPT, [3, 1, 2, 0]), (PROMPT, [3, 3, 0]), (PROMPT, [2, 0]), ([3], [1, 1, 1, 1]), ([3], [1, 2]), ([2, 2, 1], []),
    ([1, 2, 3], [1, 1]),
]


def batch(model, queries, **kwargs):
    qs = [cv.ValueQuery(p, c, reward) for p, c in queries]
    return cv.estimate_values(model, qs, k=kwargs.pop("k", 8), max_new_tokens=MAX_NEW, eos_token_id=EOS, **kwargs)


def test_the_same_seed_gives_the_same_estimates_whatever_the_batch_layout(policy):
    together, cost = batch(policy, QUERIES, seed=5)
    alone = [batch(policy, [q], seed=5)[0][0] for q in QUERIES]
    reversed_, _ = batch(policy, QUERIES[::-1], seed=5)
    one_state_per_call, _ = batch(policy, QUERIES, seed=5, max_rows=1)
    for i, est in enumerate(together):
        for other in (alone[i], reversed_[len(QUERIES) - 1 - i], one_state_per_call[i]):
            np.testing.assert_array_equal(est.values, other.values)
            np.testing.assert_array_equal(est.stderr, other.stderr)
    # states sharded over two "ranks" and concatenated: the same continuations as one process
    plan = cv.plan_states([cv.ValueQuery(p, c, reward) for p, c in QUERIES], MAX_NEW, [EOS])
    engine = cv.RolloutEngine(policy)
    whole = cv.sample_continuations(engine, plan.states, 8, [EOS], seed=5)
    half = len(plan.states) // 2
    split = (cv.sample_continuations(engine, plan.states[:half], 8, [EOS], seed=5)
             + cv.sample_continuations(engine, plan.states[half:], 8, [EOS], seed=5))
    assert split == whole
    # another seed, other estimates
    other_seed, _ = batch(policy, QUERIES, seed=6)
    assert any(not np.array_equal(a.values, b.values) for a, b in zip(together, other_seed))
    # each distinct unfinished state sampled once: the shared prompt-alone states and prefixes count once
    distinct = {tuple(p + c[:i]) for p, c in QUERIES for i in range(len(c) + 1)
                if not (i == len(c) and (i == MAX_NEW or (c and c[-1] == EOS)))}
    assert cost.states == len(plan.states) == len(distinct) < sum(len(c) + 1 for _, c in QUERIES)
    assert cost.continuations == 8 * len(distinct) and 0 < cost.kept_tokens <= cost.sampled_tokens


def test_states_sharded_over_torchrun_ranks_give_the_single_process_estimates(policy, tmp_path):
    """Two gloo processes (torchrun), each sampling half of the states: every rank returns the estimates and the
    cost of one process."""
    out = tmp_path / "ranks"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(out)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single, cost = batch(policy, QUERIES, seed=5)
    for rank in range(2):
        got = json.loads((out / f"rank{rank}.json").read_text())
        assert got["values"] == [e.values.tolist() for e in single]
        assert got["stderr"] == [e.stderr.tolist() for e in single]
        assert got["cost"] == vars(cost)


def _rank_worker(out: str) -> None:
    """Run under torchrun by the test above: this rank's estimates of QUERIES, written as JSON."""
    d = distributed.init(torch.device("cpu"))
    torch.set_num_threads(1)
    estimates, cost = batch(make_policy().eval(), QUERIES, seed=5, dist=d)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{d.rank}.json").write_text(json.dumps({
        "values": [e.values.tolist() for e in estimates], "stderr": [e.stderr.tolist() for e in estimates],
        "cost": vars(cost)}))
    distributed.shutdown(d)


def test_positions_select_states_and_steps_give_step_advantages(policy):
    values, stderr = estimate(policy, 16, seed=2)
    some, some_err = estimate(policy, 16, seed=2, positions=[4, 0, 2])
    np.testing.assert_array_equal(some, values[[4, 0, 2]])
    np.testing.assert_array_equal(some_err, stderr[[4, 0, 2]])
    adv, adv_err = cv.mc_advantages(values, stderr)
    np.testing.assert_allclose(adv, values[1:] - values[:-1])
    np.testing.assert_allclose(adv_err, np.hypot(stderr[1:], stderr[:-1]))
    # the per-token advantages of a step sum to its step advantage
    step_adv, _ = cv.mc_advantages(values[[0, 2, 4]], stderr[[0, 2, 4]])
    np.testing.assert_allclose(step_adv, [adv[:2].sum(), adv[2:].sum()])


def test_bandit_vine_advantage_is_the_reward_minus_the_prompts_value(tmp_path):
    arms = 5
    path = bandit_task.build_bandit_model(tmp_path / "bandit", num_arms=arms, num_contexts=1, seed=4)
    model, tok = Transformer.from_pretrained(path, dtype=torch.float32).eval(), Tokenizer(path)
    problem = bandit_task.make_problems(arms, 1, 1, seed=0)[0]
    prompt = tok.encode(bandit_task.build_prompt(problem))
    with torch.no_grad():  # temperature 0.5 sharpens the near-uniform random policy
        probs = torch.softmax(model(torch.tensor([prompt]))[0, -1].double() / 0.5, -1)
    paying = tok.encode(bandit_task.ARM_SYMBOLS[problem.paying_arm])
    exact = float(probs[paying[0]])

    def arm_reward(ids: list[int]) -> float:
        return bandit_task.reward_function(problem, tok.decode(ids), arms)["reward"]

    k = 400
    for arm in range(arms):
        completion = tok.encode(bandit_task.ARM_SYMBOLS[arm])
        values, stderr = cv.mc_values(model, prompt, completion, arm_reward, k=k, max_new_tokens=1,
                                      eos_token_id=tok.end_token_ids, temperature=0.5, seed=9)
        r = arm_reward(completion)
        assert values[1] == r and stderr[1] == 0.0  # the one-token completion is full: its reward
        assert abs(values[0] - exact) < 4 * math.sqrt(exact * (1 - exact) / k)
        adv, _ = cv.mc_advantages(values, stderr)
        assert adv[0] == r - values[0] and (adv[0] > 0) == (arm == problem.paying_arm)


def test_bad_input_is_one_error_naming_the_argument_or_episode(policy):
    def call(**kw):
        args = dict(k=4, max_new_tokens=MAX_NEW, eos_token_id=EOS)
        args.update(kw)
        prompt, completion, fn = args.pop("prompt", PROMPT), args.pop("completion", COMPLETION), args.pop("fn", reward)
        return cv.mc_values(policy, prompt, completion, fn, **args)

    cases = [
        (dict(k=1), "k must be an integer >= 2"),
        (dict(k=2.0), "k must be an integer >= 2"),
        (dict(positions=[0, 5]), "episode 0: positions must be integers in 0..4"),
        (dict(positions=[-1]), "positions must be integers in 0..4"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(completion=[1, 0, 2]), "end token before its last position"),
        (dict(completion=[1, 1, 1, 1, 1]), "more than max_new_tokens=4"),
        (dict(completion=[1, 7]), "token id 7 is not in the model's vocabulary of 4"),
        (dict(prompt=[]), "prompt_ids is empty"),
        (dict(fn=lambda ids: 1 / 0), "episode 0: reward_fn raised ZeroDivisionError"),
        (dict(fn=lambda ids: "1.0"), "reward_fn returned '1.0'"),
        (dict(fn=lambda ids: True), "reward_fn returned True"),
        (dict(fn=lambda ids: float("nan")), "reward_fn returned nan"),
        (dict(fn=None), "reward_fn must be callable"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call(**kwargs)
    # the episode is named in a batch, and a reward function failing only on continuations still raises
    qs = [cv.ValueQuery(PROMPT, COMPLETION, reward),
          cv.ValueQuery(PROMPT, [3], lambda ids: reward(ids) if ids == [3] else None)]
    with pytest.raises(ValueError, match="episode 1: reward_fn returned None"):
        cv.estimate_values(policy, qs, k=2, max_new_tokens=MAX_NEW, eos_token_id=EOS)


# ============================================================================ step boundaries


def test_countdown_and_gsm8k_step_ends():
    text = "55-46=9, 9+13=22</think>\n<answer>(55-46)+13</answer>"
    assert [text[:e] for e in countdown_task.equation_ends(text)] == ["55-46=9", "55-46=9, 9+13=22"]
    assert countdown_task.equation_ends("1" * 50 + "+2=3 and 12 * 3 = 36") == [54, 70]
    config = parts.load_config(None)
    assert tasks.TASKS.get("countdown")(config).step_ends(text) == countdown_task.equation_ends(text)
    assert tasks.TASKS.get("gsm8k")(config).step_ends("a\nbb\n\nc") == [2, 5, 6]
    assert tasks.TASKS.get("bandit")(config).step_ends("a\nb 1+2=3") == []  # no steps: the whole completion


def test_token_boundaries_on_a_character_vocabulary(tmp_path):
    import tiny_model
    from tokenizer import build_char_tokenizer, save_char_tokenizer

    save_char_tokenizer(build_char_tokenizer(tiny_model.ALPHABET, tiny_model.SPECIAL_TOKENS), tmp_path,
                        eos_token=tiny_model.EOS_TOKEN, pad_token=tiny_model.EOS_TOKEN)
    tok = Tokenizer(tmp_path)
    text = "55-46=9, 9+13=22</think>\n<answer>(55-46)+13</answer>"
    ids = tok.encode(text)
    assert len(ids) < len(text)  # the tags are single tokens
    ends = countdown_task.equation_ends(text)
    positions = cv.step_positions(tok.decode, ids + [tok.eos_token_id], ends)
    assert [tok.decode(ids[:p]) for p in positions[1:-1]] == ["55-46=9", "55-46=9, 9+13=22"]
    assert positions[0] == 0 and positions[-1] == len(ids) + 1
    np.testing.assert_array_equal(cv.step_of_token(positions, len(ids) + 1)[[0, 6, 7, 15, 16, len(ids)]],
                                  [0, 0, 1, 1, 2, 2])


def test_token_boundaries_on_qwen3_bpe():
    from test_qwen_tokenizer import qwen_dir

    tok = Tokenizer(qwen_dir())
    text = "Natalia sold 48 clips.\nThen 48 / 2 = 24 more.\nSo 48 + 24 = 72 in all.</think>\n<answer>72</answer>"
    ids = tok.encode(text)
    ends = gsm8k_task.GSM8KTask(parts.load_config(None)).step_ends(text)
    positions = cv.token_boundaries(tok.decode, ids, ends)
    # each boundary's prefix decodes to the text up to that line's end (BPE may merge the newline into the next
    # token; then the boundary falls after that token, the first prefix holding the whole line)
    for end, p in zip(ends, positions):
        assert tok.decode(ids[:p]).startswith(text[:end]) and not tok.decode(ids[:p - 1]).startswith(text[:end])
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    # a boundary inside a multi-character token falls after it
    assert cv.token_boundaries(tok.decode, ids, [1, len(text)]) == [1, len(ids)]


if __name__ == "__main__":
    _rank_worker(sys.argv[1])
