"""Shared test settings: float32 matmuls at full precision on every backend.

``recurrent_lm`` is imported first: it sets the XLA flags the CPU backend
needs (see its ``__init__``) before any test starts the backend.
"""

import recurrent_lm  # noqa: F401  (XLA flags; must precede the first computation)

import jax

jax.config.update("jax_default_matmul_precision", "highest")
