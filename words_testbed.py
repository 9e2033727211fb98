"""The words testbed: a tiny Qwen2 with a byte-level BPE vocabulary that writes its Countdown reasoning in words,
with filler drawn from a pool of phrases, so the seeds' filler finding can be asked on a CPU.

The built-in tiny default (tiny_model.py) reads characters and writes bare equations: its only "filler" is a few
deterministic separators, so the finding of the seeds (filler tokens are most of a Qwen completion, less certain
than reasoning tokens, and get more |A x log pi|) has no counterpart there. Here a warm-up trace reads

    Hmm. Take 55 and 46. Let me check. Subtract: 55-46=9. Right. Take 9 and 13. So. Add: 9+13=22. Okay.</think>
    <answer>(55-46)+13</answer>

- the reasoning is two short sentences per solver step: which pair, then which operator and the equation;
- one filler phrase opens the trace and follows each sentence; it is drawn uniformly from the first
  `filler_variety` phrases of FILLER_POOL (connectives, hedges, restatements, interjections: the kinds the seeds
  call filler) by its own random stream, so which phrase appears is independent of the problem and of success.
  Its entropy is log(filler_variety) nats per slot: one knob to sweep;
- the answer is the character testbed's expression, so countdown_task.reward_function scores both alike.

The vocabulary is a byte-level BPE trained with `tokenizers` on these traces, with Qwen2's normalizer,
pre-tokenizer (single digits, a space before a digit its own token) and decoder, and the tiny default's special
tokens kept whole; analyze_credit.classify_tokens therefore types its tokens with the same rules as Qwen's. It is
trained on traces that draw from the whole pool, so a sweep of filler_variety keeps the same vocabulary.
The model is written as an ordinary HF directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) that this repo and `transformers` load.

The task `countdown_words` (registered here; `python train.py --import words_testbed --config ...
data.task=countdown_words`) is Countdown with this model built on first use, words reference completions, and
two declared keys: tiny.bpe_vocab_size and tiny.filler_variety.

CLI: ``python words_testbed.py build --out DIR`` builds the model; ``python words_testbed.py credit --log_path
LOGS --model DIR`` splits a run's credit logs into filler sentences / step sentences / answer tokens exactly.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

import countdown_task as task
from config import Param, TinySettings
from tasks import TASKS
from tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerFileError

# tiny_model's special tokens, kept whole (copied, not imported: tiny_model needs torch, which the task's
# registration here must not; a test checks they agree)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>"]

# Qwen2's pre-tokenizer split (from its tokenizer.json): letters with one leading non-letter, single digits,
# punctuation runs with an optional leading space, newlines, and whitespace.
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Content-free phrases, interleaved by kind so that any prefix of the pool mixes interjections, connectives,
# hedges and restatements. None holds a digit, an operator, '=', a parenthesis or '<', so no pool token is ever
# typed `reasoning` or `structure` by analyze_credit; none starts like a step sentence ("Take").
FILLER_POOL: tuple[str, ...] = (
    "Hmm.", "Okay.", "Let me think.", "We need to reach the target.",
    "So.", "Maybe.", "Wait.", "Each number is used once.",
    "Let me check.", "Now.", "I think so.", "Right.",
    "The goal is the target.", "Next.", "Let me see.", "Alright.",
    "That seems fine.", "Every number must be used.", "Then.", "Good.",
    "Let me try this.", "Probably.", "Well.", "We want an equation.",
    "Hmm, let me think.", "Fine.", "Let me be careful.", "So far so good.",
    "Now the next part.", "Perhaps.", "Interesting.", "The answer needs all numbers.",
    "Let me work it out.", "Okay, next.", "Sure.", "This looks promising.",
    "I should double check.", "Keep going.", "Not sure yet.", "One step at a time.",
    "Let me recall the rules.", "That is one way.", "Moving on.", "Yes.",
    "Of course.", "I will continue.", "Let me reconsider.", "Almost there.",
    "Step by step.", "That makes sense.", "Let me focus.", "It should work.",
    "Anyway.", "The target is what matters.", "Good so far.", "Let me verify.",
    "In other words.", "Actually.", "Careful here.", "This is simple.",
    "Let me write it down.", "Onward.", "Nice.", "Again, all numbers count.",
)
OPERATOR_WORDS = {"+": "Add", "-": "Subtract", "*": "Multiply", "/": "Divide"}
# A solver step: operand, operator, operand, '=', value; an operand is an integer or a parenthesized
# fraction / negative number (countdown_task._fmt).
_STEP = re.compile(r"^(\d+|\([^()]*\))([+\-*/])(\d+|\([^()]*\))=(.+)$")
MIN_TRACES = 64  # fewer warm-up traces cannot stand for the corpus the vocabulary is trained on


class WordsTestbedError(ValueError):
    """A words-testbed setting, corpus or model directory that cannot work; raised before any training."""


class CorpusError(WordsTestbedError, task.DatasetError):
    """The training split is too small to train the vocabulary on (train.py reports it as a data error)."""


class VocabularyError(WordsTestbedError, TokenizerFileError):
    """A tokenizer that does not match its model's vocab_size (train.py reports it as a tokenizer error)."""


@dataclass
class WordsSettings(TinySettings):
    """config.TinySettings (the model's shape and warm-up) with the testbed's two keys, declared by the
    countdown_words task below as tiny.bpe_vocab_size and tiny.filler_variety."""

    bpe_vocab_size: int = 640  # tokens in the BPE vocabulary, special tokens and the 256 bytes included
    filler_variety: int = 32  # filler phrases drawn from uniformly: log(filler_variety) nats per slot; 0 = none


# ----------------------------------------------------------------------------- traces


def check_filler_variety(variety: object) -> int:
    """The number of pool phrases to draw from, or a WordsTestbedError naming `tiny.filler_variety`."""
    if isinstance(variety, bool) or not isinstance(variety, int) or not 0 <= variety <= len(FILLER_POOL):
        raise WordsTestbedError(
            f"tiny.filler_variety={variety!r}: expected an integer from 0 (no filler) to {len(FILLER_POOL)} "
            f"(the phrases in words_testbed.FILLER_POOL drawn from uniformly)")
    return variety


def step_sentences(step: str) -> tuple[str, str]:
    """'55-46=9' -> ('Take 55 and 46.', 'Subtract: 55-46=9.'): the pair, then the operator and the equation."""
    match = _STEP.match(step)
    if match is None:
        raise ValueError(f"not a solver step: {step!r}")
    left, op, right, _ = match.groups()
    return f"Take {left} and {right}.", f"{OPERATOR_WORDS[op]}: {step}."


def trace_parts(solution: task.Solution, filler_variety: int, rng: random.Random) -> list[tuple[str, str]]:
    """The completion as (text, part) pieces, part in {'filler', 'reasoning', 'answer'}: a filler phrase,
    then each step's two sentences, each followed by a filler phrase, then the answer. Filler draws use only `rng`,
    one per slot, so they do not depend on the problem."""
    pool = FILLER_POOL[: check_filler_variety(filler_variety)]
    parts: list[tuple[str, str]] = []

    def add(text: str, part: str) -> None:
        parts.append(((" " if parts else "") + text, part))

    for sentence in [None] + [s for step in solution.steps for s in step_sentences(step)]:
        if sentence is not None:
            add(sentence, "reasoning")
        if pool:
            add(pool[rng.randrange(len(pool))], "filler")
    parts.append((f"</think>\n<answer>{solution.expression}</answer>", "answer"))
    return parts


def words_trace(solution: task.Solution, filler_variety: int, rng: random.Random) -> str:
    """The words completion continuing a prompt that ends in '<think>' (without the end token)."""
    return "".join(text for text, _ in trace_parts(solution, filler_variety, rng))


def words_drawer(problems: Sequence[task.CountdownProblem], settings: WordsSettings, prompt_style: str = "compact",
                 ) -> Callable[[random.Random], tuple[str, str]]:
    """A tiny_model.DrawExample of words traces: (prompt, completion) with the problem and the solution drawn
    from the rng it is given, the filler from a stream of its own (seed + 1)."""
    filler_rng = random.Random(settings.seed + 1)

    def draw(rng: random.Random) -> tuple[str, str]:
        p = problems[rng.randrange(len(problems))]
        solution = task.solve(p.numbers, p.target, rng if settings.varied_traces else None)
        return task.build_prompt(p, prompt_style), words_trace(solution, settings.filler_variety, filler_rng)

    return draw


def corpus(problems: Sequence[task.CountdownProblem], seed: int, prompt_style: str = "compact") -> list[str]:
    """Prompt + words trace of each solvable problem, filler from the whole pool: the BPE's training text,
    the same whatever filler_variety the warm-up uses."""
    rng = random.Random(seed)
    texts = []
    for problem in problems:
        solution = task.solve(problem.numbers, problem.target, rng)
        if solution is not None:
            texts.append(task.build_prompt(problem, prompt_style) + words_trace(solution, len(FILLER_POOL), rng))
    return texts


# ----------------------------------------------------------------------------- vocabulary


def train_bpe(texts: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE of exactly `vocab_size` tokens trained on `texts`, with Qwen2's normalizer,
    pre-tokenizer and decoder, and SPECIAL_TOKENS as single special tokens with ids 0..6."""
    floor = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= floor:
        raise WordsTestbedError(f"tiny.bpe_vocab_size={vocab_size}: must exceed {floor} (the special tokens and "
                                f"the 256 byte tokens) to leave room for merges")
    if len(texts) < MIN_TRACES:
        raise CorpusError(f"the warm-up corpus has {len(texts)} traces, too few to train the vocabulary on "
                                f"(at least {MIN_TRACES}); raise tiny.num_train_problems or give a larger training set")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size(with_added_tokens=True) < vocab_size:
        raise CorpusError(
            f"the warm-up corpus ({len(texts)} traces) supports only {tok.get_vocab_size(with_added_tokens=True)} "
            f"BPE tokens, fewer than tiny.bpe_vocab_size={vocab_size}: lower tiny.bpe_vocab_size or raise "
            f"tiny.num_train_problems")
    return tok


def check_vocab(model_dir: str | Path) -> int:
    """The vocabulary size shared by `model_dir`'s config.json and tokenizer.json; a WordsTestbedError when
    they differ (a token id past the embedding would index out of range, and rows no token reaches would
    still take probability mass)."""
    model_dir = Path(model_dir)
    config_file, tokenizer_file = model_dir / "config.json", model_dir / TOKENIZER_FILE
    for file in (config_file, tokenizer_file):
        if not file.is_file():
            raise VocabularyError(f"{file} not found: {model_dir} is not a words testbed model directory")
    model_vocab = json.loads(config_file.read_text())["vocab_size"]
    tokenizer_vocab = Tokenizer(model_dir).vocab_size
    if model_vocab != tokenizer_vocab:
        raise VocabularyError(f"{tokenizer_file} has {tokenizer_vocab} tokens but {config_file} says "
                                f"vocab_size={model_vocab}: the tokenizer does not belong to this model")
    return model_vocab


# ----------------------------------------------------------------------------- model


def check_settings(settings: WordsSettings) -> None:
    """Every bad knob as one WordsTestbedError naming its `tiny.` key, before anything is built."""
    check_filler_variety(settings.filler_variety)
    for name in ("warmup_steps", "warmup_batch_size", "num_train_problems", "hidden_size", "num_hidden_layers"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise WordsTestbedError(f"tiny.{name}={value!r}: expected a positive integer")
    if settings.hidden_size % settings.num_attention_heads:
        raise WordsTestbedError(f"tiny.hidden_size={settings.hidden_size} is not a multiple of "
                                f"tiny.num_attention_heads={settings.num_attention_heads}")


def build_words_model(settings: WordsSettings, out_dir: str | Path, train_set: Sequence[task.CountdownProblem],
                      prompt_style: str = "compact") -> Path:
    """Train the vocabulary on the training split's prompts and traces, warm the model up on words traces of
    it (the eval problems stay unseen), and write the model directory atomically. Deterministic for
    `settings.seed` on a given machine and thread count."""
    import tiny_model  # needs torch: imported only to build

    check_settings(settings)
    t_start = time.perf_counter()
    problems = [p for p in train_set[: settings.num_train_problems] if task.solve(p.numbers, p.target) is not None]
    backend = train_bpe(corpus(problems, settings.seed, prompt_style), settings.bpe_vocab_size)
    # completion lengths of a sample of warm-up traces, to size training.max_new_tokens by
    sample = words_drawer(problems, settings, prompt_style)
    rng = random.Random(settings.seed + 2)
    lengths = [len(backend.encode(sample(rng)[1], add_special_tokens=False).ids) + 1 for _ in range(2000)]
    record = {"testbed": "words", "bpe_vocab_size": settings.bpe_vocab_size,
              "filler_variety": settings.filler_variety, "prompt_style": prompt_style,
              "completion_tokens": {"mean": sum(lengths) / len(lengths), "max": max(lengths)},
              "bpe_seconds": time.perf_counter() - t_start}
    print(f"[words] vocabulary of {settings.bpe_vocab_size} tokens trained; completions of "
          f"{record['completion_tokens']['mean']:.1f} tokens on average (at most {max(lengths)}), "
          f"filler variety {settings.filler_variety}")
    tiny_model.build_tiny_model(settings, out_dir, words_drawer(problems, settings, prompt_style), len(problems),
                                backend=backend, record=record)
    check_vocab(out_dir)
    return Path(out_dir)


def _is_filler_variety(value: object) -> bool:
    try:
        check_filler_variety(value)
    except WordsTestbedError:
        return False
    return True


@TASKS.register("countdown_words", params={
    **TASKS.params("countdown"),
    "bpe_vocab_size": Param(640, "tokens in the words testbed's BPE vocabulary (the 7 special tokens and 256 bytes "
                            "included)", "an integer > 263", lambda v: v > 263, int, section="tiny"),
    "filler_variety": Param(32, "filler phrases the words testbed draws from uniformly (log of it: the filler's "
                            "entropy in nats per slot)", f"an integer from 0 to {len(FILLER_POOL)}",
                            _is_filler_variety, int, section="tiny"),
})
class CountdownWordsTask(task.CountdownTask):
    """Countdown on the words testbed: the same problems, prompts and reward as `countdown`; the built-in model
    (model.build_tiny) is the words testbed's, and reference completions are words traces."""

    def reference_completion(self, problem: task.CountdownProblem) -> str | None:
        solution = task.solve(problem.numbers, problem.target)
        if solution is None:
            return None
        # the filler is seeded by the problem so a resumed run injects the same text (string seeds hash stably)
        rng = random.Random(f"{self.config.tiny.seed}:{problem.numbers}:{problem.target}")
        return words_trace(solution, self.config.tiny.filler_variety, rng)

    def build_model(self, path: Path, train_set: Sequence[Any]) -> None:
        build_words_model(self.config.tiny, path, train_set, self.config.data.prompt_style)

    def model_path(self, train_set: Sequence[Any]) -> Path:
        path = super().model_path(train_set)
        check_vocab(path)  # a tokenizer that is not the model's: an error before training starts
        return path


# ----------------------------------------------------------------------------- exact token parts

PARTS = ("filler", "reasoning", "answer", "special")
_SENTENCE = re.compile(r" ?[^ .!?][^.!?]*[.!?]")


def label_completion(pieces: Sequence[str], special: Sequence[bool]) -> list[str]:
    """The part of each token of one completion, from the tokens' texts: 'special' for the tokenizer's special
    tokens, 'filler' for every token of a sentence of <think> without a digit (its leading space included),
    'reasoning' for the other tokens of <think>, 'answer' for the rest. Every step sentence holds a digit and no
    pool phrase does, so on warm-up traces this is exactly the pool's tokens (the test compares); on samples it
    also counts the model's own blends of pool phrases ("Let me think so good.") as filler."""
    ends = [0]
    for piece in pieces:
        ends.append(ends[-1] + len(piece))
    text = "".join(pieces)
    think_end = next((ends[i] for i, (p, s) in enumerate(zip(pieces, special)) if s and p == "</think>"), len(text))
    filler_chars = bytearray(len(text))
    for match in _SENTENCE.finditer(text, 0, think_end):
        if not any(c.isdigit() for c in match.group()):
            filler_chars[match.start(): match.end()] = b"\x01" * (match.end() - match.start())
    labels = []
    for i, (piece, is_special) in enumerate(zip(pieces, special)):
        if is_special:
            labels.append("special")
        elif ends[i] >= think_end:
            labels.append("answer")
        else:
            labels.append("filler" if any(filler_chars[ends[i]: ends[i + 1]]) else "reasoning")
    return labels


def credit_parts(df, tokenizer: tokenizers.Tokenizer):
    """The part (PARTS) of each row of a credit log, episode by episode in position order."""
    import pandas as pd  # only the offline analysis needs pandas

    added = set(tokenizer.get_added_tokens_decoder())
    labels = pd.Series("", index=df.index, dtype=object)
    for _, episode in df.sort_values("position").groupby(["step", "episode_idx"], sort=False):
        ids = episode["token_id"].tolist()
        pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        labels.loc[episode.index] = label_completion(pieces, [i in added for i in ids])
    return labels


def parts_table(df, parts) -> "pd.DataFrame":
    """Per part: token count and share, mean log pi, mean |A x log pi| (the seeds' measure)."""
    table = df.assign(part=parts.to_numpy(), abs_contribution=df["contribution"].abs()).groupby("part").agg(
        count=("log_prob", "size"), mean_log_prob=("log_prob", "mean"),
        mean_abs_contribution=("abs_contribution", "mean")).reindex(list(PARTS))
    table.insert(1, "percent", 100.0 * table["count"] / len(df))
    return table


# ----------------------------------------------------------------------------- CLI


def _training_split(args: argparse.Namespace) -> list[task.CountdownProblem]:
    """The tiny default's training split: config_tiny.yaml's generated data (20000 3-number problems, seed 0)
    less its last `test_size` rows, or the training split of `--data`."""
    if args.data:
        problems = task.load_countdown_dataset(args.data)
    else:
        problems = task.generate_problems(args.generate, num_numbers=(3,), seed=0)
    return task.split_dataset(problems, args.test_size)[0]


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _cmd_build(args: argparse.Namespace) -> None:
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    settings = WordsSettings(**{f.name: getattr(args, f.name) for f in fields(WordsSettings)})
    check_settings(settings)  # before the data is generated
    build_words_model(settings, args.out, _training_split(args), args.prompt_style)


def _cmd_credit(args: argparse.Namespace) -> None:
    import analyze_credit  # the offline analysis: its loader and Qwen's token-type rules

    df = analyze_credit.load_credit_logs(args.log_path)
    df = df[(df["step"] >= args.first_step) & (df["step"] <= (args.last_step or df["step"].max()))]
    tokenizer = analyze_credit.load_tokenizer(args.model)
    types = analyze_credit.token_types_table(df, analyze_credit.classify_tokens(df, tokenizer)).set_index("type")
    parts = parts_table(df, credit_parts(df, tokenizer))
    print(f"{len(df)} completion tokens, {df.groupby(['step', 'episode_idx']).ngroups} episodes, steps "
          f"{df['step'].min()}-{df['step'].max()}")
    print("analyze_credit.classify_tokens types (Qwen's rules):")
    print(types[["count", "percent", "mean_log_prob", "mean_abs_contribution"]].to_string(float_format="%.3f"))
    print("exact parts (filler: digit-free sentences of <think>, i.e. the pool's; reasoning: the step sentences):")
    print(parts.to_string(float_format="%.3f"))
    for name, table, a, b in (("classify", types, "filler", "reasoning"), ("exact", parts, "filler", "reasoning")):
        ratio = table.loc[a, "mean_abs_contribution"] / table.loc[b, "mean_abs_contribution"]
        print(f"{name}: filler / reasoning mean |A x log pi| = {ratio:.3f}")
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        types.to_csv(out / "classify_types.csv")
        parts.to_csv(out / "exact_parts.csv")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="words_testbed.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the words testbed model directory",
                           description="Train the BPE vocabulary, warm the model up on words traces, write OUT.")
    build.add_argument("--out", required=True, help="model directory to write (replaced if present)")
    build.add_argument("--data", help="a Countdown dataset (default: config_tiny.yaml's generated problems)")
    build.add_argument("--generate", type=int, default=20000, help="problems to generate without --data (20000)")
    build.add_argument("--test_size", type=int, default=256, help="last rows held out, as data.test_size (256)")
    build.add_argument("--prompt_style", default="compact", choices=task.PROMPT_STYLES, help="data.prompt_style")
    build.add_argument("--num_threads", type=int, default=0, help="torch threads (0: torch's default)")
    for f in fields(WordsSettings):
        kind = _parse_bool if isinstance(f.default, bool) else type(f.default)
        build.add_argument(f"--{f.name}", type=kind, default=f.default, help=f"tiny.{f.name} ({f.default})")
    build.set_defaults(func=_cmd_build)
    credit = sub.add_parser("credit", help="credit by part: filler sentences, step sentences, answer",
                            description="Split a run's credit logs into exact parts beside analyze_credit's types.")
    credit.add_argument("--log_path", required=True, help="a credit log file or a run's credit directory")
    credit.add_argument("--model", required=True, help="the words testbed model directory (its tokenizer.json)")
    credit.add_argument("--first_step", type=int, default=0, help="first step to include (0)")
    credit.add_argument("--last_step", type=int, default=0, help="last step to include (0: all)")
    credit.add_argument("--output_dir", help="write classify_types.csv and exact_parts.csv here")
    credit.set_defaults(func=_cmd_credit)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (WordsTestbedError, task.DatasetError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
