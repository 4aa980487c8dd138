"""NaN-poisoned outputs for the kernel tests.

``poison(...)`` rewires a ``pallas_call``'s arguments so every output buffer
starts as NaN: NaN arrays are appended to the inputs and aliased to the
outputs, and the kernel ignores their refs. An element the kernel never
writes then stays NaN, which a comparison against the oracle cannot miss.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.numpy as jnp


def poison(kernel: Callable[..., None], inputs: Sequence[Any], in_specs: Sequence[Any],
           out_specs: Sequence[Any], out_shapes: Sequence[Any]):
  """``(kernel, inputs, in_specs, input_output_aliases)`` with NaN-filled outputs."""
  n_inputs = len(inputs)
  inputs = [*inputs, *(jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shapes)]
  aliases = {n_inputs + j: j for j in range(len(out_shapes))}

  def poisoned(*refs):
    kernel(*refs[:n_inputs], *refs[len(inputs):])

  return poisoned, inputs, [*in_specs, *out_specs], aliases
