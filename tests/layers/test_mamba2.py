"""Mamba-2 against a per-token loop of its SSM equations, and its initialisation."""

import jax
import jax.numpy as jnp
import numpy as np

from recurrent_lm import layers
from tests.layers._util import assert_close, params_of, perturb, silu, to_numpy

D = 32


def _reference(p, x, m: layers.Mamba2):
  """Per token: ``h = exp(ΔA) h + Δ x Bᵀ``, ``y = h C + D x``, then the gated norm."""
  batch, time, _ = x.shape
  inner = m.expand * D
  heads, n, groups, width = inner // m.head_dim, m.d_state, m.n_groups, m.conv_width
  z = x @ p["z_proj"]["kernel"]
  xbc = x @ p["xbc_proj"]["kernel"]
  dt = x @ p["dt_proj"]["kernel"]
  padded = np.concatenate([np.zeros((batch, width - 1, xbc.shape[-1])), xbc], 1)
  conv = sum(p["conv_weight"][i] * padded[:, i:i + time] for i in range(width))
  u = silu(conv + p["conv_bias"])
  xs = u[..., :inner].reshape(batch, time, heads, m.head_dim)
  b = u[..., inner:inner + groups * n].reshape(batch, time, groups, n)
  c = u[..., inner + groups * n:].reshape(batch, time, groups, n)
  delta = np.logaddexp(0, dt + p["dt_bias"])
  a = -np.exp(p["A_log"])
  h = np.zeros((batch, heads, m.head_dim, n))
  y = np.zeros((batch, time, heads, m.head_dim))
  for t in range(time):
    for head in range(heads):
      g = head // (heads // groups)
      step = delta[:, t, head, None, None]
      h[:, head] = (np.exp(step * a[head]) * h[:, head]
                    + step * xs[:, t, head, :, None] * b[:, t, g, None, :])
      y[:, t, head] = (np.einsum("bpn,bn->bp", h[:, head], c[:, t, g])
                       + p["D"][head] * xs[:, t, head])
  gated = (y.reshape(batch, time, inner) * silu(z)).reshape(batch, time, groups, -1)
  normed = gated / np.sqrt(np.mean(gated ** 2, -1, keepdims=True) + m.norm_eps)
  out = (normed.reshape(batch, time, inner) * p["norm"]["scale"]) @ p["out_proj"]["kernel"]
  return out, (padded[:, -(width - 1):], h.transpose(0, 1, 3, 2))


def test_matches_a_per_token_loop_of_the_ssm_equations():
  model = layers.Mamba2(D, d_state=4, head_dim=8, n_groups=2, conv_width=3, chunk_size=4)
  x = jax.random.normal(jax.random.key(0), (2, 11, D))
  params = perturb(params_of(model, x))
  y, (conv_state, ssm_state) = jax.jit(model.apply)(params, x)
  y_ref, (conv_ref, ssm_ref) = _reference(to_numpy(params), np.asarray(x, np.float64), model)
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(conv_state, conv_ref, 1e-5, "conv state")
  assert_close(ssm_state, ssm_ref, 1e-5, "ssm state")


def test_init_draws_dt_log_uniformly_in_range_and_a_in_1_to_16_with_d_one():
  model = layers.Mamba2(256, d_state=4, head_dim=2)  # 256 heads to see the ranges
  params = params_of(model, jnp.ones((1, 1, 256)))["params"]
  dt = jax.nn.softplus(params["dt_bias"])
  a = jnp.exp(params["A_log"])
  assert bool(jnp.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))))
  # log-uniform: the median of log dt sits mid-way between log 1e-3 and log 0.1.
  assert abs(float(jnp.median(jnp.log10(dt))) + 2.0) < 0.25
  assert bool(jnp.all((a >= 1.0) & (a <= 16.0)))
  assert float(a.max() - a.min()) > 10.0
  np.testing.assert_array_equal(params["D"], np.ones(256))


def test_state_is_the_last_conv_inputs_and_a_float32_ssm_state():
  conv_state, ssm_state = layers.Mamba2(D, d_state=4, head_dim=8, n_groups=2).init_state(
      3, jnp.bfloat16)
  assert conv_state.shape == (3, 3, 2 * D + 2 * 2 * 4) and conv_state.dtype == jnp.bfloat16
  assert ssm_state.shape == (3, 2 * D // 8, 4, 8) and ssm_state.dtype == jnp.float32
