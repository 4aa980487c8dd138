"""What a step costs: model FLOPs per token and the machine's matmul peak.

MFU (model FLOPs utilisation) = ``flops_per_token · tokens/s / peak``, with the
PaLM estimate of training FLOPs per token::

    6 · N  +  12 · L_attn · T · D_attn

``N`` counts the parameters that multiply activations (every matrix but the
input embedding table, which is a lookup); the second term is the attention
score and mix matmuls of ``L_attn`` full or windowed attention layers of
width ``D_attn = heads · head_dim`` over ``T`` tokens (the window where smaller).
Recurrent mixers' element-wise scans are left out (they are not matmuls).
The peak is *measured*: the median throughput of a dense ``n × n × n`` matmul.
"""

from __future__ import annotations

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recurrent_lm import models


def flops_per_token(config, params, seq_len: int) -> float:
  """Training FLOPs per token of a ``ModelConfig`` with ``params``: ``6 N`` for
  the N parameters a token uses (of a mixture of experts, its top-k experts'),
  plus the attention scores. HMT counts its backbone's, not its reruns."""
  config = getattr(config, "backbone", config)
  keys = lambda path: [getattr(k, "key", None) for k in path]
  leaves = jax.tree_util.tree_leaves_with_path(params)
  n = 0.0
  for path, x in leaves:
    if keys(path)[-1] in ("embedding", "position_embedding"):
      continue
    used = 1.0
    if config.mlp == "moe" and "mlp" in keys(path):
      used = config.top_k / config.num_experts    # expert kernels: k of E per token
    n += used * int(np.prod(x.shape))
  if config.tie_embeddings:
    n += config.vocab_size * config.d_model
  attention = 0.0
  for spec in config.layout:
    if spec.name in ("attention", "sliding_window"):
      kwargs = dict(spec.kwargs)
      width = kwargs.get("head_dim") or config.d_model // kwargs["num_heads"]
      context = min(seq_len, kwargs.get("window") or seq_len)
      attention += 12 * config.num_periods * context * width * kwargs["num_heads"]
  return 6.0 * n + attention


def model_cost(config, seq_len: int) -> tuple[int, float]:
  """``(parameter count, training FLOPs per token)`` of a model config, from
  its parameter shapes alone (nothing is allocated)."""
  params = nn.meta.unbox(jax.eval_shape(models.build(config).init, jax.random.PRNGKey(0),
                                        jnp.zeros((1, 1), jnp.int32))["params"])
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  return count, flops_per_token(config, params, seq_len)


def matmul_peak_flops(size: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Median FLOP/s of a dense ``size³`` matmul in ``dtype`` on the default device."""
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (size, size), dtype) for k in keys)
  matmul = jax.jit(jnp.dot)
  jax.block_until_ready(matmul(a, b))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - start)
  return 2.0 * size ** 3 / statistics.median(times)


def step_seconds(step_fn, state, batch, *, warmup: int = 1, repeats: int = 5) -> float:
  """Median seconds of ``state, metrics = step_fn(state, batch)`` after
  ``warmup`` untimed calls (the first compiles); ``state`` may be donated."""
  for _ in range(warmup):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times)
