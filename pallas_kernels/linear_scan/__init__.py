"""The diagonal linear scan ``h_t = a_t ⊙ h_{t−1} + b_t`` as Pallas kernels.

``linear_scan`` has the signature of ``recurrent_lm.ops.linear_scan``'s
implementations and ``supports`` is its predicate; ``linear_scan_kernel``
names the backend and interpret mode explicitly.
"""

from pallas_kernels.linear_scan.kernel import linear_scan, linear_scan_kernel, supports

__all__ = ["linear_scan", "linear_scan_kernel", "supports"]
