"""The XLA:CPU workaround set by ``import recurrent_lm`` (see its ``__init__``)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# jax-ml/jax#40412: this f32 multiply-and-reduce segfaults jaxlib 0.10.2's
# YNN fusion (rank 7, a size-1 dimension that is not reduced).
_CRASHER = """
import recurrent_lm
import jax, jax.numpy as jnp, numpy as np
u, v = (jax.random.normal(jax.random.key(i), (3, 1, 2, 2, 8, 8, 8)) for i in (0, 1))
got = jax.jit(lambda a, b: jnp.sum(a * b, axis=3))(u, v)
want = np.sum(np.asarray(u, np.float64) * np.asarray(v, np.float64), axis=3)
print(float(np.max(np.abs(np.asarray(got) - want))))
"""

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU flag")


def test_no_ynn_fusions_after_import():
  x = jax.random.normal(jax.random.key(0), (64, 64))
  for f in (lambda a, b: a @ b, lambda a, b: jnp.tanh(a @ b).sum(0)):
    assert "__ynn_fusion" not in jax.jit(f).lower(x, x).compile().as_text()


def test_the_upstream_crasher_runs_and_is_right():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run([sys.executable, "-c", _CRASHER], env=env, capture_output=True,
                       text=True, timeout=120)
  assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
  assert float(run.stdout.split()[-1]) < 1e-4
