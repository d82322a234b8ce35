"""Param-tree paths ("a/b/c" keys, no leading 'params'), shared by mmjax and the converter."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmjax.errors import ConversionError

__all__ = ["flatten_params", "unflatten_params"]


def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}. Leaves are anything that is not a Mapping."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_params(v, path))
        else:
            out[path] = v
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}; a path given twice, or both a leaf and a parent, is an error."""
    tree: dict = {}
    for path, v in flat.items():
        if "" in path.split("/"):
            raise ConversionError(f"{path!r}: a parameter path has an empty name in it")
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConversionError(f"{path}: '{p}' is both a parameter and a parent of one")
        if leaf in node:
            raise ConversionError(f"{path}: given twice")
        node[leaf] = v
    return tree
