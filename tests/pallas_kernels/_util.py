"""Shared pieces of the kernel tests."""

import jax.numpy as jnp

from tests.ops._close import assert_close

# Interpret-mode programs are large; these options cut their compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def assert_outputs_and_grads_match(got, ref, tol, output_names, input_names):
  """``got`` and ``ref`` are ``(outputs, gradients)``: float32 outputs (the
  state accumulates in float32), then every leaf within ``tol``
  (``max|x − ref| / max|ref|``)."""
  (outputs, grads), (ref_outputs, ref_grads) = got, ref
  for name, x, x_ref in zip(output_names, outputs, ref_outputs):
    assert x.dtype == jnp.float32, name
    assert_close(x, x_ref, tol, name)
  for name, g, g_ref in zip(input_names, grads, ref_grads):
    assert_close(g, g_ref, tol, f"gradient wrt {name}")
