"""GatedLinearAttention against a per-token loop of the GLA equations."""

import jax
import jax.numpy as jnp
import numpy as np

from recurrent_lm import layers
from tests.layers._util import assert_close, params_of, perturb, silu, to_numpy

D, HEADS = 32, 2


def _log_sigmoid(x):
  return -np.logaddexp(0, -x)


def _reference(p, x, s, normalizer=16.0):
  """``S = diag(exp(logσ(W_2 W_1 x + b_2)/16)) S + k vᵀ``, ``o = K^{−1/2} qᵀ S``.

  ``y = W_o (RMSNorm(o) ⊙ swish(g))`` per head.
  """
  def heads(name):
    return np.einsum("btd,dhk->bthk", x, p[name]["kernel"])

  q, k, v, g = heads("q_proj"), heads("k_proj"), heads("v_proj"), heads("g_proj")
  gate = np.einsum("btr,rhk->bthk", x @ p["gk_down"]["kernel"], p["gk_up"]["kernel"])
  log_decay = _log_sigmoid(gate + p["gk_up"]["bias"]) / normalizer
  key_dim = q.shape[-1]
  o = np.zeros(v.shape)
  for t in range(x.shape[1]):
    s = np.exp(log_decay[:, t])[..., None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
    o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t] * key_dim ** -0.5, s)
  normed = o / np.sqrt(np.mean(o ** 2, -1, keepdims=True) + 1e-5) * p["g_norm"]["scale"]
  y = np.einsum("bthv,hvd->btd", normed * silu(g), p["o_proj"]["kernel"])
  return y, s


def test_matches_a_per_token_loop_of_the_gla_equations_from_a_given_state():
  model = layers.GatedLinearAttention(D, num_heads=HEADS, chunk_size=4)
  x = jax.random.normal(jax.random.key(0), (2, 11, D))
  s0 = jax.random.normal(jax.random.key(1), model.init_state(2).shape)
  params = perturb(params_of(model, x))
  y, s = jax.jit(model.apply)(params, x, s0)
  y_ref, s_ref = _reference(to_numpy(params), np.asarray(x, np.float64), np.asarray(s0, np.float64))
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(s, s_ref, 1e-5, "state")


def test_key_and_value_widths_follow_expand_k_and_expand_v():
  state = layers.GatedLinearAttention(D, num_heads=HEADS).init_state(3)
  assert state.shape == (3, HEADS, D // 2 // HEADS, D // HEADS) and state.dtype == jnp.float32
