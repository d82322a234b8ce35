"""Feed-forward blocks. Axis legend: B batch, T tokens, D model dim, F hidden dim."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.kernels.policy import KernelPolicy
from mmjax.layers import fusion
from mmjax.layers.activations import get_activation
from mmjax.layers.linear import Einsum

__all__ = ["GatedMLP", "MLP"]


class GatedMLP(nn.Module):
    """SwiGLU (Llama): down(act(gate(x)) * up(x))."""

    FUSIONS = (("gate_up", ("gate", "up")),)  # fused at load where it pays (mmjax.layers.fusion)

    hidden_size: int  # D
    intermediate_size: int  # F
    act: str = "silu"
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    kernels: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        D, F = self.hidden_size, self.intermediate_size
        fb, kw = (F,) if self.use_bias else None, dict(kernels=self.kernels)
        if self.has_variable("params", "gate_up"):  # fused at load (mmjax.layers.fusion)
            gate, up = fusion.project(x, "gate_up", ((F,), (F,)), self.use_bias, self.dtype, self.kernels)
        else:
            gate = Einsum((D, F), "BTD,DF->BTF", fb, self.dtype, name="gate", **kw)(x)
            up = Einsum((D, F), "BTD,DF->BTF", fb, self.dtype, name="up", **kw)(x)
        h = get_activation(self.act)(gate) * up
        return Einsum((F, D), "BTF,FD->BTD", (D,) if self.use_bias else None, self.dtype, name="down", **kw)(h)


class MLP(nn.Module):
    """fc2(act(fc1(x))) — ViT blocks and the LLaVA projector. `out_size` defaults to D."""

    hidden_size: int  # D (input)
    intermediate_size: int  # F
    act: str = "gelu"
    use_bias: bool = True
    out_size: int | None = None
    dtype: jnp.dtype = jnp.float32
    kernels: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        D, F = self.hidden_size, self.intermediate_size
        O, kw = self.out_size or D, dict(kernels=self.kernels)
        h = Einsum((D, F), "BTD,DF->BTF", (F,) if self.use_bias else None, self.dtype, name="fc1", **kw)(x)
        h = get_activation(self.act)(h)
        return Einsum((F, O), "BTF,FD->BTD", (O,) if self.use_bias else None, self.dtype, name="fc2", **kw)(h)
