"""Helpers of the layer tests: a scale-relative closeness check and parameter handling."""

import flax.linen as nn
import jax
import numpy as np


def assert_close(actual, expected, rtol=1e-4, what="value"):
  """Asserts ``max |actual − expected| ≤ rtol · max |expected|``.

  Relative to the array's scale rather than per element, so entries that
  happen to be near zero do not demand an absolute precision float32 lacks.
  """
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  scale = max(float(np.max(np.abs(expected))), 1e-30)
  err = float(np.max(np.abs(actual - expected)))
  assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x scale {scale:.3g}"


def assert_trees_close(actual, expected, rtol=1e-4, what="state"):
  """``assert_close`` on every float leaf; integer leaves must be equal."""
  paths_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  leaves_e, tree_e = jax.tree_util.tree_flatten(expected)
  assert tree_a == tree_e, f"{what}: structure {tree_a} != {tree_e}"
  for (path, a), e in zip(paths_a, leaves_e):
    name = f"{what}{jax.tree_util.keystr(path)}"
    if np.issubdtype(np.asarray(e).dtype, np.integer):
      np.testing.assert_array_equal(a, e, err_msg=name)
    else:
      assert_close(a, e, rtol, name)


def params_of(model, *inputs, seed=0):
  """Fresh parameters of ``model`` for ``inputs``, without partitioning boxes."""
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), *inputs))


def perturb(params, seed=1, scale=0.1):
  """Adds N(0, scale²) noise to every parameter.

  Reference tests use this so that parameters initialised to exactly 0 or 1
  (biases, norm scales, ``D``) cannot hide a term left out of the layer. The
  noise is drawn by numpy: one ``jax.random`` call per parameter shape would
  compile once per shape.
  """
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + (scale * rng.standard_normal(p.shape)).astype(p.dtype), params)


def to_numpy(params):
  """Parameters as a nested dict of float64 numpy arrays, for numpy references."""
  return jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64), params["params"])


def silu(x):
  return x / (1 + np.exp(-x))


def sigmoid(x):
  return 1 / (1 + np.exp(-x))
