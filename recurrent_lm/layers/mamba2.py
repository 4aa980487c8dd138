"""The Mamba-2 block (state-space duality, SSD).

With ``E = expand·D`` inner channels split into ``H = E / P`` heads of width
``P`` (``head_dim``), and ``G`` groups of ``N``-wide (``d_state``) B and C::

    z, x, B, C, dt = W_in x_t                       [E], [E], [G, N], [G, N], [H]
    x, B, C = SiLU(conv_W(x, B, C))                 causal depthwise conv, width W
    Δ_t = softplus(dt_t + dt_bias),   A = −exp(A_log)          one scalar per head
    h_t = exp(Δ_t A) h_{t−1} + Δ_t x_t B_tᵀ         h ∈ R^{P×N} per head
    y_t = h_t C_t + D ⊙ x_t
    out = W_out RMSNorm_G(y ⊙ SiLU(z))

Head ``h`` reads group ``h // (H / G)`` of B and C. The recurrence is
scalar-decay linear attention, run by ``ops.linear_attention`` with
``q = C``, ``k = B``, ``v = Δ·x``, ``log_decay = Δ·A``, ``scale = 1``
(the op's state is ``hᵀ``, ``[N, P]`` per head).

Initialisation as in Mamba-2: ``Δ`` log-uniform in [1e-3, 0.1] floored at
1e-4 with ``dt_bias = softplus⁻¹(Δ)``; ``A_log = log U[1, 16]``; ``D = 1``.
``A_log``, ``D`` and ``dt_bias`` keep these names: training exempts them
from weight decay.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common
from recurrent_lm.layers.norms import GatedRMSNorm

_A_MIN = 1.0
_A_MAX = 16.0


def _a_log_init(key, shape, dtype=jnp.float32):
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, _A_MIN, _A_MAX)).astype(dtype)


class Mamba2(nn.Module):
  """The Mamba-2 token mixer (module docstring for the equations).

  Attributes:
    d_model: model width D.
    d_state: N, width of B and C.
    head_dim: P, channels per head.
    expand: E / D.
    conv_width: W, taps of the causal conv.
    n_groups: G, groups of B and C shared by H / G heads each.
    chunk_size: chunk length of the chunked SSD op.
    norm_eps: ε of the gated output RMSNorm.
    dtype: compute dtype of the projections, the conv and the output.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  d_state: int = 64
  head_dim: int = 64
  expand: int = 2
  conv_width: int = 4
  n_groups: int = 1
  chunk_size: int = 64
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dims(self) -> tuple[int, int, int]:
    """``(inner width E, heads H, conv channels E + 2GN)``, validated."""
    inner = self.expand * self.d_model
    _common.check_divisible("inner width expand*d_model", inner, "head_dim", self.head_dim)
    heads = inner // self.head_dim
    _common.check_divisible("num_heads", heads, "n_groups", self.n_groups)
    if self.conv_width < 1:
      raise ValueError(f"conv_width={self.conv_width}; expected a positive int")
    return inner, heads, inner + 2 * self.n_groups * self.d_state

  def init_state(self, batch_size: int, dtype=None):
    """``(conv_state, ssm_state)`` of a fresh sequence, zeros.

    Args:
      batch_size: B.
      dtype: dtype of ``conv_state`` ``[B, W − 1, E + 2GN]`` (the last conv
        inputs); ``self.dtype`` if None. ``ssm_state`` ``[B, H, N, P]`` is float32.
    """
    _, heads, conv_dim = self._dims()
    conv_state = jnp.zeros((batch_size, self.conv_width - 1, conv_dim),
                           self.dtype if dtype is None else dtype)
    ssm_state = jnp.zeros((batch_size, heads, self.d_state, self.head_dim), jnp.float32)
    return conv_state, ssm_state

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs the block over ``x``.

    Args:
      x: ``[B, T, D]``.
      state: ``(conv_state, ssm_state)`` as from ``init_state``, or None at a
        sequence start.
      segment_ids: ``[B, T]`` document ids; the conv window and the SSM state
        reset where the id changes.

    Returns:
      ``(y, (conv_state, ssm_state))``: ``y`` ``[B, T, D]`` in ``dtype``.
    """
    _common.check_input(x, self.d_model)
    inner, heads, conv_dim = self._dims()
    batch, time, _ = x.shape
    groups, d_state, head_dim = self.n_groups, self.d_state, self.head_dim
    if state is None:
      state = self.init_state(batch)
    conv_state, ssm_state = state
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    z = _common.dense(inner, ("embed", "mlp"), name="z_proj", **proj)(x)
    xbc = _common.dense(conv_dim, ("embed", "mlp"), name="xbc_proj", **proj)(x)
    dt = _common.dense(heads, ("embed", "heads"), name="dt_proj", **proj)(x)

    # PyTorch's Conv1d default: U(±1/√fan_in) with fan_in = W for a depthwise conv.
    conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    conv_weight = self.param(
        "conv_weight", nn.with_logical_partitioning(conv_init, ("conv", "mlp")),
        (self.conv_width, conv_dim), self.param_dtype)
    conv_bias = self.param(
        "conv_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        (conv_dim,), self.param_dtype)
    xbc, new_conv_state = ops.causal_conv1d(
        xbc, conv_weight.astype(self.dtype), bias=conv_bias.astype(self.dtype),
        state=conv_state, segment_ids=segment_ids)
    xbc = jax.nn.silu(xbc)
    xs, b, c = jnp.split(xbc, [inner, inner + groups * d_state], axis=-1)
    xs = xs.reshape(batch, time, heads, head_dim)
    # Group-major heads: head h reads group h // (H / G).
    b = jnp.repeat(b.reshape(batch, time, groups, d_state), heads // groups, axis=2)
    c = jnp.repeat(c.reshape(batch, time, groups, d_state), heads // groups, axis=2)

    dt_bias = self.param("dt_bias", nn.with_logical_partitioning(_common.dt_bias_init, ("heads",)),
                         (heads,), self.param_dtype)
    a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init, ("heads",)),
                       (heads,), self.param_dtype)
    skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("heads",)),
                      (heads,), self.param_dtype)
    delta = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias)                # [B, T, H]
    log_decay = delta * -jnp.exp(a_log.astype(jnp.float32))
    xs32 = xs.astype(jnp.float32)
    y, new_ssm_state = ops.linear_attention(
        c.astype(jnp.float32), b.astype(jnp.float32), delta[..., None] * xs32,
        log_decay=log_decay, scale=1.0, initial_state=ssm_state,
        segment_ids=segment_ids, chunk_size=self.chunk_size)
    y = y.astype(jnp.float32) + skip[:, None] * xs32
    y = GatedRMSNorm(num_groups=groups, norm_before_gate=False, eps=self.norm_eps,
                     axis_name="mlp", dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(y.reshape(batch, time, inner), z)
    out = _common.dense(self.d_model, ("mlp", "embed"), name="out_proj", **proj)(y)
    return out, (new_conv_state.astype(conv_state.dtype), new_ssm_state)
