"""BERT checkpoint layout -> mmjax.models.bert param tree (encoder/*).

Two key layouts are accepted (each source tensor matches exactly one of them):
  BertModel:                      embeddings.*, encoder.layer.{i}.*, pooler.dense.*
  BertFor* (pretraining / heads): bert.embeddings.*, ...; the task heads are dropped (cls.* of
                                  the MLM / NSP heads, classifier.* / qa_outputs.* of the task heads)
BertConfig.has_pooler (from config.json "architectures") says whether pooler.dense is expected.
"""
from __future__ import annotations

from converters.rules import Rule
from converters.transforms import (bias_to_heads, embedding, heads_to_linear_out, identity, linear_to_heads,
                                   norm_scale, transpose_linear)

__all__ = ["bert_rules"]

_PREFIXES = ("", "bert.")
_QKV = (("query", "q"), ("key", "k"), ("value", "v"))


def _layernorm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/scale", norm_scale), Rule(f"{src}.bias", f"{dst}/bias", identity)]


def _linear(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", transpose_linear), Rule(f"{src}.bias", f"{dst}/bias", identity)]


def _layout(p: str, dst: str, has_pooler: bool) -> list[Rule]:
    E, L, T = f"{p}embeddings", f"{p}encoder.layer.{{i}}", f"{dst}/layers_{{i}}"
    A = f"{L}.attention"
    return [
        Rule(f"{E}.word_embeddings.weight", f"{dst}/word_embed/embedding", embedding),
        Rule(f"{E}.position_embeddings.weight", f"{dst}/pos_embed/embedding", embedding),
        Rule(f"{E}.token_type_embeddings.weight", f"{dst}/type_embed/embedding", embedding),
        # Buffers (arange / zeros) that older exports keep; recomputed at run time.
        Rule(f"{E}.position_ids", None),
        Rule(f"{E}.token_type_ids", None),
        *_layernorm(f"{E}.LayerNorm", f"{dst}/embed_norm"),
        *[Rule(f"{A}.self.{s}.weight", f"{T}/attn/{d}/kernel", linear_to_heads) for s, d in _QKV],
        *[Rule(f"{A}.self.{s}.bias", f"{T}/attn/{d}/bias", bias_to_heads) for s, d in _QKV],
        Rule(f"{A}.output.dense.weight", f"{T}/attn/o/kernel", heads_to_linear_out),
        Rule(f"{A}.output.dense.bias", f"{T}/attn/o/bias", identity),
        *_layernorm(f"{A}.output.LayerNorm", f"{T}/attn_norm"),
        *_linear(f"{L}.intermediate.dense", f"{T}/mlp/fc1"),
        *_linear(f"{L}.output.dense", f"{T}/mlp/fc2"),
        *_layernorm(f"{L}.output.LayerNorm", f"{T}/mlp_norm"),
        *(_linear(f"{p}pooler.dense", f"{dst}/pooler") if has_pooler else []),
    ]


def bert_rules(cfg) -> list[Rule]:
    rules = [r for p in _PREFIXES for r in _layout(p, "encoder", cfg.has_pooler)]
    # Heads of BertFor*: not part of the encoder.
    return rules + [Rule("cls.*", None), Rule("classifier.*", None), Rule("qa_outputs.*", None)]
