r"""Sequence parallelism's speed: one long sequence on 1 device vs split over N.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m experiments.sequence_parallel_bench --seq_len=65536

Times the forward and backward pass (``jax.grad`` of a sum of the outputs)
of ``linear_scan``, ``linear_attention`` (scalar decay) and ``mlstm`` on a
``[1, T, H, K]`` sequence: the plain op on one device, then the
sequence-parallel op (``ops.sequence_parallel``) in ``shard_map`` over all
devices. Median of ``--repeats`` after a warm-up, with the machine's matmul
peak printed beside them. On simulated CPU devices the N "devices" share the
host's cores, so this is a correctness-first figure; the scaling is for
accelerators.
"""

import functools
import statistics
import time

from absl import app
from absl import flags
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.ops import sequence_parallel as sp
from recurrent_lm.training import throughput

_SEQ_LEN = flags.DEFINE_integer("seq_len", 65536, "Tokens of the sequence.")
_HEADS = flags.DEFINE_integer("heads", 4, "Heads H.")
_DIM = flags.DEFINE_integer("dim", 64, "Key and value width K = V.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (median).")


def _seconds(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _cases(t, h, d):
  keys = jax.random.split(jax.random.key(0), 5)
  normal = lambda key, *shape: jax.random.normal(key, shape, jnp.float32)
  q, k, v = normal(keys[0], 1, t, h, d), normal(keys[1], 1, t, h, d), normal(keys[2], 1, t, h, d)
  a = jax.nn.sigmoid(normal(keys[3], 1, t, h * d) + 2)
  g = jax.nn.log_sigmoid(normal(keys[3], 1, t, h) + 3)
  ig, fg = normal(keys[3], 1, t, h), normal(keys[4], 1, t, h) + 2
  return {
      "linear_scan": ((a, v.reshape(1, t, h * d)), ops.linear_scan,
                      functools.partial(sp.linear_scan, axis_name="sequence")),
      "linear_attention": ((q, k, v, g),
                           lambda q, k, v, g: ops.linear_attention(q, k, v, log_decay=g),
                           lambda q, k, v, g: sp.linear_attention(
                               q, k, v, log_decay=g, axis_name="sequence")),
      "mlstm": ((q, k, v, ig, fg), ops.mlstm,
                functools.partial(sp.mlstm, axis_name="sequence")),
  }


def main(argv):
  del argv
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("sequence",))
  peak = throughput.matmul_peak_flops()
  print(f"T={_SEQ_LEN.value}, H={_HEADS.value}, K=V={_DIM.value}, batch 1; forward + backward, "
        f"median of {_REPEATS.value}; {len(devices)} x {devices[0].device_kind}; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s (one device)")
  print(f"{'op':<18} {'1 device s':>11} {f'{len(devices)} devices s':>12} {'speed-up':>9}")
  for name, (args, plain, sharded) in _cases(_SEQ_LEN.value, _HEADS.value, _DIM.value).items():
    loss = lambda f: jax.jit(jax.grad(lambda *xs: jnp.sum(f(*xs)[0]), range(len(args))))
    one = _seconds(loss(plain), *[jax.device_put(x, devices[0]) for x in args])
    specs = tuple(P(None, "sequence") for _ in args)
    run = jax.shard_map(sharded, mesh=mesh, in_specs=specs, out_specs=(P(None, "sequence"), P()),
                        check_vma=False)
    split = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
    many = _seconds(loss(run), *split)
    print(f"{name:<18} {one:>11.3f} {many:>12.3f} {one / many:>8.2f}x", flush=True)


if __name__ == "__main__":
  app.run(main)
