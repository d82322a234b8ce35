"""mmjax's optional CPU backend: C++ XLA FFI kernels for the decode-step matrix product
(gemv), decode attention and prefill attention, compiled on first use (ffi.py).

Optional: without a C++ compiler every `eligible` says no and XLA's own ops run (slower, same
math). Whether a program uses them is the KernelPolicy's choice (mmjax/kernels/policy.py), made
in the CPU branch of a `jax.lax.platform_dependent`, so a program lowered for another platform
never contains them.
"""
