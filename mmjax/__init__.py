"""mmjax: run custom PyTorch vision-language models fast in JAX.

    model = mmjax.load("ckpt-flax/")
    out = mmjax.generate(model, [image], "<image> Describe it.", max_new_tokens=64)
"""
from mmjax.api import GenerationOutput, Model, forward, generate, load
from mmjax.encode import encode
from mmjax import autoport  # callable: mmjax.autoport(torch_module, args); imports no torch

__all__ = ["load", "forward", "generate", "encode", "autoport", "Model", "GenerationOutput"]
__version__ = "0.1.0"
