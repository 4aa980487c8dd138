"""Norms against their formulas, with random (not unit) scales and biases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import layers
from tests.layers._util import assert_close, params_of, perturb, silu, to_numpy

C = 24


def _x(seed=0, shape=(2, 5, C)):
  return 3.0 * jax.random.normal(jax.random.key(seed), shape) + 0.5


def test_rms_norm_divides_by_the_root_mean_square_and_scales():
  model = layers.RMSNorm()
  x = _x()
  params = perturb(params_of(model, x), scale=0.5)
  x64, scale = np.asarray(x, np.float64), to_numpy(params)["scale"]
  expected = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-6) * scale
  assert_close(model.apply(params, x), expected, 1e-5)


def test_layer_norm_centres_divides_by_the_std_scales_and_shifts():
  model = layers.LayerNorm()
  x = _x()
  params = perturb(params_of(model, x), scale=0.5)
  p, x64 = to_numpy(params), np.asarray(x, np.float64)
  centred = x64 - x64.mean(-1, keepdims=True)
  expected = centred / np.sqrt(np.var(x64, -1, keepdims=True) + 1e-5) * p["scale"] + p["bias"]
  assert_close(model.apply(params, x), expected, 1e-5)


@pytest.mark.parametrize("norm_before_gate", [False, True],
                         ids=["gate_then_norm", "norm_then_gate"])
def test_gated_rms_norm_normalises_each_group_and_gates_with_silu(norm_before_gate):
  model = layers.GatedRMSNorm(num_groups=3, norm_before_gate=norm_before_gate)
  x, gate = _x(0), _x(1)
  params = perturb(params_of(model, x, gate), scale=0.5)
  scale = to_numpy(params)["scale"]
  x64, g64 = np.asarray(x, np.float64), np.asarray(gate, np.float64)
  pre = x64 if norm_before_gate else x64 * silu(g64)
  groups = pre.reshape(2, 5, 3, C // 3)
  normed = (groups / np.sqrt(np.mean(groups ** 2, -1, keepdims=True) + 1e-5)).reshape(2, 5, C)
  expected = normed * scale * (silu(g64) if norm_before_gate else 1.0)
  assert_close(model.apply(params, x, gate), expected, 1e-5)


def test_norms_return_their_compute_dtype_with_float32_params():
  x = _x().astype(jnp.bfloat16)
  for model in (layers.RMSNorm(dtype=jnp.bfloat16), layers.LayerNorm(dtype=jnp.bfloat16)):
    params = params_of(model, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert model.apply(params, x).dtype == jnp.bfloat16


def test_gated_rms_norm_rejects_groups_that_do_not_divide_the_channels():
  model = layers.GatedRMSNorm(num_groups=5)
  x = _x()
  with pytest.raises(ValueError, match="channels=24 is not divisible by num_groups=5"):
    model.init(jax.random.key(0), x, x)
