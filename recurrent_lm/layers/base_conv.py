"""BaseConv, the gated short convolution of BASED (Arora et al., 2024).

With ``E = expand · D / 2`` channels::

    [u, g] = W_in x + b_in                   u, g: [B, T, E]
    c      = SiLU(conv_W(u))                 causal depthwise conv, W taps (3 in BASED)
    y      = W_out (c ⊙ g) + b_out

The conv window is the whole state: the last ``W − 1`` values of ``u``,
which makes BaseConv the cheapest mixer to decode (``(W − 1) · E`` numbers a
sequence). BASED's 360M model puts it in most layers and leaves recall to a
few linear-attention and sliding-window layers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common


class BaseConv(nn.Module):
  """Gated causal short convolution (module docstring for the equations).

  Attributes:
    d_model: model width D.
    kernel_size: conv taps W.
    expand: the input projection is ``expand · D`` wide, split into the conv
      input and the gate (BASED's 360M model: 4, so ``E = 2D``).
    use_bias: biases on the projections (BASED: True).
    dtype: compute dtype of the projections, the conv and the output.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  kernel_size: int = 3
  expand: int = 2
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _inner(self) -> int:
    if self.kernel_size < 1:
      raise ValueError(f"kernel_size={self.kernel_size}; expected a positive int")
    _common.check_divisible("expand * d_model", self.expand * self.d_model, "2", 2)
    return self.expand * self.d_model // 2

  def init_state(self, batch_size: int, dtype=None):
    """The conv window ``[B, W − 1, E]`` of a fresh sequence: zeros in ``dtype``."""
    return jnp.zeros((batch_size, self.kernel_size - 1, self._inner()),
                     self.dtype if dtype is None else dtype)

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs the gated conv over ``x`` ``[B, T, D]``; returns ``(y, window)``."""
    _common.check_input(x, self.d_model)
    inner = self._inner()
    if state is None:
      state = self.init_state(x.shape[0])
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    u, gate = jnp.split(
        _common.dense(2 * inner, ("embed", "mlp"), name="in_proj", **proj)(x), 2, axis=-1)
    # PyTorch's Conv1d default: U(±1/√fan_in) with fan_in = W for a depthwise conv.
    conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    weight = self.param("conv_weight", nn.with_logical_partitioning(conv_init, ("conv", "mlp")),
                        (self.kernel_size, inner), self.param_dtype)
    conv, window = ops.causal_conv1d(u, weight.astype(self.dtype), state=state.astype(u.dtype),
                                     segment_ids=segment_ids)
    y = _common.dense(self.d_model, ("mlp", "embed"), name="out_proj", **proj)(
        (jax.nn.silu(conv) * gate).astype(self.dtype))
    return y, window
