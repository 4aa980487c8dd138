"""Mamba (S6) against a python loop over its equations, and its initialisation."""

import jax
import jax.numpy as jnp
import numpy as np

from recurrent_lm import layers
from tests.layers._util import assert_close, params_of, perturb, silu, to_numpy

D, N, WIDTH = 16, 4, 4


def _softplus(x):
  return np.log1p(np.exp(x))


def _reference(p, u, window, h):
  """The module docstring's equations, token by token, in float64."""
  inner = p["D"].shape[0]
  rank = p["dt_proj"]["kernel"].shape[0]
  xz = u @ p["in_proj"]["kernel"]
  x, z = xz[..., :inner], xz[..., inner:]
  history = np.concatenate([window, x], axis=1)
  a = -np.exp(p["A_log"])                                          # [E, N]
  ys = []
  for t in range(u.shape[1]):
    xt = silu(np.einsum("bwe,we->be", history[:, t:t + WIDTH], p["conv_weight"])
              + p["conv_bias"])
    low_bc = xt @ p["x_proj"]["kernel"]
    low, b, c = low_bc[:, :rank], low_bc[:, rank:rank + N], low_bc[:, rank + N:]
    delta = _softplus(low @ p["dt_proj"]["kernel"] + p["dt_bias"])  # [B, E]
    h = np.exp(delta[..., None] * a) * h + delta[..., None] * b[:, None, :] * xt[..., None]
    y = np.einsum("ben,bn->be", h, c) + p["D"] * xt
    ys.append((y * silu(z[:, t])) @ p["out_proj"]["kernel"])
  return np.stack(ys, 1), history[:, -(WIDTH - 1):], h


def test_matches_a_loop_over_the_equations_from_a_given_state():
  model = layers.Mamba(D, d_state=N, conv_width=WIDTH)
  u = jax.random.normal(jax.random.key(0), (2, 9, D))
  window = jax.random.normal(jax.random.key(1), (2, WIDTH - 1, 2 * D))
  h0 = jax.random.normal(jax.random.key(2), (2, 2 * D, N))
  params = perturb(params_of(model, u))
  y, (new_window, h) = jax.jit(model.apply)(params, u, (window, h0))
  y_ref, window_ref, h_ref = _reference(to_numpy(params), *(np.asarray(a, np.float64)
                                                            for a in (u, window, h0)))
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(new_window, window_ref, 1e-6, "window")
  assert_close(h, h_ref, 1e-5, "h")


def test_initialisation_follows_the_reference():
  model = layers.Mamba(32, d_state=N)
  params = params_of(model, jnp.zeros((1, 3, 32)))["params"]
  np.testing.assert_allclose(np.exp(params["A_log"]), np.tile(np.arange(1, N + 1), (64, 1)),
                             rtol=1e-6)
  np.testing.assert_array_equal(params["D"], 1.0)
  step = np.log1p(np.exp(np.asarray(params["dt_bias"])))
  assert step.min() >= 1e-4 and step.max() <= 0.1 + 1e-6
  assert params["dt_proj"]["kernel"].shape == (2, 64)                 # rank ⌈32/16⌉
  assert np.abs(params["dt_proj"]["kernel"]).max() <= 2 ** -0.5
