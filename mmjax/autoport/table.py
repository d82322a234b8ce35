"""The one table of ops mmjax.autoport lowers: exported op name -> JAX function.

The exporter decomposes torch.export's graph to core ATen except the ops in KEEP, which have a
direct and faster JAX form (a fused linear, einsum, mmjax's attention, norms computed in one
pass); everything else reaches this table as core ATen (transpose/chunk/stack/masked_fill/
unbind/roll/... arrive as permute/split/cat/where/slice/index_select), so the table stays
small. An op missing here is refused when porting (mmjax.errors.AutoportError naming the op,
its node and the user's source line) and when loading a saved port.

Functions take the node's arguments in ATen schema order (mmjax.autoport.ops_tensor /
ops_nn); ops in CONTEXT also get the port's settings as keywords (kernels: the KernelPolicy).
"""
from __future__ import annotations

import math
import operator

from mmjax.autoport import ops_nn as N
from mmjax.autoport import ops_tensor as T

__all__ = ["OPS", "KEEP", "CONTEXT", "op_names"]

# Not decomposed by run_decompositions: lowered as themselves.
KEEP = (
    "aten.linear.default", "aten.matmul.default", "aten.einsum.default",
    "aten.scaled_dot_product_attention.default",
    "aten.layer_norm.default", "aten.group_norm.default", "aten.rms_norm.default",
    "aten.softmax.int", "aten.log_softmax.int", "aten.gelu.default", "aten.silu.default",
    "aten.upsample_nearest2d.vec", "aten.upsample_bilinear2d.vec", "aten.upsample_nearest1d.vec",
    "aten.upsample_linear1d.vec", "aten.pad.default",
)

_UNARY = {
    "neg": lambda x: -x, "abs": T.jnp.abs, "exp": T.jnp.exp, "expm1": T.jnp.expm1, "log": T.jnp.log,
    "log1p": T.jnp.log1p, "log2": T.jnp.log2, "log10": T.jnp.log10, "sqrt": T.jnp.sqrt, "rsqrt": T.rsqrt,
    "sin": T.jnp.sin, "cos": T.jnp.cos, "tan": T.jnp.tan, "tanh": T.jnp.tanh, "sinh": T.jnp.sinh,
    "cosh": T.jnp.cosh, "asin": T.jnp.arcsin, "acos": T.jnp.arccos, "atan": T.jnp.arctan,
    "sigmoid": T.jax.nn.sigmoid, "erf": T.jax.scipy.special.erf, "erfc": T.jax.scipy.special.erfc,
    "erfinv": T.jax.scipy.special.erfinv,
    "reciprocal": T.jnp.reciprocal, "sign": T.jnp.sign, "floor": T.jnp.floor, "ceil": T.jnp.ceil,
    "round": T.jnp.round, "trunc": T.jnp.trunc, "relu": T.relu, "isnan": T.jnp.isnan, "isinf": T.jnp.isinf,
    "logical_not": T.jnp.logical_not, "bitwise_not": T.bitwise_not, "gelu": T.gelu, "silu": T.silu,
    "hardtanh": T.hardtanh, "leaky_relu": T.leaky_relu, "elu": T.elu,
}
_TS = ("Tensor", "Scalar")
_BINARY = {  # name: (function, its overloads: a tensor or a Python number in the second place, a mode)
    "add": (T.add, _TS), "sub": (T.sub, _TS), "rsub": (T.rsub, _TS), "mul": (T.mul, _TS),
    "div": (T.div, _TS + ("Tensor_mode", "Scalar_mode")), "pow": (T.pow_, ("Tensor_Scalar", "Tensor_Tensor", "Scalar")),
    "remainder": (T.jnp.remainder, _TS), "fmod": (T.jnp.fmod, _TS), "floor_divide": (T.jnp.floor_divide, ("default",)),
    "maximum": (T.jnp.maximum, ("default",)), "minimum": (T.jnp.minimum, ("default",)),
    "atan2": (T.jnp.arctan2, ("default",)), "eq": (T.jnp.equal, _TS), "ne": (T.jnp.not_equal, _TS),
    "lt": (T.jnp.less, _TS), "le": (T.jnp.less_equal, _TS), "gt": (T.jnp.greater, _TS),
    "ge": (T.jnp.greater_equal, _TS), "logical_and": (T.jnp.logical_and, ("default",)),
    "logical_or": (T.jnp.logical_or, ("default",)), "logical_xor": (T.jnp.logical_xor, ("default",)),
    "bitwise_and": (T.jnp.bitwise_and, _TS), "bitwise_or": (T.jnp.bitwise_or, _TS),
    "bitwise_xor": (T.jnp.bitwise_xor, _TS),
}

OPS = {
    **{f"aten.{n}.default": f for n, f in _UNARY.items()},
    **{f"aten.{n}.{o}": f for n, (f, overloads) in _BINARY.items() for o in overloads},
    "aten.where.self": T.where,
    "aten.clamp.default": T.clamp, "aten.clamp.Tensor": T.clamp,
    "aten.clamp_min.default": lambda x, m: T.clamp(x, min=m), "aten.clamp_max.default": lambda x, m: T.clamp(x, max=m),
    # creation and casts
    "aten.arange.default": T.arange, "aten.arange.start": T.arange, "aten.arange.start_step": T.arange,
    "aten.full.default": T.full, "aten.full_like.default": T.full_like, "aten.scalar_tensor.default": T.scalar_tensor,
    "aten.zeros.default": T.zeros, "aten.ones.default": T.ones, "aten.empty.memory_format": T.zeros,
    "aten.zeros_like.default": T.zeros_like, "aten.ones_like.default": T.ones_like,
    "aten.empty_like.default": T.zeros_like, "aten.new_full.default": T.new_full,
    "aten.new_zeros.default": T.new_zeros, "aten.new_ones.default": T.new_ones, "aten.new_empty.default": T.new_zeros,
    "aten.linspace.default": T.linspace,
    "aten._to_copy.default": T.to_copy, "aten.copy.default": T.copy, "aten.clone.default": T.identity,
    "aten.alias.default": T.identity,
    "aten.lift_fresh_copy.default": T.identity, "aten.detach.default": T.identity,
    "aten.dropout.default": T.dropout,
    # views and shapes
    "aten.view.default": T.view, "aten._unsafe_view.default": T.view, "aten.reshape.default": T.view,
    "aten.permute.default": T.permute, "aten.transpose.int": T.transpose, "aten.expand.default": T.expand,
    "aten.unsqueeze.default": T.unsqueeze, "aten.squeeze.default": T.squeeze, "aten.squeeze.dim": T.squeeze,
    "aten.squeeze.dims": T.squeeze, "aten.slice.Tensor": T.slice_, "aten.select.int": T.select,
    "aten.cat.default": T.cat, "aten.split_with_sizes.default": T.split_with_sizes, "aten.split.Tensor": T.split,
    "aten.flip.default": T.flip, "aten.roll.default": T.roll, "aten.repeat.default": T.repeat,
    "aten.tril.default": T.tril, "aten.triu.default": T.triu,
    "aten.constant_pad_nd.default": T.constant_pad_nd, "aten.pad.default": T.pad,
    # indexing
    "aten.embedding.default": T.embedding, "aten.index.Tensor": T.index, "aten._unsafe_index.Tensor": T.index,
    "aten.index_put.default": T.index_put, "aten._unsafe_index_put.default": T.index_put,
    "aten.diagonal.default": T.diagonal, "aten.bucketize.Tensor": T.bucketize,
    "aten.searchsorted.Tensor": T.searchsorted, "aten.index_select.default": T.index_select,
    "aten.gather.default": T.gather,
    "aten.scatter.src": T.scatter, "aten.scatter.value": T.scatter_value, "aten.scatter_add.default": T.scatter_add,
    "aten.slice_scatter.default": T.slice_scatter, "aten.select_scatter.default": T.select_scatter,
    # reductions
    "aten.sum.default": T.sum_, "aten.sum.dim_IntList": T.sum_, "aten.mean.default": T.mean,
    "aten.mean.dim": T.mean, "aten.prod.default": T.prod, "aten.prod.dim_int": T.prod,
    "aten.amax.default": T.amax, "aten.amin.default": T.amin, "aten.max.default": T.amax, "aten.min.default": T.amin,
    "aten.max.dim": T.max_dim, "aten.min.dim": T.min_dim, "aten.argmax.default": T.argmax,
    "aten.argmin.default": T.argmin, "aten.var.correction": T.var, "aten.std.correction": T.std,
    "aten.var_mean.correction": T.var_mean,
    "aten.any.default": T.any_, "aten.any.dim": T.any_, "aten.any.dims": T.any_,
    "aten.all.default": T.all_, "aten.all.dim": T.all_, "aten.all.dims": T.all_,
    "aten.logsumexp.default": T.logsumexp, "aten.cumsum.default": T.cumsum, "aten.cumprod.default": T.cumprod,
    "aten.linalg_vector_norm.default": T.vector_norm, "aten.sort.default": T.sort, "aten.topk.default": T.topk,
    # products
    "aten.linear.default": N.linear, "aten.matmul.default": N.matmul, "aten.mm.default": N.matmul,
    "aten.bmm.default": N.matmul, "aten.mv.default": N.matmul, "aten.dot.default": N.matmul,
    "aten.addmm.default": N.addmm, "aten.baddbmm.default": N.addmm, "aten.einsum.default": N.einsum,
    "aten._cdist_forward.default": N.cdist,
    # convolution, pooling, interpolation
    "aten.convolution.default": N.convolution, "aten.avg_pool2d.default": N.avg_pool,
    "aten.max_pool2d_with_indices.default": N.max_pool_with_indices,
    "aten._adaptive_avg_pool2d.default": N.adaptive_avg_pool2d,
    "aten.upsample_nearest1d.vec": N.upsample_nearest, "aten.upsample_nearest2d.vec": N.upsample_nearest,
    "aten.upsample_linear1d.vec": N.upsample_linear, "aten.upsample_bilinear2d.vec": N.upsample_linear,
    # norms, softmax, attention
    "aten.layer_norm.default": N.layer_norm, "aten.native_layer_norm.default": N.native_layer_norm,
    "aten.group_norm.default": N.group_norm, "aten.rms_norm.default": N.rms_norm,
    "aten._native_batch_norm_legit_no_training.default": N.batch_norm_inference,
    "aten._native_batch_norm_legit.no_stats": N.batch_norm_batch_stats,
    "aten.softmax.int": N.softmax, "aten._softmax.default": N.softmax,
    "aten.log_softmax.int": N.log_softmax, "aten._log_softmax.default": N.log_softmax,
    "aten.scaled_dot_product_attention.default": N.scaled_dot_product_attention,
    # symbolic sizes (Python ints at trace time) and the graph's own bookkeeping
    "aten.sym_size.int": lambda x, d: x.shape[d], "aten.sym_numel.default": lambda x: x.size,
    "operator.getitem": operator.getitem,
    **{f"operator.{n}": getattr(operator, n) for n in ("add", "sub", "mul", "floordiv", "truediv", "mod", "neg",
                                                         "pow", "eq", "ne", "lt", "le", "gt", "ge")},
    "torch.sym_max": max, "torch.sym_min": min, "torch.sym_float": float, "torch.sym_int": int,
    "math.ceil": math.ceil, "math.floor": math.floor,
    "aten._assert_tensor_metadata.default": T.no_op, "aten._assert_scalar.default": T.no_op,
    "aten.sym_constrain_range_for_size.default": T.no_op, "aten._assert_async.msg": T.no_op,
}

CONTEXT = frozenset({"aten.scaled_dot_product_attention.default"})


def op_names() -> list[str]:
    return sorted(OPS)
