"""recurrent_lm: recurrent language models in JAX/Flax.

Tiers (dependencies point one way): ``ops`` (pure functions on arrays) →
``layers`` (Flax token mixers, norms, MLPs) → ``models`` → ``training``.
"""

import os as _os

__version__ = "0.1.0"

# XLA:CPU in jaxlib 0.10.2 and 0.11 runs element-wise and reduce fusions
# through YNNPACK (slinky), which segfaults on an Eigen worker thread for some
# high-rank broadcast/reduce shapes (jax-ml/jax#39257, #40412; the Python
# traceback then lands wherever the main thread happens to be). Only its
# matmul fusions are kept, unless XLA_FLAGS already chooses. The flag acts only
# if set before JAX starts its CPU backend: import recurrent_lm first.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}=dot".strip()
