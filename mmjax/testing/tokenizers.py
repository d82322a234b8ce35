"""A tiny real tokenizer, trained in-process, for tests and the demo.

`build_tiny_tokenizer` trains a byte-level BPE (GPT-2 / Qwen style: any text encodes, nothing is
<unk>) on a short built-in English text, so the ids a tiny random model samples decode to word
pieces rather than noise. No network, no files, no transformers: training takes ~10 ms and is
deterministic, so two calls give the same vocabulary.

Two writers turn it into a folder that `mmjax.preprocess.tokenizer.Tokenizer.from_folder` (and HF's
`AutoTokenizer`) read:
- `save_tokenizer_folder` writes tokenizer.json / tokenizer_config.json / chat_template.jinja by
  hand (transformers-free, for the demo);
- `save_hf_tokenizer` goes through `PreTrainedTokenizerFast.save_pretrained` (imports transformers
  lazily; tests use it to produce exactly what HF writes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Original text, written for this file. Image-description vocabulary first, so a tiny VLM's
# samples look like captions.
_CORPUS = """\
A photo of a small red cat sitting on a wooden table next to a window.
The image shows a large dog running across a green field under a blue sky.
There is a white bird standing on the roof of an old house.
Two children are playing with a yellow ball in the park near the river.
The picture contains a black car parked on the side of a quiet street.
A woman is reading a book in a bright room with many plants.
The man holds a cup of coffee and looks at the mountains in the morning.
This is a close view of a flower with orange and purple petals.
In the center of the image there is a bowl of fresh fruit: apples, pears and grapes.
The sun is setting over the sea, and the water looks gold and pink.
A train crosses a long bridge while clouds move slowly above the hills.
The kitchen has a round table, four chairs and a lamp that hangs from the ceiling.
What is in the image? The image shows a cat. What color is the cat? The cat is red.
How many people are in the picture? There are three people in the picture.
Describe the scene in one sentence. A boat floats on a calm lake at night.
The answer is yes. The answer is no. I can see a tree, a road and a small blue house.
Please describe this image in detail. The photo was taken outside on a sunny day.
The left side of the picture is dark, and the right side is light.
A group of friends eat dinner together at a long table in the garden.
The city at night is full of lights, tall buildings and busy streets.
An old clock on the wall shows that it is ten minutes past three.
The snow covers the ground, and a small fox walks between the trees.
She smiles at the camera while her brother waves from the back of the boat.
Numbers like 1, 2, 3, 10 and 100 appear on the sign above the door.
"""

# A Llama-style default: BOS in front of every single sequence (and of each half of a pair).
DEFAULT_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
_BYTE_ALPHABET = 256


def build_tiny_tokenizer(
    vocab_size: int,
    special_tokens: list[str] | tuple[str, ...] = DEFAULT_SPECIAL_TOKENS,
    chat_template: str | None = None,
    *,
    bos: str | None = "<s>",
) -> Tokenizer:
    """Train a byte-level BPE with at most `vocab_size` entries (special tokens included).

    special_tokens get ids 0..len-1 in the order given and are registered as special added tokens
    (never split, dropped by decode(skip_special_tokens=True)). `bos`, when not None, must be one
    of them; a TemplateProcessing post-processor then prepends it like Llama's tokenizer does
    (Qwen-style callers pass bos=None: no BOS). `chat_template` is kept on the returned object as
    `tok.chat_template` for the writers below (tokenizers.Tokenizer has no slot of its own).
    """
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens: duplicates in {special_tokens}")
    if bos is not None and bos not in special_tokens:
        raise ValueError(f"bos={bos!r} is not one of special_tokens={special_tokens}")
    floor = len(special_tokens) + _BYTE_ALPHABET + 1
    if vocab_size < floor:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs {_BYTE_ALPHABET} byte tokens "
            f"+ {len(special_tokens)} special tokens + at least one merge (>= {floor})"
        )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    tok.chat_template = chat_template
    return tok


def save_tokenizer_folder(
    tok: Tokenizer,
    folder: str | os.PathLike,
    *,
    bos: str | None = "<s>",
    eos: str | None = "</s>",
    pad: str | None = None,
    unk: str | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write an HF-style fast-tokenizer folder without transformers (for the demo).

    Writes tokenizer.json, tokenizer_config.json (special tokens by name, add_bos_token reflecting
    the post-processor, clean_up_tokenization_spaces=False) and chat_template.jinja if a template is
    given (argument, else `tok.chat_template`). HF's AutoTokenizer loads the result to the same ids.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    names = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    for key, value in names.items():
        if value is not None and tok.token_to_id(value) is None:
            raise ValueError(f"{key}={value!r} is not in the tokenizer's vocabulary")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        **{k: v for k, v in names.items() if v is not None},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    template = chat_template if chat_template is not None else getattr(tok, "chat_template", None)
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def save_hf_tokenizer(
    tok: Tokenizer,
    folder: str | os.PathLike,
    *,
    bos: str | None = "<s>",
    eos: str | None = "</s>",
    pad: str | None = None,
    unk: str | None = None,
    chat_template: str | None = None,
    extra_special_tokens: list[str] | None = None,
):
    """Save through `transformers.PreTrainedTokenizerFast(...).save_pretrained` (test helper).

    Returns the HF tokenizer object, so tests can compare against it directly. transformers is
    imported here, lazily: it is a test-only dependency.
    """
    from transformers import PreTrainedTokenizerFast

    kwargs = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if extra_special_tokens:
        kwargs["extra_special_tokens"] = list(extra_special_tokens)
    template = chat_template if chat_template is not None else getattr(tok, "chat_template", None)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(str(folder))
    return hf
