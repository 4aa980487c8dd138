"""recurrent_lm: recurrent language models in JAX/Flax.

Tiers (dependencies point one way): ``ops`` (pure functions on arrays) →
``layers`` (Flax token mixers, norms, MLPs) → ``models`` → ``training``.
"""

import os as _os

__version__ = "0.1.0"

# XLA:CPU in jaxlib 0.10.2 and 0.11 runs fusions through YNNPACK (slinky) by
# default, and here they are off unless XLA_FLAGS already chooses:
#   * some high-rank broadcast/reduce fusions segfault on an Eigen worker
#     thread (jax-ml/jax#39257, #40412), the Python traceback landing wherever
#     the main thread happens to be;
#   * after ``jax.clear_caches()`` recompiled YNN programs returned wrong
#     numbers (errors of 1e16 and NaN in the BASED/JRT mixer tests), with its
#     matmul fusions alone as well; with YNN off they are exact.
# The flag acts only if set before JAX starts its CPU backend: import
# recurrent_lm first. It costs up to ~20% on some CPU train steps (BUILD.md).
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}=".strip()
