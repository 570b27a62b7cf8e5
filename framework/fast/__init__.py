"""Our fast path: kernels and patches used where apex / Transformer Engine are absent.

Each piece keeps the interface of the reference it replaces and falls back to it on CPU.
`benchmarks/throughput.py` measures each against megatron-core's own torch fallbacks.
"""
