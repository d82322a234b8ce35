"""Tokenizer and chat-template parity against transformers 5.24 (test-only dependency):
token ids, decoded text and rendered chat strings must be equal."""

import json
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from mmjax.errors import InputError, LoadError
from mmjax.preprocess.chat import find_chat_template, prompt_to_messages, render_chat_template
from mmjax.preprocess.tokenizer import Tokenizer
from mmjax.testing.tokenizers import build_tiny_tokenizer, save_hf_tokenizer, save_tokenizer_folder
from transformers import AutoProcessor, AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>",
                 "<|vision_end|>", "<|video_pad|>"]  # fmt: skip

# The template llava-hf/llava-1.5-7b-hf ships (chat_template.json), verbatim.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# The template Qwen/Qwen2-VL-*-Instruct ships, verbatim.
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
    "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

warnings.filterwarnings("ignore", module="transformers")


# ----------------------------------------------------------------------------- tokenizer


TEXTS = [
    "A photo of a cat.", "<image>\nWhat is in the image?", "  leading and trailing  ", "héllo 日本 🙂", "",
    "<s>hi</s><pad> x", "USER: <image>\nDescribe ASSISTANT:", "don't . , ? ! 're", "a <img> b <mask> c x<mask>y",
    "<|im_start|>user\nhi<|im_end|><|vision_start|><|image_pad|><|vision_end|>",
]  # fmt: skip


def _assert_same_as_hf(folder):
    hf, ours = AutoTokenizer.from_pretrained(folder), Tokenizer.from_folder(folder)
    for text in TEXTS:
        for add in (True, False):
            ids = hf(text, add_special_tokens=add)["input_ids"]
            assert ours.encode(text, add_special_tokens=add) == ids, (folder, text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.special_tokens_map == hf.special_tokens_map
    assert ours.vocab_size == len(hf)
    return hf, ours


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    tok = build_tiny_tokenizer(600, LLAVA_SPECIALS)
    hf = save_hf_tokenizer(tok, folder, unk="<unk>", pad="<pad>", extra_special_tokens=["<image>"])
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(), tokenizer=hf, chat_template=LLAVA_TEMPLATE, patch_size=14
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    tok = build_tiny_tokenizer(600, QWEN_SPECIALS, bos=None)
    save_hf_tokenizer(tok, folder, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                      extra_special_tokens=QWEN_SPECIALS[1:], chat_template=QWEN2VL_TEMPLATE)  # fmt: skip
    return folder


def test_tokenizer_matches_hf_llava_and_qwen(llava_folder, qwen_folder, tmp_path):
    hf, ours = _assert_same_as_hf(llava_folder)
    assert ours.encode("hi")[0] == ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_ids == (hf.eos_token_id,) and ours.pad_token_id == hf.pad_token_id
    hf, ours = _assert_same_as_hf(qwen_folder)
    assert ours.bos_token_id is None and ours.encode("hi") == hf("hi")["input_ids"]
    assert ours.token_to_id("<|image_pad|>") == hf.convert_tokens_to_ids("<|image_pad|>")
    # the transformers-free writer produces a folder HF reads the same way
    save_tokenizer_folder(build_tiny_tokenizer(600, LLAVA_SPECIALS), tmp_path / "plain", pad="<pad>")
    _assert_same_as_hf(tmp_path / "plain")


def test_tokenizer_config_variants_match_hf(llava_folder, tmp_path):
    folder = tmp_path / "variant"
    shutil.copytree(llava_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(
        add_bos_token=False,  # ignored by HF when tokenizer.json exists; must be by us too
        add_eos_token=True,
        clean_up_tokenization_spaces=True,  # ignored for BPE
        image_token="<img>",  # model-specific special token not in tokenizer.json
        mask_token={"__type": "AddedToken", "content": "<mask>", "lstrip": True, "rstrip": False,
                    "normalized": False, "single_word": False, "special": True},  # fmt: skip
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    _, ours = _assert_same_as_hf(folder)
    assert ours.special_tokens_map["image_token"] == "<img>"
    config["split_special_tokens"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    _assert_same_as_hf(folder)


def test_tokenizer_wordpiece_cleanup_matches_hf(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    raw = RawTokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.decoder = decoders.WordPiece()
    text = ["Don't stop. Is it here? Yes, it is! They're fine, we've seen it."] * 4
    raw.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", sep_token="[SEP]",
                                 clean_up_tokenization_spaces=True)  # fmt: skip
    hf.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_folder(tmp_path)
    ids = hf(text[0])["input_ids"]
    assert ours.encode(text[0]) == ids
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert "don't stop." in ours.decode(ids)  # the cleanup really ran (WordPiece would give "don ' t stop .")


def test_tokenizer_eos_ids_and_input_errors(llava_folder, tmp_path):
    folder = tmp_path / "gen"
    shutil.copytree(llava_folder, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    ours = Tokenizer.from_folder(folder)
    assert ours.eos_token_ids == (7, 2)  # generation config first, tokenizer eos (2) deduplicated
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert Tokenizer.from_folder(folder).eos_token_ids == (9, 2)
    assert ours.encode("héllo".encode()) == ours.encode("héllo")
    with pytest.raises(InputError, match=r"not valid UTF-8 \(byte b'\\xff' at offset 2\)"):
        ours.encode(b"ab\xffcd")
    with pytest.raises(InputError, match="not valid Unicode at index 1"):
        ours.encode("a\udcffb")
    with pytest.raises(InputError, match="expected str or UTF-8 bytes"):
        ours.encode(42)
    with pytest.raises(InputError, match=r"ids\[1\] = -3"):
        ours.decode([5, -3])
    assert ours.decode(np.array([37, 438], dtype=np.int64)) == ours.decode([37, 438])
    with pytest.raises(LoadError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_tiny_tokenizer_is_real_and_deterministic():
    a = build_tiny_tokenizer(500, LLAVA_SPECIALS)
    assert a.to_str() == build_tiny_tokenizer(500, LLAVA_SPECIALS).to_str()
    assert a.get_vocab_size() <= 500
    assert [a.token_to_id(t) for t in LLAVA_SPECIALS] == list(range(len(LLAVA_SPECIALS)))
    sentence = "The image shows a small red cat sitting on a table."
    ids = a.encode(sentence).ids
    assert ids[0] == a.token_to_id("<s>") and len(ids) < len(sentence) / 2  # merges learned words
    assert a.decode(ids) == sentence
    assert a.encode("x <image> y").ids.count(a.token_to_id("<image>")) == 1
    q = build_tiny_tokenizer(500, QWEN_SPECIALS, bos=None)
    assert q.encode("hi").ids == q.encode("hi", add_special_tokens=False).ids
    with pytest.raises(ValueError, match="bos='<s>' is not one of"):
        build_tiny_tokenizer(500, QWEN_SPECIALS)
    with pytest.raises(ValueError, match="too small"):
        build_tiny_tokenizer(100, LLAVA_SPECIALS)


# ----------------------------------------------------------------------------- chat templates


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
    [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first is red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the second?"}]},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "No image here, <b>&'quotes'"}]}],
]


def test_chat_llava_template_matches_hf_processor(llava_folder):
    processor = AutoProcessor.from_pretrained(llava_folder)
    template = find_chat_template(llava_folder)
    assert template == processor.chat_template == LLAVA_TEMPLATE
    tok = Tokenizer.from_folder(llava_folder)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert render_chat_template(template, messages, gen, **tok.special_tokens_map) == want
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == want


def test_chat_qwen2vl_template_matches_hf(qwen_folder):
    hf_tok = AutoTokenizer.from_pretrained(qwen_folder)
    # Qwen2VLProcessor needs a torchvision video processor; apply_chat_template is ProcessorMixin's
    # own (Qwen2VLProcessor does not override it), so a LlavaProcessor carrier renders identically.
    carrier = LlavaProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=hf_tok, chat_template=QWEN2VL_TEMPLATE)
    ours = Tokenizer.from_folder(qwen_folder)
    assert ours.chat_template == QWEN2VL_TEMPLATE
    string_content = [{"role": "user", "content": "plain string content"}]
    for messages in CONVERSATIONS + [string_content]:
        for extra in ({}, {"add_vision_id": True}):
            want = carrier.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
            assert ours.apply_chat_template(messages, True, **extra) == want
            assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra) == want
    rendered = ours.apply_chat_template(prompt_to_messages("<image> What color?"))
    assert rendered.endswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color?<|im_end|>\n"
                             "<|im_start|>assistant\n")  # fmt: skip


def test_find_chat_template_locations(tmp_path):
    assert find_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))  # fmt: skip
    assert find_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert find_chat_template(tmp_path) == "J"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "LEGACY"}))
    assert find_chat_template(tmp_path) == "LEGACY"  # HF's processor prefers the legacy json
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "P", "image_processor": {}}))
    assert find_chat_template(tmp_path) == "P"
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    (tmp_path / "chat_template.json").unlink()
    assert find_chat_template(tmp_path) == "P"  # never reaches the broken file
    (tmp_path / "processor_config.json").unlink()
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(LoadError, match="tokenizer_config.json: not valid JSON"):
        find_chat_template(tmp_path)


def test_render_chat_template_environment():
    msgs = [{"role": "user", "content": "hi", "name": None}]
    assert render_chat_template("{{ messages | tojson }}", msgs) == '[{"role": "user", "content": "hi"}]'
    assert render_chat_template("{{ '<a & b>' | tojson }}", msgs) == '"<a & b>"'  # no HTML escaping
    assert render_chat_template("  {% if true %}\nx{% endif %}\n", msgs) == "x"  # trim + lstrip blocks
    loop = "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert render_chat_template(loop, msgs) == "01"
    ns = "{% set n = namespace(c=0) %}{% for m in messages %}{% set n.c = n.c + 1 %}{% endfor %}{{ n.c }}"
    assert render_chat_template(ns, msgs * 3) == "3"
    assert render_chat_template("{{ bos_token }}{{ add_generation_prompt }}", msgs, False, bos_token="<s>") == "<s>False"
    assert render_chat_template("{{ strftime_now('%Y') | length }}", msgs) == "4"
    image_obj = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (2, 2))}]}]
    assert render_chat_template("{{ messages[0].content[0].image }}", image_obj) == "<Image>"
    with pytest.raises(InputError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", msgs)
    with pytest.raises(InputError, match="unsafe"):
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", msgs)
    with pytest.raises(InputError, match="unsafe"):
        render_chat_template("{% set n = namespace(_x=1) %}", msgs)
    with pytest.raises(InputError, match="unsafe"):
        render_chat_template("{% set _ = messages.append(1) %}", msgs)  # immutable sandbox
    with pytest.raises(LoadError, match="syntax error on line 1"):
        render_chat_template("{% for %}", msgs)


def test_prompt_to_messages():
    assert prompt_to_messages("Describe <image> and <image>.") == [{"role": "user", "content": [
        {"type": "text", "text": "Describe"}, {"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
        {"type": "text", "text": "."}]}]  # fmt: skip
    assert prompt_to_messages("<image>\nWhat is this?", num_images=1)[0]["content"] == [
        {"type": "image"}, {"type": "text", "text": "What is this?"}]  # fmt: skip
    assert prompt_to_messages("What is this?", num_images=2)[0]["content"] == [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is this?"}]  # fmt: skip
    assert prompt_to_messages("Just text")[0]["content"] == [{"type": "text", "text": "Just text"}]
    with pytest.raises(InputError, match="2 <image> marker"):
        prompt_to_messages("<image><image>", num_images=1)
    with pytest.raises(InputError, match="expected a string"):
        prompt_to_messages(b"bytes")
