"""Feature maps: the Taylor kernel identity and positivity, shapes, dtypes,
the softmax simplex, and lookup by name."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm.ops import feature_maps

# Counter-based "rbg" keys: threefry's compile time would dominate these small tests.
_key = functools.partial(jax.random.key, impl="rbg")

# float32 sums of d² products of O(1) values.
ATOL = 1e-4
RTOL = 1e-5


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(_key(seed), shape)


def test_taylor_dot_product_is_second_order_exp_expansion():
  d = 6
  q, k = _normal(0, (32, d), 1.5), _normal(1, (32, d), 1.5)
  got = jnp.sum(feature_maps.taylor(q) * feature_maps.taylor(k), axis=-1)
  z = np.sum(np.asarray(q, np.float64) * np.asarray(k, np.float64), axis=-1)
  np.testing.assert_allclose(got, 1 + z / np.sqrt(d) + z**2 / (2 * d), atol=ATOL, rtol=RTOL)


def test_taylor_kernel_is_at_least_one_half():
  # 1 + s + s²/2 has its minimum 1/2 at s = −1: the kernel is never ≤ 0.
  d = 4
  q, k = _normal(2, (512, d), 3.0), _normal(3, (512, d), 3.0)
  kernel = jnp.sum(feature_maps.taylor(q) * feature_maps.taylor(k), axis=-1)
  assert float(kernel.min()) >= 0.5 - 1e-5
  # Some pairs come close, so the bound is tight, not vacuous.
  assert float(kernel.min()) < 0.6


@pytest.mark.parametrize("name", feature_maps.NAMES)
def test_output_shape_matches_output_dim(name):
  x = _normal(4, (2, 3, 4, 5))
  y = feature_maps.get(name)(x)
  assert y.shape == (2, 3, 4, feature_maps.output_dim(name, 5))


def test_taylor_output_dim_is_one_plus_d_plus_d_squared():
  assert feature_maps.output_dim("taylor", 16) == 1 + 16 + 256


@pytest.mark.parametrize("name,dtype", [
    ("identity", jnp.bfloat16), ("elu_plus_one", jnp.bfloat16), ("relu", jnp.bfloat16),
    ("softmax", jnp.bfloat16), ("taylor", jnp.float32)])
def test_output_dtype_on_bfloat16_input(name, dtype):
  y = feature_maps.get(name)(_normal(5, (3, 8)).astype(jnp.bfloat16))
  assert y.dtype == dtype


def test_softmax_is_positive_and_sums_to_one_over_head_dim():
  y = feature_maps.softmax(_normal(6, (4, 7, 16), 4.0))
  assert float(y.min()) > 0
  np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-6)


def test_elu_plus_one_is_x_plus_one_above_zero_and_exp_below():
  x = _normal(7, (256,), 3.0)
  y = feature_maps.elu_plus_one(x)
  assert float(y.min()) > 0
  # expm1(x) + 1 in float32: absolute, not relative, accuracy near zero.
  np.testing.assert_allclose(y[x > 0], x[x > 0] + 1, rtol=1e-6)
  np.testing.assert_allclose(y[x <= 0], np.exp(x[x <= 0]), atol=1e-6)


def test_relu_zeroes_negatives_only():
  x = _normal(8, (256,))
  np.testing.assert_array_equal(feature_maps.relu(x), np.where(x > 0, x, 0))


def test_get_returns_the_named_map():
  assert feature_maps.get("taylor") is feature_maps.taylor
  assert feature_maps.get("identity") is feature_maps.identity


def test_unknown_name_raises_listing_valid_names():
  expected = (r"^feature map 'cosine' is unknown; "
              r"expected one of identity, elu_plus_one, relu, taylor, softmax$")
  with pytest.raises(ValueError, match=expected):
    feature_maps.get("cosine")
  with pytest.raises(ValueError, match=expected):
    feature_maps.output_dim("cosine", 4)
