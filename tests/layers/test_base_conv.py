"""BaseConv against a python loop over its equations (BASED's gated short conv)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import layers
from tests.layers._util import assert_close, params_of, perturb, silu, to_numpy

D, WIDTH = 16, 3


def _reference(p, x, window):
  """``[u, g] = W_in x + b_in``; ``y = W_out (SiLU(Σ_i w_i u_{t−W+1+i}) ⊙ g) + b_out``."""
  inner = p["conv_weight"].shape[1]
  ug = np.einsum("btd,de->bte", x, p["in_proj"]["kernel"]) + p["in_proj"]["bias"]
  u, g = ug[..., :inner], ug[..., inner:]
  history = np.concatenate([window, u], axis=1)               # [B, W−1+T, E]
  ys = []
  for t in range(x.shape[1]):
    conv = np.einsum("bwe,we->be", history[:, t:t + WIDTH], p["conv_weight"])
    ys.append((silu(conv) * g[:, t]) @ p["out_proj"]["kernel"] + p["out_proj"]["bias"])
  return np.stack(ys, 1), history[:, -(WIDTH - 1):]


@pytest.mark.parametrize("expand", [2, 4])
def test_matches_a_loop_over_the_equations_from_a_given_window(expand):
  model = layers.BaseConv(D, kernel_size=WIDTH, expand=expand)
  x = jax.random.normal(jax.random.key(0), (2, 11, D))
  window = jax.random.normal(jax.random.key(1), (2, WIDTH - 1, expand * D // 2))
  params = perturb(params_of(model, x))
  y, new_window = jax.jit(model.apply)(params, x, window)
  y_ref, window_ref = _reference(to_numpy(params), np.asarray(x, np.float64),
                                 np.asarray(window, np.float64))
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(new_window, window_ref, 1e-6, "window")


def test_state_is_the_conv_window():
  state = layers.BaseConv(D, kernel_size=4, expand=4).init_state(3, jnp.bfloat16)
  assert state.shape == (3, 3, 2 * D) and state.dtype == jnp.bfloat16


def test_odd_projection_width_is_one_clear_error():
  with pytest.raises(ValueError, match=r"expand \* d_model=15 is not divisible by 2"):
    layers.BaseConv(5, expand=3).init_state(1)
