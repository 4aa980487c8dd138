"""LinearAttention against a per-token loop: Based (Taylor, normalised) and plain."""

import jax
import numpy as np
import pytest

from recurrent_lm import layers
from tests.layers._util import assert_close, params_of, perturb, to_numpy

D, HEADS = 32, 2


def _taylor(x):
  """Based's ``φ(x) = [1, x / d^{1/4}, vec(x ⊗ x) / (√2 √d)]``."""
  d = x.shape[-1]
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
  return np.concatenate(
      [np.ones(x.shape[:-1] + (1,)), x / d ** 0.25, outer / (np.sqrt(2) * np.sqrt(d))], -1)


def _elu_plus_one(x):
  return np.where(x > 0, x + 1, np.exp(x))


def _reference(p, x, phi, normalize, scale):
  """``S += φ(k) vᵀ``, ``z += φ(k)``; ``o = s φ(q)ᵀ S`` or ``φ(q)ᵀ S / φ(q)ᵀ z``."""
  def heads(name):
    return np.einsum("btd,dhk->bthk", x, p[name]["kernel"])

  q, k, v = phi(heads("q_proj")), phi(heads("k_proj")), heads("v_proj")
  batch, time, heads_, dim = k.shape
  s = np.zeros((batch, heads_, dim, v.shape[-1]))
  z = np.zeros((batch, heads_, dim))
  o = np.zeros(v.shape)
  for t in range(time):
    s = s + k[:, t, :, :, None] * v[:, t, :, None, :]
    z = z + k[:, t]
    num = np.einsum("bhk,bhkv->bhv", q[:, t], s)
    o[:, t] = num / np.einsum("bhk,bhk->bh", q[:, t], z)[..., None] if normalize else scale * num
  return np.einsum("bthv,hvd->btd", o, p["o_proj"]["kernel"])


@pytest.mark.parametrize("feature_map, phi, normalize, scale, feature_dim", [
    ("taylor", _taylor, True, None, 6),            # the Based linear layer
    ("elu_plus_one", _elu_plus_one, False, 0.5, None),
], ids=["based", "elu_plus_one"])
def test_matches_a_per_token_loop_of_the_linear_attention_equations(
    feature_map, phi, normalize, scale, feature_dim):
  model = layers.LinearAttention(D, num_heads=HEADS, feature_dim=feature_dim,
                                 feature_map=feature_map, normalize=normalize, scale=scale,
                                 chunk_size=4)
  x = jax.random.normal(jax.random.key(0), (2, 11, D))
  params = perturb(params_of(model, x))
  y, _ = jax.jit(model.apply)(params, x)
  y_ref = _reference(to_numpy(params), np.asarray(x, np.float64), phi, normalize, scale)
  # The op's ε in the denominator (≥ 1/2 for the Taylor map) stays below the tolerance.
  assert_close(y, y_ref, 1e-4, "y")


def test_based_state_is_the_taylor_feature_width_with_a_normaliser():
  s, z = layers.LinearAttention(D, num_heads=HEADS, feature_dim=16, feature_map="taylor",
                                normalize=True).init_state(3)
  assert s.shape == (3, HEADS, 1 + 16 + 16 * 16, D // HEADS)
  assert z.shape == (3, HEADS, 1 + 16 + 16 * 16)
