"""QLSTM against a python loop over the Languini quasi-LSTM gate equations."""

import jax
import jax.numpy as jnp
import numpy as np

from recurrent_lm import layers
from tests.layers._util import assert_close, params_of, perturb, sigmoid, to_numpy

D, HEADS, HEAD_DIM = 32, 4, 6


def _reference(p, x, c):
  """``c_t = σ(W_f x + b_f + 1) c_{t−1} + σ(W_i x + b_i) tanh(W_z x + b_z)``.

  ``h_t = σ(W_o x + b_o) tanh(c_t)``, ``y_t = W_out h_t + b_out``.
  """
  w, b = p["gates"]["kernel"], p["gates"]["bias"]         # [D, 4, H, P], [4, H, P]
  ys = []
  for t in range(x.shape[1]):
    pre = np.einsum("bd,dghp->bghp", x[:, t], w) + b
    f = sigmoid(pre[:, 0] + 1.0)
    i = sigmoid(pre[:, 1])
    z = np.tanh(pre[:, 2])
    o = sigmoid(pre[:, 3])
    c = f * c + i * z
    h = o * np.tanh(c)
    ys.append(np.einsum("bhp,hpd->bd", h, p["out_proj"]["kernel"]) + p["out_proj"]["bias"])
  return np.stack(ys, 1), c


def test_matches_a_loop_over_the_gate_equations_from_a_given_cell():
  model = layers.QLSTM(D, num_heads=HEADS, head_dim=HEAD_DIM)  # H·P = 24 ≠ D
  x = jax.random.normal(jax.random.key(0), (2, 13, D))
  c0 = jax.random.normal(jax.random.key(1), (2, HEADS, HEAD_DIM))
  params = perturb(params_of(model, x))
  y, c = jax.jit(model.apply)(params, x, c0)
  y_ref, c_ref = _reference(to_numpy(params), np.asarray(x, np.float64), np.asarray(c0, np.float64))
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(c, c_ref, 1e-5, "cell")


def test_cell_state_is_float32_per_head():
  state = layers.QLSTM(D, num_heads=HEADS).init_state(3, jnp.bfloat16)
  assert state.shape == (3, HEADS, D // HEADS) and state.dtype == jnp.float32
