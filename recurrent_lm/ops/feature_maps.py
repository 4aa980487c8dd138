"""Feature maps φ applied to queries and keys before linear attention.

Each map acts on the last (head) axis, ``[..., d] → [..., output_dim(name, d)]``,
so that ``φ(q)·φ(k)`` stands in for the softmax kernel:

* ``identity``     — ``φ(x) = x``.
* ``elu_plus_one`` — ``φ(x) = elu(x) + 1`` (Katharopoulos et al.): positive.
* ``relu``         — ``φ(x) = max(x, 0)``.
* ``taylor``       — Based's second-order Taylor expansion of ``exp(q·k/√d)``.
* ``softmax``      — softmax over the head axis (Liger).

:func:`get` looks a map up by name; :data:`NAMES` lists the names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def identity(x):
  """``φ(x) = x``."""
  return x


def elu_plus_one(x):
  """``φ(x) = elu(x) + 1``, positive everywhere; same dtype as ``x``."""
  return jax.nn.elu(x) + 1


def relu(x):
  """``φ(x) = max(x, 0)``; same dtype as ``x``."""
  return jax.nn.relu(x)


def taylor(x):
  """Based's second-order Taylor feature map, in float32.

      φ(x) = [1,  x / d^{1/4},  vec(x ⊗ x) / (√2 · √d)]      [..., d] → [..., 1 + d + d²]

  so that ``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)``, the expansion of
  ``exp(q·k/√d)`` to second order. The kernel is ``1 + z + z²/2 ≥ 1/2`` for
  every ``z``, so normalised linear attention never divides by zero.
  """
  d = x.shape[-1]
  x = x.astype(jnp.float32)
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
  return jnp.concatenate(
      [jnp.ones((*x.shape[:-1], 1), jnp.float32), x * d ** -0.25,
       outer * (2.0 * d) ** -0.5], axis=-1)


def softmax(x):
  """``φ(x) = softmax(x)`` over the head axis (Liger): positive, sums to 1.

  Computed in float32, returned in ``x``'s dtype.
  """
  return jax.nn.softmax(x.astype(jnp.float32), axis=-1).astype(x.dtype)


_MAPS = {
    "identity": identity,
    "elu_plus_one": elu_plus_one,
    "relu": relu,
    "taylor": taylor,
    "softmax": softmax,
}

NAMES = tuple(_MAPS)


def _check_name(name):
  if name not in _MAPS:
    raise ValueError(f"feature map {name!r} is unknown; expected one of {', '.join(NAMES)}")


def get(name):
  """The feature map called ``name``, one of :data:`NAMES`."""
  _check_name(name)
  return _MAPS[name]


def output_dim(name, d):
  """Feature dimension of map ``name`` on inputs with head dimension ``d``."""
  _check_name(name)
  return 1 + d + d * d if name == "taylor" else d
