"""The quasi-LSTM of Languini: an LSTM whose gates see the input only.

Per head ``h`` and channel, with every gate a projection of ``x_t`` alone::

    f_t = σ(W_f x_t + b_f + 1)        forget gate, biased towards remembering
    i_t = σ(W_i x_t + b_i)            input gate
    z_t = tanh(W_z x_t + b_z)         cell input
    o_t = σ(W_o x_t + b_o)            output gate
    c_t = f_t ⊙ c_{t−1} + i_t ⊙ z_t   (``ops.linear_scan``)
    h_t = o_t ⊙ tanh(c_t)
    y_t = W_out [h_t^1; …; h_t^H] + b_out

As in the Languini reference, the gate projections are full ``D → H·P``
matrices and the heads only split the cell; since the recurrence is
element-wise, heads matter for sharding and for ``H·P ≠ D``, not for the math.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common

# Languini adds 1 to the forget pre-activation so that a fresh cell keeps
# σ(1) ≈ 0.73 of its state per step.
_FORGET_OFFSET = 1.0


class QLSTM(nn.Module):
  """Multi-head quasi-LSTM token mixer (module docstring for the equations).

  Attributes:
    d_model: model width D.
    num_heads: number of cell heads H.
    head_dim: cell width per head P; ``d_model // num_heads`` if None.
    dtype: compute dtype of the projections and the output.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  num_heads: int
  head_dim: int | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _head_dim(self) -> int:
    if self.head_dim is not None:
      return self.head_dim
    _common.check_divisible("d_model", self.d_model, "num_heads", self.num_heads)
    return self.d_model // self.num_heads

  def init_state(self, batch_size: int, dtype=None):
    """The cell ``c`` ``[B, H, P]`` of a fresh sequence: zeros, float32.

    ``dtype`` is accepted for the mixer protocol; the cell is float32 always.
    """
    del dtype
    return jnp.zeros((batch_size, self.num_heads, self._head_dim()), jnp.float32)

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs the cell over ``x``.

    Args:
      x: ``[B, T, D]``.
      state: the cell ``c`` ``[B, H, P]`` float32, or None at a sequence start.
      segment_ids: ``[B, T]`` document ids of a packed row; the cell resets
        where the id changes.

    Returns:
      ``(y, c)``: ``y`` ``[B, T, D]`` in ``dtype`` and the cell after the last token.
    """
    _common.check_input(x, self.d_model)
    head_dim = self._head_dim()
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
    # One matmul for the four gates: [B, T, 4, H, P].
    gates = _common.dense((4, self.num_heads, head_dim),
                          ("embed", None, "heads", "head_dim"), name="gates", **proj)(x)
    gates = gates.astype(jnp.float32)
    forget = jax.nn.sigmoid(gates[:, :, 0] + _FORGET_OFFSET)
    update = jax.nn.sigmoid(gates[:, :, 1]) * jnp.tanh(gates[:, :, 2])
    out_gate = jax.nn.sigmoid(gates[:, :, 3])
    cell, cell_last = ops.linear_scan(forget, update, state, segment_ids=segment_ids)
    hidden = (out_gate * jnp.tanh(cell)).astype(self.dtype)
    y = _common.dense(self.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1),
                      name="out_proj", **proj)(hidden)
    return y, cell_last
