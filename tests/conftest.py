"""Shared test settings.

* ``recurrent_lm`` is imported first: it sets the XLA flags the CPU backend
  needs (see its ``__init__``) before any test starts the backend.
* float32 matmuls run at full precision on every backend.
* Compiled programs are freed when a worker holds too many memory mappings.
  XLA:CPU maps ~9 regions per live executable and keeps every executable of a
  live jitted function; a test worker that compiles for a thousand tests
  reached the kernel's ``vm.max_map_count`` (65530), after which compiling
  fails ("Failed to materialize symbols") and the next failure segfaults
  while unwinding. Past :data:`_MAX_MAPPINGS` the caches are cleared; programs
  still needed are compiled again.
"""

import os

import recurrent_lm  # noqa: F401  (XLA flags; must precede the first computation)

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

_MAX_MAPPINGS = 30_000
_MAPS = "/proc/self/maps"


def _mappings() -> int:
  with open(_MAPS, "rb") as maps:
    return sum(1 for _ in maps)


@pytest.fixture(autouse=True)
def _bounded_compiled_programs():
  yield
  if os.path.exists(_MAPS) and _mappings() > _MAX_MAPPINGS:
    jax.clear_caches()
