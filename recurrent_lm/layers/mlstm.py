"""The mLSTM layer of xLSTM 7B (Beck et al., 2025): matrix memory with
exponential input and sigmoid forget gates (``ops.mlstm``).

For ``x`` ``[B, T, D]``, with H heads, key width ``K = qk_ratio · D / H`` and
value width ``V = D / H``::

    q, k = W_q x, W_k x                        [B, T, H, K]
    v    = W_v x                               [B, T, H, V]
    ĩ, f̃ = cap(W_i x + b_i), cap(W_f x + b_f)  [B, T, H]; cap(a) = 15 · tanh(a / 15)
    h    = mLSTM(q, k, v, ĩ, f̃)                ops.mlstm: C_t = f′ C + i′ (k/√K) vᵀ, …
    y    = W_out (σ(W_o x) ⊙ RMSNorm_head(h))  output gate per channel

Initialisation as in xLSTM 7B: input-gate bias −10 (the memory starts
nearly closed), forget-gate bias ``linspace(3, 6)`` over the heads (it starts
remembering). The state is ``ops.mlstm``'s ``(C [B, H, K, V], n [B, H, K],
m [B, H])``, float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common

_GATE_CAP = 15.0


def _soft_cap(x, cap: float):
  return cap * jnp.tanh(x / cap)


class MLSTM(nn.Module):
  """The xLSTM-7B mLSTM token mixer (module docstring for the equations).

  Attributes:
    d_model: model width D.
    num_heads: H.
    qk_ratio: query/key width over D (0.5 in xLSTM 7B).
    chunk_size: chunk length of the chunked op.
    norm_eps: epsilon of the per-head RMS norm.
    dtype: compute dtype of the projections and the output.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  num_heads: int = 4
  qk_ratio: float = 0.5
  chunk_size: int = 64
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dims(self) -> tuple[int, int]:
    """``(K, V)`` per head."""
    _common.check_divisible("d_model", self.d_model, "num_heads", self.num_heads)
    qk_width = int(self.qk_ratio * self.d_model)
    _common.check_divisible("qk_ratio * d_model", qk_width, "num_heads", self.num_heads)
    if qk_width < self.num_heads:
      raise ValueError(f"qk_ratio={self.qk_ratio} leaves {qk_width} key channels for "
                       f"{self.num_heads} heads; expected at least one per head")
    return qk_width // self.num_heads, self.d_model // self.num_heads

  def init_state(self, batch_size: int, dtype=None):
    """Zeros: ``(C [B, H, K, V], n [B, H, K], m [B, H])`` float32 (``dtype`` unused)."""
    del dtype
    dk, dv = self._dims()
    return (jnp.zeros((batch_size, self.num_heads, dk, dv), jnp.float32),
            jnp.zeros((batch_size, self.num_heads, dk), jnp.float32),
            jnp.zeros((batch_size, self.num_heads), jnp.float32))

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs the matrix memory over ``x`` ``[B, T, D]``; returns ``(y, state)``."""
    _common.check_input(x, self.d_model)
    dk, dv = self._dims()
    heads = self.num_heads
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = _common.dense((heads, dk), ("embed", "heads", "head_dim"), name="q_proj", **proj)(x)
    k = _common.dense((heads, dk), ("embed", "heads", "head_dim"), name="k_proj", **proj)(x)
    v = _common.dense((heads, dv), ("embed", "heads", "head_dim"), name="v_proj", **proj)(x)
    input_bias = lambda key, shape, dtype=jnp.float32: jnp.full(shape, -10.0, dtype)
    forget_bias = lambda key, shape, dtype=jnp.float32: jnp.linspace(3.0, 6.0, shape[0]).astype(dtype)
    i_raw = _common.dense(heads, ("embed", "heads"), name="input_gate", use_bias=True,
                          bias_init=input_bias, **proj)(x)
    f_raw = _common.dense(heads, ("embed", "heads"), name="forget_gate", use_bias=True,
                          bias_init=forget_bias, **proj)(x)
    out_gate = _common.dense((heads, dv), ("embed", "heads", "head_dim"), name="o_proj",
                             **proj)(x)
    h, state = ops.mlstm(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        _soft_cap(i_raw.astype(jnp.float32), _GATE_CAP),
        _soft_cap(f_raw.astype(jnp.float32), _GATE_CAP),
        initial_state=state, segment_ids=segment_ids, chunk_size=self.chunk_size)
    scale = self.param("norm_scale", nn.with_logical_partitioning(
        nn.initializers.ones, ("heads", "head_dim")), (heads, dv), self.param_dtype)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.norm_eps)
    gated = jax.nn.sigmoid(out_gate.astype(jnp.float32)) * h * scale
    y = _common.dense(self.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1),
                      name="out_proj", **proj)(gated.astype(self.dtype))
    return y, state
