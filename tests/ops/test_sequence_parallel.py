"""Sequence parallelism: the time axis split over 8 simulated devices equals one device.

For ``linear_scan``, ``linear_attention`` (no, scalar and per-channel
decay; normalised) and ``mlstm`` (with and without an initial state; packed documents whose boundaries
fall inside shards, exactly on a shard boundary, and runs of one-token
documents) the sharded op's outputs, final state and the gradients of a
random functional of both with respect to every input equal the plain op on
the whole sequence: float32, relative error ≤ 1e-4 of the largest entry.
"""

import subprocess
import sys

from tests.training.conftest import ENV, REPO

_SCRIPT = r"""
import functools, itertools
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import recurrent_lm
from recurrent_lm import ops
from recurrent_lm.ops import sequence_parallel as sp

jax.config.update("jax_default_matmul_precision", "highest")
mesh = jax.make_mesh((8,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))   # as training.make_mesh
rng = np.random.default_rng()
B, T, H, K, V = 2, 128, 2, 8, 4          # 8 shards of 16 tokens


def segments():
  ids = np.ones((B, T), np.int32)
  ids[0, 37:] = 2; ids[0, 48:] = 3; ids[0, 49:] = 4; ids[0, 50:] = 5   # in a shard, on a boundary, 1-token docs
  ids[1, 16 * 3:] = 2; ids[1, 100:] = 3
  return jnp.asarray(ids)


def close(name, got, want, tol=1e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
  assert err <= tol, f"{name}: relative error {err:.2e} > {tol}"
  return err


def check(name, plain, sharded, args, n_seq):
  # n_seq: how many leading args are [B, T, ...] (split over the sequence).
  specs = tuple(P(None, "sequence") if i < n_seq else P() for i in range(len(args)))
  run = jax.shard_map(sharded, mesh=mesh, in_specs=specs, out_specs=(P(None, "sequence"), P()),
                      check_vma=False)   # the ops start their scans from unsharded zeros
  want = plain(*args)
  args = tuple(jax.device_put(x, jax.sharding.NamedSharding(mesh, s)) for x, s in zip(args, specs))
  got = jax.jit(run)(*args)
  worst = 0.0
  for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
    worst = max(worst, close(f"{name} output {i}", g, w))
  probes = [jnp.asarray(rng.normal(size=w.shape), jnp.float32) for w in jax.tree.leaves(want)]
  def loss(f, *xs):
    return sum(jnp.sum(p * o) for p, o in zip(probes, jax.tree.leaves(f(*xs))))
  argnums = tuple(i for i, x in enumerate(args)
                  if jnp.issubdtype(jax.tree.leaves(x)[0].dtype, jnp.floating))
  g_got = jax.jit(jax.grad(functools.partial(loss, run), argnums))(*args)
  g_want = jax.grad(functools.partial(loss, plain), argnums)(*jax.device_get(args))
  for i, (g, w) in enumerate(zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want))):
    worst = max(worst, close(f"{name} grad {i}", g, w))
  print(f"{name}: ok (worst relative error {worst:.1e})")


normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
seg = segments()

# linear_scan
a = jax.nn.sigmoid(normal(B, T, 6) + 2); b = normal(B, T, 6); h0 = normal(B, 6)
for with_seg, with_h0 in itertools.product((False, True), repeat=2):
  ids = seg if with_seg else None
  init = h0 if with_h0 else None
  args = (a, b) + ((ids,) if with_seg else ()) + ((init,) if with_h0 else ())
  def plain(a, b, *rest, with_seg=with_seg, with_h0=with_h0):
    ids = rest[0] if with_seg else None
    init = rest[-1] if with_h0 else None
    return ops.linear_scan(a, b, init, segment_ids=ids, impl="recurrent")
  def sharded(a, b, *rest, with_seg=with_seg, with_h0=with_h0):
    ids = rest[0] if with_seg else None
    init = rest[-1] if with_h0 else None
    return sp.linear_scan(a, b, init, axis_name="sequence", segment_ids=ids)
  check(f"linear_scan seg={with_seg} h0={with_h0}", plain, sharded, args, 3 if with_seg else 2)

# linear_attention
q, k, v = normal(B, T, H, K), normal(B, T, H, K), normal(B, T, H, V)
decays = {"none": None, "scalar": jax.nn.log_sigmoid(normal(B, T, H) + 3),
          "vector": jax.nn.log_sigmoid(normal(B, T, H, K) + 3)}
for (kind, g), normalize, with_seg in itertools.product(decays.items(), (False, True),
                                                      (False, True)):
  if normalize:   # BASED-style positive features
    qq, kk, init = jnp.abs(q), jnp.abs(k), (jnp.abs(normal(B, H, K, V)), jnp.abs(normal(B, H, K)))
  else:
    qq, kk, init = q, k, normal(B, H, K, V)
  seq_args = (qq, kk, v) + (() if g is None else (g,)) + ((seg,) if with_seg else ())
  args = seq_args + (init,)
  def split(args, g=g, with_seg=with_seg):
    qq, kk, vv, *rest = args
    gg = rest.pop(0) if g is not None else None
    ids = rest.pop(0) if with_seg else None
    return qq, kk, vv, gg, ids, rest[0]
  def plain(*args, normalize=normalize, split=split):
    qq, kk, vv, gg, ids, init = split(args)
    return ops.linear_attention(qq, kk, vv, log_decay=gg, normalize=normalize,
                                initial_state=init, segment_ids=ids, impl="recurrent")
  def sharded(*args, normalize=normalize, split=split):
    qq, kk, vv, gg, ids, init = split(args)
    return sp.linear_attention(qq, kk, vv, axis_name="sequence", log_decay=gg,
                               normalize=normalize, initial_state=init, segment_ids=ids,
                               chunk_size=8)
  check(f"linear_attention decay={kind} normalize={normalize} seg={with_seg}", plain, sharded,
        args, len(seq_args))

# mlstm
ig, fg = normal(B, T, H), normal(B, T, H) + 2
init = (normal(B, H, K, V), jnp.abs(normal(B, H, K)), normal(B, H))
for with_seg, with_init in itertools.product((False, True), repeat=2):
  seq_args = (q, k, v, ig, fg) + ((seg,) if with_seg else ())
  args = seq_args + ((init,) if with_init else ())
  def split(args, with_seg=with_seg, with_init=with_init):
    *xs, = args
    state = xs.pop() if with_init else None
    ids = xs.pop() if with_seg else None
    return xs, ids, state
  def plain(*args, split=split):
    xs, ids, state = split(args)
    return ops.mlstm(*xs, initial_state=state, segment_ids=ids, impl="recurrent")
  def sharded(*args, split=split):
    xs, ids, state = split(args)
    return sp.mlstm(*xs, axis_name="sequence", initial_state=state, segment_ids=ids,
                    chunk_size=8)
  check(f"mlstm seg={with_seg} init={with_init}", plain, sharded, args, len(seq_args))

# The ops split themselves when traced under a mesh whose `sequence` axis is split.
# (As the train step is traced: `loop._build`.)
def on_mesh(fn):
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  on_devices = lambda *args: tuple(jax.device_put(x, jax.sharding.NamedSharding(mesh, P()))
                                   for x in args)
  return lambda *args: jax.jit(traced)(*on_devices(*args))
g = decays["vector"]
got = on_mesh(lambda q, k, v, g: ops.linear_attention(q, k, v, log_decay=g, segment_ids=seg,
                                                       chunk_size=8))(q, k, v, g)
got_m = on_mesh(lambda *xs: ops.mlstm(*xs, segment_ids=seg, chunk_size=8))(q, k, v, ig, fg)
# 60 steps do not divide into 8 shards: the plain op runs (and gives the same).
for x, y in zip(jax.tree.leaves(on_mesh(lambda a, b: ops.linear_scan(a, b))(a[:, :60], b[:, :60])),
                jax.tree.leaves(ops.linear_scan(a[:, :60], b[:, :60]))):
  close("60 steps under the mesh", x, y)
want = ops.linear_attention(q, k, v, log_decay=g, segment_ids=seg, impl="recurrent")
want_m = ops.mlstm(q, k, v, ig, fg, segment_ids=seg, impl="recurrent")
for i, (x, y) in enumerate(zip(jax.tree.leaves((got, got_m)), jax.tree.leaves((want, want_m)))):
  close(f"under the mesh, leaf {i}", x, y)
print("under a mesh: ok")
print("OK")
"""


def test_sharded_sequence_equals_one_device_outputs_states_and_gradients():
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  print(result.stdout)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-4000:]
