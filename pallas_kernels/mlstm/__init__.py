"""mLSTM chunkwise Pallas kernels (forward and backward) with the stabiliser.

``mlstm`` has the signature of ``recurrent_lm.ops.mlstm``'s implementations
and ``supports`` is its predicate; ``mlstm_kernel`` names the backend and
interpret mode explicitly.
"""

from pallas_kernels.mlstm.kernel import mlstm, mlstm_kernel, supports

__all__ = ["mlstm", "mlstm_kernel", "supports"]
