"""MLPs against their formulas."""

import jax
import numpy as np

from recurrent_lm import layers
from tests.layers._util import assert_close, params_of, perturb, silu, to_numpy

D, HIDDEN = 16, 40


def _x():
  return jax.random.normal(jax.random.key(0), (2, 5, D))


def test_swiglu_is_down_of_silu_gate_times_up():
  model = layers.SwiGLU(HIDDEN)
  x = _x()
  params = params_of(model, x)
  p, x64 = to_numpy(params), np.asarray(x, np.float64)
  hidden = silu(x64 @ p["gate_proj"]["kernel"]) * (x64 @ p["up_proj"]["kernel"])
  assert_close(model.apply(params, x), hidden @ p["down_proj"]["kernel"], 1e-5)


def test_gelu_mlp_is_two_affine_maps_around_tanh_gelu():
  model = layers.GeluMLP(HIDDEN)
  x = _x()
  params = perturb(params_of(model, x))
  p, x64 = to_numpy(params), np.asarray(x, np.float64)
  pre = x64 @ p["fc_in"]["kernel"] + p["fc_in"]["bias"]
  gelu = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
  expected = gelu @ p["fc_out"]["kernel"] + p["fc_out"]["bias"]
  assert_close(model.apply(params, x), expected, 1e-5)


def test_mlps_map_model_width_to_model_width_through_the_hidden_width():
  x = _x()
  for model in (layers.SwiGLU(HIDDEN), layers.GeluMLP(HIDDEN)):
    params = params_of(model, x)
    assert model.apply(params, x).shape == x.shape
    kernels = [p.shape for p in jax.tree_util.tree_leaves(params) if p.ndim == 2]
    assert sorted(kernels) == sorted([(D, HIDDEN)] * (len(kernels) - 1) + [(HIDDEN, D)])
