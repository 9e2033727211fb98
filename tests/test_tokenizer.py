"""Tokenizer wrapper: char tokenizer, chat format, eos/pad resolution, errors, HF parity."""
import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tokenizer import (
    Tokenizer,
    TokenizerFileError,
    build_char_tokenizer,
    chat_prompt,
    save_char_tokenizer,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>"]
ALPHABET = "0123456789+-*/=() \nabcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def char_dir(tmp_path):
    tok = build_char_tokenizer(ALPHABET, SPECIALS)
    return save_char_tokenizer(tok, tmp_path / "tiny", eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_char_ids_are_stable_specials_first():
    tok = build_char_tokenizer(ALPHABET, SPECIALS)
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    assert tok.token_to_id("<unk>") == len(SPECIALS)
    assert tok.token_to_id("0") == len(SPECIALS) + 1
    assert tok.get_vocab_size() == len(SPECIALS) + 1 + len(ALPHABET)


@pytest.mark.parametrize(
    "text",
    ["12 + 3 = 15", "a  b\n\nc ", " leading\nand trailing \n", "<|im_start|>user\n(1+2)*3<|im_end|>\n",
     "<think>7 - 2</think>\n<answer>5</answer>", ""],
)
def test_char_round_trip(char_dir, text):
    tok = Tokenizer(char_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_char_one_token_per_char_and_per_tag(char_dir):
    tok = Tokenizer(char_dir)
    ids = tok.encode("12<think>3")
    assert ids == [tok.token_to_id("1"), tok.token_to_id("2"), tok.token_to_id("<think>"), tok.token_to_id("3")]
    assert len(tok.encode("a b\nc")) == 5
    assert len(tok.encode("<answer>42</answer>")) == 4
    assert tok.decode(tok.encode("<think>1</think>"), skip_special_tokens=True) == "1"


def test_char_unknown_chars_map_to_unk(char_dir):
    tok = Tokenizer(char_dir)
    unk = tok.token_to_id("<unk>")
    assert tok.encode("1€2Z") == [tok.token_to_id("1"), unk, tok.token_to_id("2"), unk]


def test_char_tokenizer_loads_in_transformers(char_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(char_dir / "tokenizer.json"))
    ours = Tokenizer(char_dir)
    text = "<|im_start|>user\n1 + 2<|im_end|>\n<think>3</think>"
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf.decode(ours.encode(text)) == text


def test_chat_prompt_exact():
    assert chat_prompt("sys", "hi", "<think>") == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>"
    )
    assert chat_prompt(None, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_char_dir_eos_pad_end(char_dir):
    tok = Tokenizer(char_dir)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert tok.end_token_ids == [2, 0]
    assert tok.vocab_size == len(SPECIALS) + 1 + len(ALPHABET)
    assert tok.token_to_id("not a token") is None
    assert tok.id_to_token(3) == "<think>" and tok.id_to_token(10**6) is None


def _write_json_only(tmp_path, config=None):
    build_char_tokenizer(ALPHABET, SPECIALS).save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_config_string_form(tmp_path):
    tok = Tokenizer(_write_json_only(tmp_path, {"eos_token": "<|endoftext|>", "pad_token": "<think>"}))
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 3)
    assert tok.end_token_ids == [0, 2]  # eos first, then <|im_end|>


def test_config_dict_form(tmp_path):
    added = {"content": "<|im_end|>", "lstrip": False, "rstrip": False, "special": True}
    tok = Tokenizer(_write_json_only(tmp_path, {"eos_token": added, "pad_token": None}))
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)  # pad null -> <|endoftext|>


def test_defaults_without_config(tmp_path):
    tok = Tokenizer(_write_json_only(tmp_path) / "tokenizer.json")  # a file path works too
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert tok.end_token_ids == [2, 0]


def test_defaults_pad_falls_back_to_eos(tmp_path):
    build_char_tokenizer("ab", ["<|im_end|>"]).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    assert tok.pad_token_id == tok.eos_token_id == 0
    assert tok.end_token_ids == [0]


def test_missing_file_error(tmp_path):
    with pytest.raises(TokenizerFileError, match="tokenizer.json") as exc:
        Tokenizer(tmp_path)
    assert isinstance(exc.value, ValueError)
    assert str(tmp_path) in str(exc.value)
    assert "hf download Qwen/Qwen2.5-3B-Instruct --local-dir Qwen2.5-3B-Instruct" in str(exc.value)


def test_malformed_files_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match="malformed.*tokenizer.json"):
        Tokenizer(tmp_path)
    _write_json_only(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerFileError, match="tokenizer_config.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(TokenizerFileError, match="<nope>"):
        Tokenizer(tmp_path)


def test_no_eos_anywhere_is_an_error(tmp_path):
    build_char_tokenizer("ab", []).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerFileError, match="eos"):
        Tokenizer(tmp_path)


PARITY_TEXTS = [
    "Using the numbers [3, 7, 25], create an equation that equals 46.",
    "<|im_start|>user\nhello  world\n\n<|im_end|>\n<|im_start|>assistant\n<think>",
    "  leading spaces, tabs\tand unicode: héllo wörld — 数学 🙂",
    "<think>25 - 7 = 18</think>\n<answer>(25 - 7) * 3 - 8</answer><|endoftext|>",
]


def test_byte_level_bpe_parity_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["The quick brown fox jumps over the lazy dog.", "1 + 2 = 3, 25 - 7 = 18", *PARITY_TEXTS] * 20
    bpe.train_from_iterator(corpus, trainer=trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))

    ours = Tokenizer(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert ours.eos_token == "<|im_end|>" and ours.end_token_ids == [
        ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>")
    ]
    for text in PARITY_TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        for special in specials:  # each special written in the text is exactly one id
            assert ids.count(ours.token_to_id(special)) == text.count(special)
        assert ours.decode(ids) == hf.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
