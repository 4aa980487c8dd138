"""The Mamba (S6) token mixer (Gu & Dao, 2023).

With inner width ``E = expand · D``, state size ``N`` and ``R = ⌈D / 16⌉``::

    [x, z]  = W_in u                                  x, z: [B, T, E]
    x       = SiLU(conv_W(x) + b_conv)                causal depthwise conv, W = 4
    [δ, B, C] = W_x x                                 δ: [B, T, R]; B, C: [B, T, N]
    Δ       = softplus(W_dt δ + b_dt)                 [B, T, E], one step per channel
    h_t     = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t x_t      A = −exp(A_log): [E, N]   (ops.selective_scan)
    y_t     = C_t · h_t + D ⊙ x_t
    out     = W_out (y ⊙ SiLU(z))

Initialisation as in the reference: ``A_log[e, n] = log(n + 1)`` (S4D-real),
``D = 1``, ``b_dt = softplus⁻¹(Δ)`` with Δ log-uniform in [1e-3, 0.1],
``W_dt`` uniform in ±R^{-1/2}. The state is ``(conv window [B, W−1, E],
h [B, E, N] float32)``. ``A_log``, ``D`` and ``dt_bias`` keep these names:
training exempts them from weight decay.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common


def _a_log_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)),
                          shape).astype(dtype)


class Mamba(nn.Module):
  """The Mamba-1 block's mixer (module docstring for the equations).

  Attributes:
    d_model: model width D.
    d_state: state size N per channel (16 in Mamba).
    expand: inner width ``E = expand · D``.
    conv_width: W, taps of the causal conv.
    dt_rank: rank R of the step-size projection; ``⌈D / 16⌉`` if None.
    dtype: compute dtype of the projections, the conv and the output.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  d_state: int = 16
  expand: int = 2
  conv_width: int = 4
  dt_rank: int | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dims(self) -> tuple[int, int]:
    for name, value in (("d_state", self.d_state), ("expand", self.expand),
                        ("conv_width", self.conv_width)):
      if value < 1:
        raise ValueError(f"{name}={value}; expected a positive int")
    rank = -(-self.d_model // 16) if self.dt_rank is None else self.dt_rank
    return self.expand * self.d_model, rank

  def init_state(self, batch_size: int, dtype=None):
    """``(conv window [B, W−1, E] in dtype, h [B, E, N] float32)``, zeros."""
    inner, _ = self._dims()
    window = jnp.zeros((batch_size, self.conv_width - 1, inner),
                       self.dtype if dtype is None else dtype)
    return window, jnp.zeros((batch_size, inner, self.d_state), jnp.float32)

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs the selective SSM over ``x`` ``[B, T, D]``; returns ``(y, state)``."""
    _common.check_input(x, self.d_model)
    inner, rank = self._dims()
    if state is None:
      state = self.init_state(x.shape[0])
    window, ssm_state = state
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    xs, z = jnp.split(_common.dense(2 * inner, ("embed", "mlp"), name="in_proj", **proj)(x),
                      2, axis=-1)
    conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    conv_weight = self.param("conv_weight",
                             nn.with_logical_partitioning(conv_init, ("conv", "mlp")),
                             (self.conv_width, inner), self.param_dtype)
    conv_bias = self.param("conv_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                     ("mlp",)),
                           (inner,), self.param_dtype)
    xs, window = ops.causal_conv1d(xs, conv_weight.astype(self.dtype),
                                   bias=conv_bias.astype(self.dtype),
                                   state=window.astype(xs.dtype), segment_ids=segment_ids)
    xs = jax.nn.silu(xs)
    low, b, c = jnp.split(
        _common.dense(rank + 2 * self.d_state, ("mlp", None), name="x_proj", **proj)(xs),
        [rank, rank + self.d_state], axis=-1)
    dt = _common.dense(inner, (None, "mlp"), name="dt_proj", **proj,
                       kernel_init=_uniform(rank ** -0.5))(low)
    dt_bias = self.param("dt_bias", nn.with_logical_partitioning(_common.dt_bias_init, ("mlp",)),
                         (inner,), self.param_dtype)
    a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init, ("mlp", None)),
                       (inner, self.d_state), self.param_dtype)
    skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
                      (inner,), self.param_dtype)
    delta = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))
    y, ssm_state = ops.selective_scan(
        xs.astype(jnp.float32), delta, -jnp.exp(a_log.astype(jnp.float32)),
        b.astype(jnp.float32), c.astype(jnp.float32), D=skip.astype(jnp.float32),
        initial_state=ssm_state, segment_ids=segment_ids)
    y = (y * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype)
    return (_common.dense(self.d_model, ("mlp", "embed"), name="out_proj", **proj)(y),
            (window, ssm_state))


def _uniform(bound: float):
  """U(−bound, bound), the reference's ``dt_proj`` weight initialisation."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init
