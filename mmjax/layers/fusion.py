"""Projections of one input fused into one product at load: attention's q|k|v and the gated
MLP's gate|up, as vLLM's QKVParallelLinear and MergedColumnParallelLinear. The checkpoint keeps
them apart (as HF does); mmjax.load fuses them where it packs the decoder for the CPU
(mmjax.api._pack_decoder), because there each product is one call of the CPU kernel, with a
fixed cost per call: 7 calls a layer become 4 (docs/cpu_kernels.md, "Fused projections").

Axis legend: K the contracted (input) features, N_i member i's output features (its output axes
flattened), F = sum of N_i, the fused output.

Which projections fuse is data, declared by the module that owns them:
    class Attention(nn.Module):
        FUSIONS = (("qkv", ("q", "k", "v")),)
— the fused Einsum's name and its members, Einsums of the module that contract the same input.
The module runs the fused product when its params hold the fused name (`project`), else its
members one by one. `fuse_params` rewrites a param tree: each member's kernel [K, N_i]
concatenated along N into the fused `kernel` [K, F], its int8 `kernel_scale` [N_i] and its
`bias` [N_i] the same way; `unfuse_params` gives the checkpoint layout back. Same math: in
the CPU kernels (cpu.gemv, cpu.panels) each output column is the same dot product, summed in the
same order; XLA's GEMM may block the wider product's sums differently (float32 rounding).
"""
from __future__ import annotations

import math
from typing import Mapping

import jax.numpy as jnp

__all__ = ["fuse_params", "fused_groups", "fused_shapes", "member_outputs", "project", "split", "unfuse_params"]

_PARTS = ("kernel", "kernel_scale", "bias")  # what a member may hold; all members the same


def split(y, outs):
    """y [..., F] -> one array per member, [..., *out_i], cut at the cumulative N_i."""
    lead, parts, off = y.shape[:-1], [], 0
    for out in outs:
        n = math.prod(out)
        parts.append(y[..., off: off + n].reshape(*lead, *out))
        off += n
    if off != y.shape[-1]:
        raise ValueError(f"split: outputs {outs} hold {off} features, the fused product {y.shape[-1]}")
    return tuple(parts)


def project(x, name: str, outs, bias: bool, dtype, kernels):
    """Inside a module's compact call: x [B, T, D] through the fused Einsum `name` ([D, F]),
    split into the members' outputs [B, T, *out_i]."""
    from mmjax.layers.linear import Einsum

    f = sum(math.prod(o) for o in outs)
    y = Einsum((x.shape[-1], f), "BTD,DF->BTF", (f,) if bias else None, dtype, name=name, kernels=kernels)(x)
    return split(y, outs)


def _node(params, path: str):
    node = params
    for key in path.split("/") if path else ():
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, dict) else None


def fuse_params(params: dict, groups: Mapping[str, tuple], contractions: Mapping[str, int],
                select=lambda path: True) -> tuple[dict, dict]:
    """Fuses, in place, every group of `groups` ({module path: FUSIONS}, from
    mmjax.models.base.abstract_init) whose module path `select` accepts and whose members all
    hold a plain `kernel` with the same parts, dtype and input size. Returns (params, the fused
    kernels' contractions {"a/b/qkv/kernel": 1}) — for mmjax.kernels.cpu.panels.pack_params."""
    fused_contractions = {}
    for path, fusions in groups.items():
        node = _node(params, path)
        if node is None or not select(path):
            continue
        for name, members in fusions:
            subs = [node.get(m) for m in members]
            if name in node or not all(isinstance(s, dict) and "kernel" in s for s in subs):
                continue
            parts = set(subs[0])
            ks = [math.prod(s["kernel"].shape[: contractions[f"{path}/{m}/kernel"]]) for m, s in zip(members, subs)]
            if (not parts <= set(_PARTS) or any(set(s) != parts for s in subs) or len(set(ks)) != 1
                    or any(len({s[p].dtype for s in subs}) != 1 for p in parts)):
                continue
            out = {"kernel": jnp.concatenate([s["kernel"].reshape(ks[0], -1) for s in subs], axis=1)}
            for p in parts - {"kernel"}:
                out[p] = jnp.concatenate([s[p].reshape(-1) for s in subs])
            for m in members:
                del node[m]
            node[name] = out
            fused_contractions[f"{path}/{name}/kernel"] = 1
    return params, fused_contractions


def fused_groups(params: Mapping, groups: Mapping[str, tuple]):
    """(module path, its param dict, fused name, members) of every group fused in `params`."""
    for path, fusions in groups.items():
        node = _node(params, path)
        for name, members in fusions:
            if node is not None and name in node:
                yield path, node, name, members


def member_outputs(path: str, members, shapes: Mapping[str, tuple], contractions: Mapping[str, int]) -> tuple:
    """Each member's output axes: its kernel's shape (shapes: the checkpoint's) past the
    contracted axes, as `split` and `project` take them."""
    return tuple(tuple(shapes[f"{path}/{m}/kernel"])[contractions[f"{path}/{m}/kernel"]:] for m in members)


def fused_shapes(params: Mapping, groups: Mapping[str, tuple], shapes: Mapping[str, tuple],
                 contractions: Mapping[str, int]) -> dict:
    """{"a/b/qkv/kernel": (K, F)} of the groups fused in `params` (shapes: the checkpoint's)."""
    out = {}
    for path, _, name, members in fused_groups(params, groups):
        first = f"{path}/{members[0]}/kernel"
        out[f"{path}/{name}/kernel"] = (math.prod(tuple(shapes[first])[: contractions[first]]),
                                        sum(math.prod(o) for o in member_outputs(path, members, shapes, contractions)))
    return out


def unfuse_params(params: Mapping, groups: Mapping[str, tuple], shapes: Mapping[str, tuple]) -> dict:
    """The checkpoint layout back: each fused group of `params` (unpacked: its `kernel` [K, F])
    split into its members, shaped as `shapes` ("a/b/q/kernel" -> shape) says; a new tree,
    everything else as it is."""
    def copy(tree):
        return {k: copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}

    out = copy(params)
    for path, node, name, members in list(fused_groups(out, groups)):
        fused, off = node.pop(name), 0
        for m in members:
            shape = tuple(shapes[f"{path}/{m}/kernel"])
            n = math.prod(shape) // fused["kernel"].shape[0]
            node[m] = {p: fused[p][..., off: off + n].reshape(tuple(shapes[f"{path}/{m}/{p}"])) for p in fused}
            off += n
    return out
