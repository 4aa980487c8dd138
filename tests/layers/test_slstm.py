"""sLSTM against a python loop over the xLSTM cell equations; long decoding stays finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import layers
from tests.layers._util import assert_close, params_of, perturb, silu, to_numpy

D, HEADS, WIDTH = 16, 4, 4
P = D // HEADS


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _reference(p, x, window, cell):
  """The module docstring's equations, token by token, in float64."""
  b, t, _ = x.shape
  history = np.concatenate([window, x], axis=1)
  c, n, m, h = cell
  ys = []
  for s in range(t):
    conv = silu(np.einsum("bwd,wd->bd", history[:, s:s + WIDTH], p["conv_weight"])
                + p["conv_bias"]).reshape(b, HEADS, P)
    xs = x[:, s].reshape(b, HEADS, P)
    inputs = [conv, conv, xs, xs]
    raw = [np.einsum("bhp,hpq->bhq", inputs[g], p["gates"][g])
           + np.einsum("bhp,hpq->bhq", h, p["recurrent"][g]) + p["gate_bias"][g]
           for g in range(4)]
    log_f = _log_sigmoid(raw[1]) + m
    m = np.maximum(log_f, raw[0])
    i_gate, f_gate = np.exp(raw[0] - m), np.exp(log_f - m)
    c = f_gate * c + i_gate * np.tanh(raw[2])
    n = f_gate * n + i_gate
    h = 1 / (1 + np.exp(-raw[3])) * c / n
    normed = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    ys.append(normed.reshape(b, D) * p["norm_scale"])
  return np.stack(ys, 1), (c, n, m, h)


@pytest.mark.parametrize("fresh", [True, False])
def test_matches_a_loop_over_the_cell_equations(fresh):
  model = layers.SLSTM(D, num_heads=HEADS, conv_width=WIDTH)
  x = jax.random.normal(jax.random.key(0), (2, 9, D))
  window, cell = model.init_state(2)
  if not fresh:   # a state from the middle of a sequence
    keys = jax.random.split(jax.random.key(1), 4)
    window = jax.random.normal(keys[0], window.shape)
    cell = (jax.random.normal(keys[1], cell[0].shape),
            1 + jax.random.uniform(keys[2], cell[1].shape),
            jax.random.normal(keys[3], cell[2].shape), jnp.tanh(cell[0] + 0.3))
  params = perturb(params_of(model, x), scale=0.3)   # R starts at zero: make it count
  y, (new_window, new_cell) = jax.jit(model.apply)(params, x, (window, cell))
  y_ref, cell_ref = _reference(to_numpy(params), np.asarray(x, np.float64),
                               np.asarray(window, np.float64),
                               tuple(np.asarray(c, np.float64) for c in cell))
  assert_close(y, y_ref, 1e-4, "y")
  for name, a, b in zip("cnmh", new_cell, cell_ref):
    assert_close(a, b, 1e-4, name)


def test_a_fresh_cell_reads_no_conv_when_conv_width_is_zero():
  model = layers.SLSTM(D, num_heads=HEADS, conv_width=0)
  x = jax.random.normal(jax.random.key(2), (1, 5, D))
  y, (window, _) = model.apply(params_of(model, x), x)
  assert window.shape == (1, 0, D) and np.isfinite(y).all()


def test_decoding_100k_tokens_keeps_the_state_finite():
  model = layers.SLSTM(D, num_heads=HEADS)
  x = 3.0 * jax.random.normal(jax.random.key(3), (1, 100_000, D))
  params = perturb(params_of(model, x[:, :4]), scale=0.5)
  y, (_, cell) = jax.jit(model.apply)(params, x)
  assert all(np.isfinite(np.asarray(c)).all() for c in cell)
  assert np.isfinite(np.asarray(y)).all()
  assert float(jnp.min(cell[1])) >= 1.0 - 1e-6          # n ≥ 1 after the first step
