"""The closeness check of the op tests: max|x − ref| / max|ref| per array."""

import jax
import numpy as np


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-12))


def assert_close(tree, ref_tree, tol, what=""):
  """Every leaf finite, of the reference's shape, within ``tol`` relative error."""
  leaves, ref_leaves = jax.tree.leaves(tree), jax.tree.leaves(ref_tree)
  assert len(leaves) == len(ref_leaves), what
  for i, (x, ref) in enumerate(zip(leaves, ref_leaves)):
    assert x.shape == ref.shape, (what, i, x.shape, ref.shape)
    assert np.all(np.isfinite(np.asarray(x, np.float32))), (what, i)
    err = rel_err(x, ref)
    assert err <= tol, f"{what} leaf {i}: relative error {err:.3g} > {tol}"
