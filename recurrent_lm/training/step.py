"""The train state and the jitted train step.

The loss is the mean next-token cross-entropy over the tokens of a batch
whose ``segment_ids`` are non-zero (0 marks padding)::

    loss = Σ_{b,t} m_{bt} · (−log softmax(logits_{bt})[target_{bt}]) / Σ m

With ``accum_steps = k`` the batch ``[B, L]`` is split into ``k`` micro-batches
``[B/k, L]`` run one after the other (``lax.scan``); their summed gradients
divided by the batch's token count equal the full batch's gradient, so the
update is the same as without accumulation, in less memory.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a training run needs to continue exactly.

  Attributes:
    step: ``[]`` int32 number of updates done.
    params: the model parameters (float32 whatever the compute dtype).
    opt_state: the optimizer state.
    rng: ``[2]`` uint32 raw PRNG key (raw so that checkpoints store it plainly).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_state(model, optimizer: optax.GradientTransformation, batch_shape, seed: int):
  """A fresh ``TrainState``: parameters from ``seed``, optimizer state of zeros."""
  rng, init_rng = jax.random.split(jax.random.PRNGKey(seed))
  tokens = jnp.zeros(batch_shape, jnp.int32)
  params = model.init(init_rng, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=rng)


def token_losses(model, params, batch):
  """``(nll [B, L] float32, mask [B, L] float32)`` of a batch dict."""
  logits, _ = model.apply({"params": params}, batch["inputs"],
                          segment_ids=batch["segment_ids"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return nll, (batch["segment_ids"] > 0).astype(jnp.float32)


def make_train_step(model, optimizer: optax.GradientTransformation, *, accum_steps: int = 1,
                    byte_lengths=None) -> Callable:
  """``step(state, batch) -> (state, metrics)``, to be wrapped in ``jax.jit``.

  Args:
    model: the ``LanguageModel``.
    optimizer: from :func:`make_optimizer`.
    accum_steps: micro-batches per update (divides the batch size).
    byte_lengths: ``[V]`` UTF-8 bytes of every token, for bits per byte; None
      leaves ``bytes`` out of the metrics.

  Returns:
    The step. ``metrics`` holds float32 scalars: ``loss`` (mean nll in nats),
    ``nll_sum``, ``tokens``, ``bytes`` (when ``byte_lengths``), ``grad_norm``
    and ``update_norm``.
  """
  if not isinstance(accum_steps, int) or accum_steps < 1:
    raise ValueError(f"accum_steps={accum_steps!r}; expected a positive int")

  def micro_grads(params, micro):
    def loss(p):
      nll, mask = token_losses(model, p, micro)
      return jnp.sum(nll * mask), mask
    (nll_sum, mask), grads = jax.value_and_grad(loss, has_aux=True)(params)
    counts = {"nll_sum": nll_sum, "tokens": jnp.sum(mask)}
    if byte_lengths is not None:
      counts["bytes"] = jnp.sum(jnp.take(byte_lengths, micro["targets"]) * mask)
    return grads, counts

  def step(state: TrainState, batch):
    batch_size = batch["inputs"].shape[0]
    if batch_size % accum_steps:
      raise ValueError(f"batch size {batch_size} is not divisible by accum_steps={accum_steps}")
    if accum_steps == 1:
      grads, counts = micro_grads(state.params, batch)
    else:
      micros = jax.tree_util.tree_map(
          lambda x: x.reshape((accum_steps, batch_size // accum_steps) + x.shape[1:]), batch)
      zeros = jax.eval_shape(micro_grads, state.params,
                             jax.tree_util.tree_map(lambda x: x[0], micros))
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)

      def body(total, micro):
        return jax.tree_util.tree_map(jnp.add, total, micro_grads(state.params, micro)), None
      (grads, counts), _ = jax.lax.scan(body, zeros, micros)
    denominator = jnp.maximum(counts["tokens"], 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denominator, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(counts, loss=counts["nll_sum"] / denominator,
                   grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step
