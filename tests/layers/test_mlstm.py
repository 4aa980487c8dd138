"""The xLSTM-7B mLSTM layer against a python loop over its equations."""

import jax
import numpy as np

from recurrent_lm import layers
from tests.layers._util import assert_close, params_of, perturb, to_numpy

D, HEADS = 16, 2
K, V = D // 2 // HEADS, D // HEADS


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _reference(p, x, state):
  """Projections, soft-capped gates, the stabilised matrix memory, per-head RMS norm."""
  c, n, m = state
  cap = lambda a: 15 * np.tanh(a / 15)
  q = np.einsum("btd,dhk->bthk", x, p["q_proj"]["kernel"])
  k = np.einsum("btd,dhk->bthk", x, p["k_proj"]["kernel"]) / np.sqrt(K)
  v = np.einsum("btd,dhk->bthk", x, p["v_proj"]["kernel"])
  i_raw = cap(x @ p["input_gate"]["kernel"] + p["input_gate"]["bias"])
  f_raw = cap(x @ p["forget_gate"]["kernel"] + p["forget_gate"]["bias"])
  o = 1 / (1 + np.exp(-np.einsum("btd,dhk->bthk", x, p["o_proj"]["kernel"])))
  ys = []
  for t in range(x.shape[1]):
    log_f = _log_sigmoid(f_raw[:, t]) + m
    m_new = np.maximum(log_f, i_raw[:, t])
    f_gate, i_gate = np.exp(log_f - m_new), np.exp(i_raw[:, t] - m_new)
    c = f_gate[..., None, None] * c + i_gate[..., None, None] * np.einsum(
        "bhk,bhv->bhkv", k[:, t], v[:, t])
    n = f_gate[..., None] * n + i_gate[..., None] * k[:, t]
    m = m_new
    num = np.einsum("bhk,bhkv->bhv", q[:, t], c)
    den = np.maximum(np.abs(np.einsum("bhk,bhk->bh", q[:, t], n)), np.exp(-m)) + 1e-6
    h = num / den[..., None]
    h = h / np.sqrt(np.mean(h ** 2, -1, keepdims=True) + 1e-6) * p["norm_scale"]
    ys.append(np.einsum("bhv,hvd->bd", o[:, t] * h, p["out_proj"]["kernel"]))
  return np.stack(ys, 1), (c, n, m)


def test_matches_a_loop_over_the_equations_from_a_given_state():
  model = layers.MLSTM(D, num_heads=HEADS, chunk_size=4)
  x = jax.random.normal(jax.random.key(0), (2, 11, D))
  keys = jax.random.split(jax.random.key(1), 3)
  state = (jax.random.normal(keys[0], (2, HEADS, K, V)),
           jax.random.normal(keys[1], (2, HEADS, K)), jax.random.normal(keys[2], (2, HEADS)))
  params = perturb(params_of(model, x), scale=0.3)
  y, new_state = jax.jit(model.apply)(params, x, state)
  y_ref, state_ref = _reference(to_numpy(params), np.asarray(x, np.float64),
                                tuple(np.asarray(s, np.float64) for s in state))
  assert_close(y, y_ref, 1e-4, "y")
  for name, a, b in zip(("C", "n", "m"), new_state, state_ref):
    assert_close(a, b, 1e-4, name)


def test_gate_biases_start_closed_input_and_remembering_forget():
  params = params_of(layers.MLSTM(32, num_heads=4), np.zeros((1, 2, 32), np.float32))["params"]
  np.testing.assert_array_equal(params["input_gate"]["bias"], -10.0)
  np.testing.assert_allclose(params["forget_gate"]["bias"], np.linspace(3, 6, 4), rtol=1e-6)
