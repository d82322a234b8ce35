"""The one tolerance table (max |Δ| against the torch reference), per dtype.

float32: both sides compute in fp32; differences are summation order only.
bfloat16: both sides compute in bf16 with fp32 softmax/norms; every matmul rounds its output
to 8 bits of mantissa, and torch and XLA round at different points, so logits of O(3) differ
by a few bf16 ulps. Greedy tokens are compared on the fp32 upcast of the same bf16 weights.
int8 (weight-only, mmjax/quantization.py): compared with torch running the *dequantized* weights
(q * scale), activations float32. Both sides multiply the same float32 numbers; mmjax sums
x . q and scales the column after, torch sums x . (q * scale): the same products up to one
rounding each (2^-24 relative), so the float32 bound holds unchanged and quantization error
is not in it (benchmarks/quantization.py reports that error against the float model).
"""

TOLERANCES = {
    "float32": {"logits": 1e-4, "vision_features": 1e-5, "pixel_values": 1e-5, "hidden": 1e-4},
    # Measured on tiny LLaVA, 3 seeds: logits max |Δ| 0.042-0.055 at |logit| <= 3.4 (bf16 ulp there
    # is 0.0156: ~3.5 ulps); vision features 0.0059-0.0078 at |x| <= 1.09 (1 ulp). The bounds
    # leave ~2x headroom: 0.1 is 6 ulps of a logit of 3.
    "bfloat16": {"logits": 1e-1, "vision_features": 2e-2, "pixel_values": 1e-5, "hidden": 1e-1},
    # int8 against the dequantized torch model (docstring); measured on tiny LLaVA / Qwen2-VL:
    # logits max |d| 3.0e-6 / 4.6e-6 at |logit| <= 3.5 (one run each); the unquantized
    # model is 0.061 / 0.085 away, so the bound sees quantization.
    "int8": {"logits": 1e-4},
    # The KV cache stored narrow (mmjax.kernels.kv_cache), same model, against its fp32 cache;
    # 16 teacher-forced tokens, tiny LLaVA, |logit| <= 3. bfloat16 keeps 8 mantissa bits: each
    # key/value off by <= 2^-9 relative; measured max |d| 5.7e-3. int8 per (token, kv head):
    # each element off by <= max|x| / 254, ~8x bf16's step; measured 1.9e-2. Bounds ~3x measured.
    "kv_cache": {"bfloat16": 2e-2, "int8": 6e-2},
}


def tol(dtype: str, what: str) -> float:
    return TOLERANCES[dtype][what]
