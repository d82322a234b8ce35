"""Text encoders: BERT-style bidirectional (bert.py) and the CLIP text tower (clip_text.py)."""
from mmjax.text.bert import POOLS, Bert, BertConfig, padding_mask
from mmjax.text.clip_text import ClipText, ClipTextConfig, eos_positions

__all__ = ["Bert", "BertConfig", "POOLS", "padding_mask", "ClipText", "ClipTextConfig", "eos_positions"]
