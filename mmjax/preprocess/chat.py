"""Chat templates: find them in a checkpoint folder and render them the way transformers 5.24 does.

The Jinja environment matches HF's `_compile_jinja_template`: an ImmutableSandboxedEnvironment
(templates from the Hub are untrusted code) with trim_blocks and lstrip_blocks, the loopcontrols
extension, a `{% generation %}...{% endgeneration %}` block (HF uses it to mark assistant tokens;
here it just renders its body), a `tojson` filter that does not HTML-escape, and the globals
raise_exception, strftime_now, dict and a namespace that refuses underscore-prefixed names.
What the template sees is rebuilt from plain JSON types first (anything else becomes a
"<TypeName>" placeholder) and keys whose value is None are dropped, as HF does.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mmjax.errors import InputError, LoadError
from mmjax.jsonfile import read_json

IMAGE_MARKER = "<image>"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}` renders body (HF tracks its offsets; we don't)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore-prefixed attributes (no reaching into internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 -- same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template: namespace attribute {name!r} starts with '_'")


class _DictBuilder:
    """`dict(...)` in templates without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes <, >, &, ' -- wrong for prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile (cached) with HF's environment settings. Bad syntax -> LoadError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictBuilder(), namespace=_Namespace
    )
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LoadError(f"chat template: syntax error on line {e.lineno}: {e.message}") from e


def _plain(value: Any) -> Any:
    """Rebuild from JSON types only; other objects (images, arrays) become '<TypeName>'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must stay falsy
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages: expected a list of dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"messages[{i}]: expected a dict with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:  # HF fills both names templates read
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(_plain(message))
    return out


def render_chat_template(
    template: str, messages: list[dict], add_generation_prompt: bool = True, **template_vars: Any
) -> str:
    """Render `template` over `messages` like HF's processor.apply_chat_template(tokenize=False).

    template_vars are what HF passes besides messages: the tokenizer's special tokens
    (bos_token="<s>", eos_token=..., see Tokenizer.special_tokens_map) and any template switch
    (e.g. add_vision_id=True). `tools` and `documents` default to None, as in HF.
    A template's raise_exception(...) or a rendering error -> InputError.
    """
    compiled = compile_chat_template(template)
    kwargs = {"tools": None, "documents": None, **_plain(template_vars)}
    try:
        return compiled.render(messages=_prepare_messages(messages), add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.exceptions.SecurityError as e:
        raise InputError(f"chat template: unsafe operation refused by the sandbox: {e}") from e
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"chat template: {e}") from e


def _template_from(value: Any, source: Path) -> str | None:
    """A chat_template entry: a string, or HF's list/dict of named templates ("default" wins)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named
    if isinstance(value, dict):
        if "default" in value and isinstance(value["default"], str):
            return value["default"]
        return None
    raise LoadError(f"{source}: chat_template has unexpected type {type(value).__name__}")


def find_chat_template(folder: str | os.PathLike) -> str | None:
    """The chat template a transformers 5.24 processor loaded from `folder` would use, or None.

    Precedence is HF's processor loading order: processor_config.json["chat_template"] (old
    processors saved it there), then chat_template.json (legacy {"chat_template": ...}), then
    chat_template.jinja (what transformers 5 writes), then tokenizer_config.json["chat_template"]
    (string, or a list of {"name", "template"}, of which "default" is taken).
    """
    folder = Path(folder)
    processor_config = folder / "processor_config.json"
    if processor_config.is_file():
        data = read_json(processor_config, want_object=False)
        if isinstance(data, dict) and (t := _template_from(data.get("chat_template"), processor_config)):
            return t
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        data = read_json(legacy, want_object=False)
        if isinstance(data, dict) and (t := _template_from(data.get("chat_template"), legacy)):
            return t
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LoadError(f"{jinja_file}: cannot read ({e})") from e
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        data = read_json(tokenizer_config, want_object=False)
        if isinstance(data, dict):
            return _template_from(data.get("chat_template"), tokenizer_config)
    return None


def prompt_to_messages(prompt: str, num_images: int | None = None, marker: str = IMAGE_MARKER) -> list[dict]:
    """A plain user prompt -> one user message with image and text content parts.

    Each `marker` ("<image>") in the prompt becomes {"type": "image"} at that position; the text
    between markers becomes {"type": "text", "text": ...}, stripped of surrounding whitespace (the
    templates add their own separators), empty pieces dropped. Without markers the message holds
    `num_images` images first, then the text -- the layout HF's LLaVA template renders anyway.
    With markers, num_images (if given) must equal their count.
    """
    if not isinstance(prompt, str):
        raise InputError(f"prompt: expected a string, got {type(prompt).__name__}")
    count = prompt.count(marker)
    if num_images is not None and num_images < 0:
        raise InputError(f"num_images={num_images} must be >= 0")
    if count and num_images is not None and num_images != count:
        raise InputError(f"prompt has {count} {marker} marker(s) but {num_images} image(s) were given")
    content: list[dict] = []
    if count == 0:
        content += [{"type": "image"} for _ in range(num_images or 0)]
        if prompt.strip():
            content.append({"type": "text", "text": prompt.strip()})
    else:
        for i, piece in enumerate(prompt.split(marker)):
            if i:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
    return [{"role": "user", "content": content}]
