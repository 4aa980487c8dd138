"""Chunked (gated) linear attention as Pallas kernels, forward and backward.

``linear_attention`` has the signature of ``recurrent_lm.ops.linear_attention``'s
causal implementations and ``supports`` is its predicate;
``linear_attention_kernel`` names the backend and interpret mode explicitly.
"""

from pallas_kernels.linear_attention.kernel import (linear_attention, linear_attention_kernel,
                                                    supports)

__all__ = ["linear_attention", "linear_attention_kernel", "supports"]
