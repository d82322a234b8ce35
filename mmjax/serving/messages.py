"""OpenAI chat messages -> (images, prompt) for ServingEngine.make_request(..., chat_template=False).

The checkpoint's chat template renders the messages with each image_url part as HF's
{"type": "image"}, exactly as the processor renders a single-turn prompt (same template, same
bos/eos variables), so a one-message chat request tokenizes to what mmjax.generate(images,
"<image> text") does. What the template writes for an image (LLaVA: "<image>", Qwen2-VL:
"<|vision_start|><|image_pad|><|vision_end|>", i.e. the processor's image_text) is turned back
into the "<image>" placeholder the processor expands, and the count is checked.

Without a chat template the messages' contents are joined by newlines, images as "<image>" where
they stand (roles are not written): the processor's plain-prompt path."""
from __future__ import annotations

from mmjax.errors import InputError
from mmjax.preprocess.chat import render_chat_template
from mmjax.preprocess.processor import IMAGE_PLACEHOLDER
from mmjax.serving.media import MediaLimits, load_image

__all__ = ["ROLES", "chat_prompt"]

ROLES = ("system", "user", "assistant")  # OpenAI's "developer" is read as "system"


def template_messages(messages) -> tuple[list[dict], list[tuple[str, str]]]:
    """(HF-style messages, [(image url, its field name)]) from protocol.ChatMessage objects."""
    out, urls = [], []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ROLES:
            raise InputError(f"messages[{i}].role: unknown role {m.role!r} (served: {', '.join(ROLES)}, developer)")
        content = m.content
        if content is None:
            if role != "assistant":
                raise InputError(f"messages[{i}].content: a {role} message needs content")
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if part.type == "text":
                    if part.text is None:
                        raise InputError(f"{where}.text: a text part needs text")
                    parts.append({"type": "text", "text": part.text})
                elif part.type == "image_url":
                    url = part.image_url if isinstance(part.image_url, str) else \
                        part.image_url.url if part.image_url is not None else None
                    if not url:
                        raise InputError(f"{where}.image_url: an image_url part needs a url")
                    urls.append((url, f"{where}.image_url"))
                    parts.append({"type": "image"})
                else:
                    raise InputError(f"{where}.type: {part.type!r} parts are not served (text, image_url)")
            content = parts
        out.append({"role": role, "content": content, **({"name": m.name} if m.name else {})})
    return out, urls


def _plain_prompt(messages: list[dict]) -> str:
    texts = []
    for m in messages:
        c = m["content"]
        texts.append(c if isinstance(c, str) else
                     "".join(IMAGE_PLACEHOLDER + "\n" if p["type"] == "image" else p["text"] for p in c))
    return "\n".join(texts)


def chat_prompt(processor, messages, media: MediaLimits) -> tuple[list, str]:
    """(PIL images in order, prompt with one "<image>" per image). InputError (MediaError for the
    images, with its HTTP status) names the message field."""
    if processor is None:
        raise InputError("messages: this checkpoint has no tokenizer/processor; chat is not served")
    hf_messages, urls = template_messages(messages)
    images = [load_image(url, media, field) for url, field in urls]
    if processor.chat_template is None:
        prompt = _plain_prompt(hf_messages)
    else:
        tok = processor.tokenizer
        text = render_chat_template(processor.chat_template, hf_messages, add_generation_prompt=True,
                                    bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        prompt = text.replace(processor.image_text, IMAGE_PLACEHOLDER)
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found != len(images):
        raise InputError(f"messages: the prompt holds {found} image placeholder(s) {IMAGE_PLACEHOLDER!r} for "
                         f"{len(images)} image_url part(s) (a text part must not contain {IMAGE_PLACEHOLDER!r})")
    return images, prompt
