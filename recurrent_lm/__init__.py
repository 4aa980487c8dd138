"""recurrent_lm: recurrent language models in JAX/Flax.

Tiers (dependencies point one way): ``ops`` (pure functions on arrays) →
``layers`` (Flax token mixers, norms, MLPs) → ``models`` → ``training``.
"""

__version__ = "0.1.0"
