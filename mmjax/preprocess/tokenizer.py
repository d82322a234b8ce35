"""Text tokenization from an HF fast-tokenizer folder, without transformers.

`Tokenizer.from_folder` reads tokenizer.json with the `tokenizers` library and applies what
transformers 5.24's TokenizersBackend adds on top when it loads the same folder, so ids and
decoded text equal `AutoTokenizer.from_pretrained(folder)`'s:
- named special tokens (bos/eos/unk/sep/pad/cls/mask, from tokenizer_config.json, or the legacy
  special_tokens_map.json when the config has no added_tokens_decoder), model-specific ones
  (any other "*_token" string key, e.g. image_token) and extra_special_tokens /
  additional_special_tokens are registered as special added tokens if tokenizer.json lacks them
  (never split, removed by skip_special_tokens);
- add_bos_token / add_eos_token in tokenizer_config.json are IGNORED when tokenizer.json exists
  (HF pops them too): the post-processor in tokenizer.json decides what encode() adds;
- truncation and padding stored in tokenizer.json are switched off (HF's __call__ default);
- split_special_tokens=True makes special tokens encode as plain text;
- decode applies clean_up_tokenization_spaces only for non-BPE models (HF skips it for BPE).

Folders whose tokenizer_config.json names a model-specific class (LlamaTokenizer,
Qwen2Tokenizer, ...) are read the same way; transformers 5 rebuilds some of those pipelines from
the vocabulary, which can differ from tokenizer.json for unusual checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken

from mmjax.errors import InputError, LoadError
from mmjax.jsonfile import read_json
from mmjax.preprocess.chat import find_chat_template, render_chat_template

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


def _token_content(value: Any, where: str) -> str | None:
    """A special-token entry is a string or a serialized AddedToken {"content": ..., ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise LoadError(f"{where}: expected a token string or {{'content': ...}}, got {value!r}")


def _as_added_token(value: Any, special: bool) -> AddedToken:
    if isinstance(value, dict):
        flags = {k: bool(value[k]) for k in _ADDED_TOKEN_FLAGS if k in value}
        return AddedToken(value["content"], special=special, **flags)
    return AddedToken(value, special=special, normalized=False)


# What a folder holds when it ships a tokenizer (a model with its own tokenization holds none of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt")


def generation_eos_ids(folder: str | os.PathLike) -> list[int]:
    """eos_token_id of the folder's generation_config.json (an int or a list), [] without one."""
    folder = Path(folder)
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    value = read_json(path).get("eos_token_id")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise LoadError(f"{path}: eos_token_id must be an int or a list of ints, got {value!r}")
    return values


class Tokenizer:
    """encode / decode / special tokens / chat template of one checkpoint folder."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str] | None = None,
        extra_special_tokens: Sequence[str] = (),
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ):
        self.backend = backend
        self.special_tokens_map: dict[str, str] = dict(special_tokens or {})
        self.extra_special_tokens: tuple[str, ...] = tuple(extra_special_tokens)
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        ids = list(eos_token_ids)
        if (eos := self.eos_token_id) is not None:
            ids.append(eos)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))  # ordered, deduplicated

    @classmethod
    def from_folder_if_any(cls, folder: str | os.PathLike) -> Tokenizer | None:
        """The folder's tokenizer, or None when it has no tokenizer files at all (a model that
        tokenizes by its own code: its prompts are token ids). A partial set (say tokenizer.model
        without tokenizer.json) is still an error, as in from_folder."""
        if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
            return None
        return cls.from_folder(folder)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise LoadError(f"{folder}: no tokenizer.json (only HF fast-tokenizer folders are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser raises plain Exception subclasses
            raise LoadError(f"{path}: cannot parse ({type(e).__name__}: {e})") from e
        backend.no_truncation()
        backend.no_padding()

        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        legacy_path = folder / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and legacy_path.is_file():
            config = {**config, **read_json(legacy_path)}  # HF lets the legacy map override

        # Tokens the config lists with explicit ids/flags but tokenizer.json lacks.
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise LoadError(f"{config_path}: added_tokens_decoder must be an object")
        present = {str(t.content) for t in backend.get_added_tokens_decoder().values()}
        for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = _token_content(entry, f"{config_path}: added_tokens_decoder")
            if content not in present:
                special = bool(entry.get("special", False)) if isinstance(entry, dict) else False
                backend.add_tokens([_as_added_token(entry, special)])

        # Registration order decides the ids of tokens new to the vocabulary, so follow HF's:
        # the standard names, then model-specific "*_token" keys (image_token, ...) in config
        # order, then named extras, then the extra_special_tokens list.
        entries = [(k, config[k]) for k in SPECIAL_TOKEN_NAMES if config.get(k) is not None]
        entries += [
            (k, v) for k, v in config.items() if k.endswith("_token") and k not in SPECIAL_TOKEN_NAMES and isinstance(v, str)
        ]
        extras = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        if isinstance(extras, dict):  # named extras, e.g. {"image_token": "<image>"}
            entries += list(extras.items())
            extras = []
        if not isinstance(extras, list):
            raise LoadError(f"{config_path}: extra_special_tokens must be a list or an object")
        named = {k: _token_content(v, f"{config_path}: {k}") for k, v in entries}
        extra_contents = [_token_content(v, f"{config_path}: extra_special_tokens") for v in extras]
        to_register = [_as_added_token(v, special=True) for _, v in entries]
        to_register += [_as_added_token(v, special=True) for v in extras]
        # `tokenizers` skips tokens already added (same content), keeping their flags, as in HF.
        if to_register:
            backend.add_special_tokens(to_register)
        if config.get("split_special_tokens"):
            backend.encode_special_tokens = True

        return cls(
            backend,
            special_tokens=named,
            extra_special_tokens=extra_contents,
            eos_token_ids=generation_eos_ids(folder),
            chat_template=find_chat_template(folder),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False))
            and (
                type(backend.model).__name__ != "BPE"
                or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
            ),
        )

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _special(self, name: str) -> str | None:
        return self.special_tokens_map.get(name)

    @property
    def bos_token(self) -> str | None:
        return self._special("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special("unk_token")

    def _id_of(self, name: str) -> int | None:
        token = self._special(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of("pad_token")

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str | bytes, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; bytes must be UTF-8. add_special_tokens runs the post-processor
        (e.g. a leading BOS for Llama-style tokenizers)."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(
                    f"prompt: not valid UTF-8 (byte {bytes(text)[e.start:e.start + 1]!r} at offset {e.start})"
                ) from e
        if not isinstance(text, str):
            raise InputError(f"prompt: expected str or UTF-8 bytes, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. from os.fsdecode of bad bytes
            raise InputError(f"prompt: contains a character that is not valid Unicode at index {e.start}") from e
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (like HF's decode; ids beyond the vocabulary are dropped by tokenizers)."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        ids = list(ids)
        for i, t in enumerate(ids):
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) or t < 0:
                raise InputError(f"token ids[{i}] = {t!r}: expected a non-negative int")
        text = self.backend.decode([int(t) for t in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            text = _clean_up_tokenization(text)
        return text

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **template_vars) -> str:
        """Render this folder's chat template with the special tokens available to it, as HF does."""
        if self.chat_template is None:
            raise InputError("this checkpoint has no chat template; pass raw text instead")
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt, **{**self.special_tokens_map, **template_vars}
        )


def _clean_up_tokenization(text: str) -> str:
    # HF's clean_up_tokenization (WordPiece-era spacing fixes), in the same order.
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text
