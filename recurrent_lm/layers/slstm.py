"""The sLSTM of xLSTM (Beck et al., 2024): scalar memory, exponential gating,
recurrent (hidden-to-hidden) weights — a sequential scan, not associative.

Per head (width P) and time, from the gate pre-activations
``g̃ = W x (+ conv) + R h_{t−1} + b`` for ``g ∈ {i, f, z, o}``::

    m_t = max(logσ(f̃_t) + m_{t−1}, ĩ_t)                   stabiliser
    i′  = exp(ĩ_t − m_t),   f′ = exp(logσ(f̃_t) + m_{t−1} − m_t)
    c_t = f′ c_{t−1} + i′ tanh(z̃_t)
    n_t = f′ n_{t−1} + i′
    h_t = σ(õ_t) ⊙ c_t / n_t

A fresh state has ``c = n = h = 0`` and ``m = −10³⁰`` (so the first step
takes ``m = ĩ`` and ``i′ = 1``: ``n ≥ 1`` from then on, nothing divides by
zero). As in the xLSTM layer, the input and forget gates read the input
after a causal conv (``conv_width`` taps, SiLU; 0 for none), the cell input
and output gates read it directly; every input projection and ``R`` are
block-diagonal over heads; the output is ``h`` layer-normed per head. ``R``
starts at zero and the forget-gate bias at ``linspace(3, 6)`` over the heads'
units, so a fresh cell remembers.

The state is ``(conv window [B, W−1, D], (c, n, m, h) [B, H, P] float32)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common
from recurrent_lm.ops import _checks

_FRESH_M = -1e30


def _headwise(x, kernel):
  """``[B, T, H, P] × [H, P, Q] → [B, T, H, Q]``: one block per head."""
  return jnp.einsum("bthp,hpq->bthq", x, kernel)


def slstm_scan(pre, recurrent, cell, segment_ids=None):
  """Runs the cell (module docstring) over time.

  Args:
    pre: ``[B, T, 4, H, P]`` float32 input parts of the pre-activations
      (``W x + b``), gates in the order i, f, z, o.
    recurrent: ``[4, H, P, P]`` the block-diagonal ``R``.
    cell: ``(c, n, m, h)``, each ``[B, H, P]`` float32.
    segment_ids: ``[B, T]``; the cell restarts fresh where a document starts.

  Returns:
    ``(h [B, T, H, P], cell after the last token)``.
  """
  starts = (jnp.zeros(pre.shape[:2], bool) if segment_ids is None
            else _checks.segment_starts(segment_ids))

  def step(cell, inputs):
    pre_t, start = inputs
    keep = ~start[:, None, None]
    c, n, m, h = (jnp.where(keep, s, fresh) for s, fresh in zip(cell, (0.0, 0.0, _FRESH_M, 0.0)))
    raw = pre_t + jnp.einsum("bhp,ghpq->bghq", h, recurrent)
    i_raw, f_raw, z_raw, o_raw = (raw[:, g] for g in range(4))
    log_f = jax.nn.log_sigmoid(f_raw) + m
    m_new = jnp.maximum(log_f, i_raw)
    i_gate = jnp.exp(i_raw - m_new)
    f_gate = jnp.exp(log_f - m_new)
    c = f_gate * c + i_gate * jnp.tanh(z_raw)
    n = f_gate * n + i_gate
    h = jax.nn.sigmoid(o_raw) * c / n
    return (c, n, m_new, h), h

  cell, hs = jax.lax.scan(step, cell, (jnp.moveaxis(pre, 1, 0), jnp.moveaxis(starts, 1, 0)))
  return jnp.moveaxis(hs, 0, 1), cell


def _forget_bias_init(key, shape, dtype=jnp.float32):
  """``[4, H, P]`` zeros, the forget row ``linspace(3, 6)`` over the H·P units."""
  del key
  bias = jnp.zeros(shape, jnp.float32)
  return bias.at[1].set(jnp.linspace(3.0, 6.0, shape[1] * shape[2]).reshape(shape[1:])
                        ).astype(dtype)


class SLSTM(nn.Module):
  """The sLSTM token mixer (module docstring for the equations).

  Attributes:
    d_model: model width D = H · P.
    num_heads: H.
    conv_width: taps of the causal conv before the i and f gates; 0 for none.
    norm_eps: epsilon of the per-head layer norm.
    dtype: compute dtype of the projections and the output (the cell is float32).
    param_dtype: dtype of the parameters.
  """
  d_model: int
  num_heads: int = 4
  conv_width: int = 4
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _head_dim(self) -> int:
    _common.check_divisible("d_model", self.d_model, "num_heads", self.num_heads)
    if self.conv_width < 0:
      raise ValueError(f"conv_width={self.conv_width}; expected >= 0 (0: no conv)")
    return self.d_model // self.num_heads

  def init_state(self, batch_size: int, dtype=None):
    """``(conv window [B, W−1, D] in dtype, (c, n, m, h) [B, H, P] float32)``, fresh."""
    head_dim = self._head_dim()
    window = jnp.zeros((batch_size, max(self.conv_width - 1, 0), self.d_model),
                       self.dtype if dtype is None else dtype)
    shape = (batch_size, self.num_heads, head_dim)
    cell = (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.full(shape, _FRESH_M, jnp.float32), jnp.zeros(shape, jnp.float32))
    return window, cell

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs the cell over ``x`` ``[B, T, D]``; returns ``(y, state)``."""
    _common.check_input(x, self.d_model)
    head_dim = self._head_dim()
    batch, time, _ = x.shape
    if state is None:
      state = self.init_state(batch)
    window, cell = state
    heads = x.reshape(batch, time, self.num_heads, head_dim)
    if self.conv_width:
      conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
      weight = self.param("conv_weight", nn.with_logical_partitioning(conv_init, ("conv", "embed")),
                          (self.conv_width, self.d_model), self.param_dtype)
      bias = self.param("conv_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  ("embed",)),
                        (self.d_model,), self.param_dtype)
      conv, window = ops.causal_conv1d(x, weight.astype(self.dtype), bias=bias.astype(self.dtype),
                                       state=window.astype(x.dtype), segment_ids=segment_ids)
      conv_heads = jax.nn.silu(conv).reshape(heads.shape)
    else:
      conv_heads = heads
    # xLSTM's "small init": N(0, 2 / (5 P)) per head block.
    block_init = nn.initializers.normal((2 / (5 * head_dim)) ** 0.5)
    kernels = self.param("gates", nn.with_logical_partitioning(
        block_init, (None, "heads", "head_dim", None)),
        (4, self.num_heads, head_dim, head_dim), self.param_dtype).astype(self.dtype)
    recurrent = self.param("recurrent", nn.with_logical_partitioning(
        nn.initializers.zeros, (None, "heads", "head_dim", None)),
        (4, self.num_heads, head_dim, head_dim), self.param_dtype)
    gate_bias = self.param("gate_bias", nn.with_logical_partitioning(
        _forget_bias_init, (None, "heads", "head_dim")),
        (4, self.num_heads, head_dim), self.param_dtype)
    pre = jnp.stack([_headwise(conv_heads, kernels[0]), _headwise(conv_heads, kernels[1]),
                     _headwise(heads, kernels[2]), _headwise(heads, kernels[3])], axis=2)
    pre = pre.astype(jnp.float32) + gate_bias.astype(jnp.float32)
    h, cell = slstm_scan(pre, recurrent.astype(jnp.float32), cell, segment_ids)
    # Layer norm per head (xLSTM's multi-head norm), with a learned scale.
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    scale = self.param("norm_scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                  ("embed",)),
                       (self.d_model,), self.param_dtype)
    y = ((h - mean) * jax.lax.rsqrt(var + self.norm_eps)).reshape(batch, time, self.d_model)
    return (y * scale).astype(self.dtype), (window, cell)
