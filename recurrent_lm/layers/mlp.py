"""Channel mixers ``[B, T, D] → [B, T, D]``.

* :class:`SwiGLU`:  ``y = W_down (SiLU(W_gate x) ⊙ W_up x)``, no biases (Llama, Based).
* :class:`GeluMLP`: ``y = W_2 GELU(W_1 x + b_1) + b_2`` with the tanh GELU (GPT-2, Languini).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm.layers import _common


class SwiGLU(nn.Module):
  """``y = W_down (SiLU(W_gate x) ⊙ W_up x)``; ``x`` ``[B, T, D]``.

  Attributes:
    hidden_dim: width of the gated hidden layer.
    dtype: compute dtype.
    param_dtype: dtype of the kernels.
  """
  hidden_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = _common.dense(self.hidden_dim, ("embed", "mlp"), name="gate_proj", **proj)(x)
    up = _common.dense(self.hidden_dim, ("embed", "mlp"), name="up_proj", **proj)(x)
    return _common.dense(x.shape[-1], ("mlp", "embed"), name="down_proj", **proj)(
        jax.nn.silu(gate) * up)


class GeluMLP(nn.Module):
  """``y = W_2 GELU(W_1 x + b_1) + b_2``; ``x`` ``[B, T, D]``.

  Attributes:
    hidden_dim: width of the hidden layer (4·D in Languini).
    use_bias: learn ``b_1`` and ``b_2``.
    dtype: compute dtype.
    param_dtype: dtype of the parameters.
  """
  hidden_dim: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    hidden = _common.dense(self.hidden_dim, ("embed", "mlp"), name="fc_in", **proj)(x)
    return _common.dense(x.shape[-1], ("mlp", "embed"), name="fc_out", **proj)(
        jax.nn.gelu(hidden, approximate=True))
