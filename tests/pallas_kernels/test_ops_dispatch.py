"""The kernels as the ops run them: ``impl="pallas"`` against ``impl="recurrent"``.

The kernel files test each kernel at its own signature; these go through the
public ops, so the op's own preparation is covered too: scale, the BASED
normaliser column, the non-causal read built from causal passes, segment ids
turned into resets, ``reverse``, initial states, and bfloat16 inputs reaching
the kernel as bfloat16. On CPU ``impl="pallas"`` runs the GPU blocks in
interpret mode; ``auto`` never picks it there. Errors are
``max|x − ref| / max|ref|`` per array (``tests/ops/_close.py``): float32
within 1e-4; bfloat16 inputs within 3e-2 of the float32 oracle on the same
rounded inputs, the mLSTM's within 5e-2 (its kernels multiply the stabilised
weights and the state in bfloat16, and ``h = qs / max(|q·n|, e^{−m})``
enlarges the cotangent where ``|q·n|`` is small: ``dq`` measured 3.5e-2).
"""

import importlib

import jax
import jax.numpy as jnp
import pytest

from recurrent_lm import ops
from tests.ops._close import assert_close

F32_TOL = 1e-4
BF16_TOL = 3e-2
MLSTM_BF16_TOL = 5e-2
B, T, H, K, V = 2, 37, 2, 16, 16


def _normal(key, shape):
  return jax.random.normal(key, shape, jnp.float32)


def _segments(key):
  return jnp.cumsum(jax.random.bernoulli(key, 0.08, (B, T)), axis=1)


def _vjp_all(fn, args, key):
  """``(outputs, gradients of every arg)`` under a random cotangent on every output."""
  outputs, vjp = jax.vjp(fn, *args)
  leaves, tree = jax.tree.flatten(outputs)
  cotangents = [_normal(k, x.shape).astype(x.dtype)
                for k, x in zip(jax.random.split(key, len(leaves)), leaves)]
  return outputs, vjp(jax.tree.unflatten(tree, cotangents))


def _rounded(args, dtype):
  return tuple(None if a is None else a.astype(dtype).astype(jnp.float32) for a in args)


@pytest.mark.parametrize("decay, normalize, causal, dtype", [
    ("scalar", False, True, jnp.float32),
    ("vector", False, True, jnp.float32),
    (None, True, True, jnp.float32),          # BASED
    ("scalar", True, False, jnp.float32),     # JRT's non-causal prefix read
    ("vector", False, True, jnp.bfloat16),
])
def test_linear_attention(decay, normalize, causal, dtype):
  keys = jax.random.split(jax.random.key(0), 8)
  q, k, v = _normal(keys[0], (B, T, H, K)), _normal(keys[1], (B, T, H, K)), _normal(keys[2], (B, T, H, V))
  if normalize:
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
  shape = {"scalar": (B, T, H), "vector": (B, T, H, K), None: None}[decay]
  g = None if shape is None else jax.nn.log_sigmoid(_normal(keys[3], shape) + 2)
  s0 = jnp.abs(_normal(keys[4], (B, H, K, V)))
  state = (s0, jnp.abs(s0[..., 0]) + 1) if normalize else s0
  segments = _segments(keys[5])

  def run(impl, q, k, v, state, g=None):
    return ops.linear_attention(q, k, v, log_decay=g, normalize=normalize, initial_state=state,
                                segment_ids=segments, causal=causal, chunk_size=16, impl=impl)

  args = (q, k, v, state) + (() if g is None else (g,))
  lowered = tuple(x.astype(dtype) for x in args[:3]) + args[3:]
  got = _vjp_all(lambda *a: run("pallas", *a), lowered, keys[6])
  want = _vjp_all(lambda *a: run("recurrent", *a), _rounded(args[:3], dtype) + args[3:], keys[6])
  assert got[0][0].dtype == dtype
  assert_close(got, want, F32_TOL if dtype == jnp.float32 else BF16_TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mlstm(dtype):
  keys = jax.random.split(jax.random.key(1), 10)
  q, k, v = _normal(keys[0], (B, T, H, K)), _normal(keys[1], (B, T, H, K)), _normal(keys[2], (B, T, H, V))
  input_gate, forget_gate = _normal(keys[3], (B, T, H)), _normal(keys[4], (B, T, H)) + 3
  state = (_normal(keys[5], (B, H, K, V)), _normal(keys[6], (B, H, K)), _normal(keys[7], (B, H)))
  segments = _segments(keys[8])

  def run(impl, q, k, v, i, f, state):
    return ops.mlstm(q, k, v, i, f, initial_state=state, segment_ids=segments, chunk_size=16,
                     impl=impl)

  lowered = tuple(x.astype(dtype) for x in (q, k, v))
  got = _vjp_all(lambda *a: run("pallas", *a), lowered + (input_gate, forget_gate, state), keys[9])
  want = _vjp_all(lambda *a: run("recurrent", *a),
                  _rounded((q, k, v), dtype) + (input_gate, forget_gate, state), keys[9])
  assert got[0][0].dtype == dtype
  assert_close(got, want, F32_TOL if dtype == jnp.float32 else MLSTM_BF16_TOL)


@pytest.mark.parametrize("reverse, dtype", [(False, jnp.float32), (True, jnp.float32),
                                            (False, jnp.bfloat16)])
def test_linear_scan(reverse, dtype):
  keys = jax.random.split(jax.random.key(2), 5)
  a = jax.nn.sigmoid(_normal(keys[0], (B, T, H, 5)) + 2)
  b = _normal(keys[1], (B, T, H, 5))
  h0 = _normal(keys[2], (B, H, 5))
  segments = _segments(keys[3])

  def run(impl, a, b, h0):
    return ops.linear_scan(a, b, h0, segment_ids=segments, reverse=reverse, impl=impl)

  got = _vjp_all(lambda *x: run("pallas", *x), (a.astype(dtype), b.astype(dtype), h0), keys[4])
  want = _vjp_all(lambda *x: run("recurrent", *x), _rounded((a, b), dtype) + (h0,), keys[4])
  assert got[0][0].dtype == dtype
  assert_close(got, want, F32_TOL if dtype == jnp.float32 else BF16_TOL)


@pytest.mark.parametrize("module, call", [
    ("linear_attention", dict(time=8192, decay="scalar", causal=True, normalize=False,
                              dtype=jnp.bfloat16, chunk_size=64, key_dim=128)),
    ("mlstm", dict(time=8192, dtype=jnp.bfloat16, chunk_size=64, key_dim=128, value_dim=64)),
    ("linear_scan", dict(time=8192, dtype=jnp.bfloat16)),
])
def test_auto_picks_the_kernel_on_gpu_and_tpu_but_never_on_cpu(module, call, monkeypatch):
  registry = importlib.import_module(f"recurrent_lm.ops.{module}").REGISTRY
  assert registry.resolve("auto", **call).name != "pallas"   # this CPU
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert registry.resolve("auto", **call).name == "pallas", backend


def test_a_call_the_kernel_does_not_support_falls_back_under_auto_and_raises_by_name(
    monkeypatch):
  registry = importlib.import_module("recurrent_lm.ops.linear_attention").REGISTRY
  call = dict(time=100, decay="scalar", causal=True, normalize=False, dtype=jnp.float16,
              chunk_size=64, key_dim=64)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert registry.resolve("auto", **call).name == "chunked"
  with pytest.raises(ValueError, match="impl='pallas' does not support"):
    registry.resolve("pallas", **call)
