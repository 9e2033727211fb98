"""Tokenizer: a thin wrapper around Hugging Face `tokenizers`, plus Qwen's chat format.

Two sources of tokenizers:
  * a Hugging Face checkpoint directory (e.g. Qwen2.5-3B-Instruct): `tokenizer.json` holds the
    byte-level BPE, `tokenizer_config.json` names the eos/pad tokens;
  * `build_char_tokenizer`: a character-level tokenizer for the tiny built-in model, where every
    character is one token and every special tag (`<think>`, `<answer>`, ...) is one token.

Both are loaded the same way, `Tokenizer(path)`, so the rest of the code never knows which it has.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
UNK_TOKEN = "<unk>"
# Qwen's two end markers: `<|im_end|>` closes a chat turn, `<|endoftext|>` closes a document.
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


class TokenizerFileError(ValueError):
    """`tokenizer.json` / `tokenizer_config.json` missing, malformed, or naming unknown tokens."""


def chat_prompt(system: str | None, user: str, assistant_prefix: str = "") -> str:
    """Qwen2.5 chat format (ChatML), ending inside the assistant turn so generation continues it.

    `assistant_prefix` is text the assistant turn is forced to start with (e.g. "<think>").
    """
    system_block = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
    return (
        f"{system_block}<|im_start|>user\n{user}<|im_end|>\n"
        f"<|im_start|>assistant\n{assistant_prefix}"
    )


def _token_content(value: Any) -> str | None:
    """tokenizer_config writes a token either as a string or as an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TypeError(f"expected a string or a dict with 'content', got {value!r}")


class Tokenizer:
    """Text <-> token ids for one checkpoint, with the eos/pad/end ids sampling needs.

    `path` is a checkpoint directory (reads `tokenizer.json` and, where present,
    `tokenizer_config.json`) or a `tokenizer.json` file (its sibling `tokenizer_config.json`
    is read where present).

    Note `vocab_size` counts the tokenizer's tokens (incl. added ones); a checkpoint's embedding
    matrix may be larger (Qwen2.5: 151665 tokens, 151936 embedding rows).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        tokenizer_file = path / TOKENIZER_FILE if path.is_dir() else path
        config_file = tokenizer_file.parent / TOKENIZER_CONFIG_FILE
        if not tokenizer_file.is_file():
            raise TokenizerFileError(
                f"no tokenizer file at {tokenizer_file}. `{TOKENIZER_FILE}` ships with the Hugging "
                f"Face checkpoint, e.g. `hf download Qwen/Qwen2.5-3B-Instruct --local-dir Qwen2.5-3B-Instruct`; "
                f"pass that directory (or the file itself)."
            )
        try:
            self.backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON/schema
            raise TokenizerFileError(f"malformed tokenizer file {tokenizer_file}: {e}") from e
        self.path = tokenizer_file

        config: dict[str, Any] = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
                if not isinstance(config, dict):
                    raise TypeError("top level is not a JSON object")
                eos_cfg = _token_content(config.get("eos_token"))
                pad_cfg = _token_content(config.get("pad_token"))
            except (ValueError, TypeError) as e:
                raise TokenizerFileError(f"malformed {config_file}: {e}") from e
        else:
            eos_cfg = pad_cfg = None

        def resolve(token: str, what: str) -> int:
            token_id = self.backend.token_to_id(token)
            if token_id is None:
                raise TokenizerFileError(
                    f"{what} {token!r} from {config_file} is not in the vocabulary of {tokenizer_file}"
                )
            return token_id

        present = [t for t in (IM_END, ENDOFTEXT) if self.backend.token_to_id(t) is not None]
        if eos_cfg is not None:
            self.eos_token: str = eos_cfg
            self.eos_token_id: int = resolve(eos_cfg, "eos_token")
        elif present:
            self.eos_token = present[0]
            self.eos_token_id = self.backend.token_to_id(present[0])
        else:
            raise TokenizerFileError(
                f"cannot tell the eos token of {tokenizer_file}: no `eos_token` in "
                f"{config_file} and neither {IM_END!r} nor {ENDOFTEXT!r} is in the vocabulary"
            )

        if pad_cfg is not None:
            self.pad_token: str = pad_cfg
            self.pad_token_id: int = resolve(pad_cfg, "pad_token")
        elif ENDOFTEXT in present:
            self.pad_token = ENDOFTEXT
            self.pad_token_id = self.backend.token_to_id(ENDOFTEXT)
        else:
            self.pad_token, self.pad_token_id = self.eos_token, self.eos_token_id

        # A chat model may end with either marker even when the config names only one.
        end_ids = [self.eos_token_id] + [self.backend.token_to_id(t) for t in present]
        self.end_token_ids: list[int] = list(dict.fromkeys(end_ids))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; no BOS/EOS added. Special tokens written in the text map to their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r}, end_token_ids={self.end_token_ids})"
        )


def build_char_tokenizer(alphabet: str, special_tokens: list[str]) -> tokenizers.Tokenizer:
    """Character-level tokenizer: one token per character of `alphabet`, one per special token.

    Ids are stable: `special_tokens` in the given order take ids 0..k-1, then `<unk>` (unless
    already listed), then the characters of `alphabet` in order of first appearance. Characters not
    in the alphabet encode to `<unk>` (one per character). Special tokens are matched inside plain
    text before splitting into characters, so "12<think>3" is 4 tokens: 1, 2, <think>, 3.
    """
    specials = list(dict.fromkeys(special_tokens))
    if UNK_TOKEN not in specials:
        specials.append(UNK_TOKEN)
    vocab: dict[str, int] = {}
    for token in specials:
        vocab[token] = len(vocab)
    for char in alphabet:
        vocab.setdefault(char, len(vocab))

    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # `[\s\S]` rather than `.`: the regex dot does not match "\n".
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse concatenates tokens; the default decoder would join them with spaces.
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def save_char_tokenizer(
    tok: tokenizers.Tokenizer, dir: str | os.PathLike[str], eos_token: str, pad_token: str
) -> Path:
    """Write `tokenizer.json` and a minimal `tokenizer_config.json` so `Tokenizer(dir)` loads it.

    The json is the standard `tokenizers` format, so `transformers.PreTrainedTokenizerFast(
    tokenizer_file=...)` loads it too. Returns the directory.
    """
    for name, token in (("eos_token", eos_token), ("pad_token", pad_token)):
        if tok.token_to_id(token) is None:
            raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": UNK_TOKEN if tok.token_to_id(UNK_TOKEN) is not None else None,
        "clean_up_tokenization_spaces": False,
    }
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
