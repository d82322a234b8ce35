"""BERT checkpoint layout -> the bert family's param tree (encoder/*).

Two key layouts are accepted (each source tensor matches exactly one of them):
  BertModel:                      embeddings.*, encoder.layer.{i}.*, pooler.dense.*
  BertFor* (pretraining / heads): bert.embeddings.*, ...; the task heads are dropped (cls.* of
                                  the MLM / NSP heads, classifier.* / qa_outputs.* of the task heads)
BertConfig.has_pooler (from config.json "architectures") says whether pooler.dense is expected.
"""
from __future__ import annotations

from converters.families.common import attention, linear, norm
from converters.rules import Rule
from converters.transforms import embedding

__all__ = ["bert_rules"]

_PREFIXES = ("", "bert.")
_QKV = ("self.query", "self.key", "self.value")


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
        *norm(f"{E}.LayerNorm", f"{dst}/embed_norm"),
        *attention(A, f"{T}/attn", "output.dense", True, True, names=_QKV),
        *norm(f"{A}.output.LayerNorm", f"{T}/attn_norm"),
        *linear(f"{L}.intermediate.dense", f"{T}/mlp/fc1"),
        *linear(f"{L}.output.dense", f"{T}/mlp/fc2"),
        *norm(f"{L}.output.LayerNorm", f"{T}/mlp_norm"),
        *(linear(f"{p}pooler.dense", f"{dst}/pooler") if has_pooler else []),
    ]


def bert_rules(cfg) -> list[Rule]:
    rules = [r for p in _PREFIXES for r in _layout(p, "encoder", cfg.has_pooler)]
    # Heads of BertFor*: not part of the encoder.
    return rules + [Rule("cls.*", None), Rule("classifier.*", None), Rule("qa_outputs.*", None)]
