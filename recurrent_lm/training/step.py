"""The train state and the jitted train step.

The loss is the mean next-token cross-entropy over the tokens of a batch
whose ``segment_ids`` are non-zero (0 marks padding) — and, when the batch
has a ``loss_mask`` (the synthetic tasks: labels only at queries), where it is 1::

    loss = Σ_{b,t} m_{bt} · (−log softmax(logits_{bt})[target_{bt}]) / Σ m

A model with a prefix (JRT-RNN's ``prefix_len`` M, see
:func:`recurrent_lm.models.prefix_len`) trains on JRT's objective instead:
next-token loss on the decoder region (document positions ≥ M) plus
``mlm_weight`` (0.25) × a masked-LM loss on the prefix — ``mlm_prob`` (15%)
of its tokens are replaced by ``mask_token_id`` in the inputs and predicted
at their own position::

    loss = mean_{decoder} nll(target)  +  0.25 · mean_{masked} nll(original input)

The masks are drawn from ``fold_in(state.rng, state.step)``, so a resumed run
draws the same ones.

With ``accum_steps = k`` the batch ``[B, L]`` is split into ``k`` micro-batches
``[B/k, L]`` run one after the other (``lax.scan``). The loss weights are
normalised by the whole batch's counts before the split, so the summed
gradients of the micro-batches equal the full batch's gradient and the
update is the same as without accumulation, in less memory.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from recurrent_lm import models
from recurrent_lm.ops import _checks


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


def loss_masks(model_config, batch, rng, *, mlm_prob: float = 0.15,
               mask_token_id: int = 1):
  """``(inputs, next_mask, mlm_mask)``: what the model reads and where the loss is.

  Args:
    model_config: the ``ModelConfig``; its prefix length decides the objective.
    batch: ``inputs``, ``targets``, ``segment_ids`` ``[B, L]``, optionally
      ``loss_mask`` ``[B, L]`` (only its non-zero positions are scored on their target).
    rng: PRNG key of the masked-LM draw (unused without a prefix).
    mlm_prob: share of prefix tokens masked.
    mask_token_id: the id masked inputs read; the tokenizer's ``<unk>`` (1),
      which byte fallback never emits.

  Returns:
    ``inputs`` ``[B, L]`` int32 (masked in the prefix), ``next_mask`` and
    ``mlm_mask`` ``[B, L]`` float32: the tokens scored on their next token
    and the masked prefix tokens scored on themselves (all zeros without a prefix).
  """
  valid = batch["segment_ids"] > 0
  scored = valid & (batch["loss_mask"] > 0) if "loss_mask" in batch else valid
  prefix_len = models.prefix_len(model_config)
  if prefix_len is None:
    return batch["inputs"], scored.astype(jnp.float32), jnp.zeros(valid.shape, jnp.float32)
  batch_size, time = valid.shape
  positions = _checks.document_positions(jnp.zeros((batch_size,), jnp.int32),
                                         batch["segment_ids"], time)
  in_prefix = valid & (positions < prefix_len)
  masked = in_prefix & (jax.random.uniform(rng, valid.shape) < mlm_prob)
  inputs = jnp.where(masked, mask_token_id, batch["inputs"])
  return (inputs, (scored & ~in_prefix).astype(jnp.float32), masked.astype(jnp.float32))


def make_train_step(model, optimizer: optax.GradientTransformation, *, accum_steps: int = 1,
                    byte_lengths=None, mlm_weight: float = 0.25, mlm_prob: float = 0.15,
                    mask_token_id: int = 1) -> Callable:
  """``step(state, batch) -> (state, metrics)``, to be wrapped in ``jax.jit``.

  Args:
    model: the ``LanguageModel``.
    optimizer: from :func:`make_optimizer`.
    accum_steps: micro-batches per update (divides the batch size).
    byte_lengths: ``[V]`` UTF-8 bytes of every token, for bits per byte; None
      leaves ``bytes`` out of the metrics.
    mlm_weight, mlm_prob, mask_token_id: JRT's masked-LM loss of a model with
      a prefix (module docstring); unused otherwise.

  Returns:
    The step. ``metrics`` holds float32 scalars: ``loss`` (mean next-token
    nll in nats), ``nll_sum`` and ``tokens`` (the next-token sum and count),
    ``input_tokens`` (tokens read), ``bytes`` (when ``byte_lengths``),
    ``grad_norm`` and ``update_norm``; with a prefix also ``mlm_loss``,
    ``mlm_nll_sum`` and ``mlm_tokens``; with a mixture of experts also
    ``load_balance_loss`` and ``dropped_fraction`` (means over layers), the
    former weighted by ``load_balance_coef`` in the loss.
  """
  if not isinstance(accum_steps, int) or accum_steps < 1:
    raise ValueError(f"accum_steps={accum_steps!r}; expected a positive int")
  has_prefix = models.prefix_len(model.config) is not None

  is_moe = getattr(model.config, "mlp", None) == "moe"   # an HMTConfig has no MoE

  def forward(p, micro):
    """``(logits, moe statistics (means over layers) or {})``."""
    if not is_moe:
      logits, _ = model.apply({"params": p}, micro["inputs"], segment_ids=micro["segment_ids"])
      return logits, {}
    (logits, _), sown = model.apply({"params": p}, micro["inputs"],
                                    segment_ids=micro["segment_ids"], mutable=["moe_aux"])
    stats = {}
    for name in ("load_balance_loss", "dropped_fraction"):
      values = [jnp.ravel(v) for path, v in jax.tree_util.tree_flatten_with_path(sown)[0]
                if getattr(path[-1], "key", None) == name]
      stats[name] = jnp.mean(jnp.concatenate(values))
    return logits, stats

  def micro_grads(params, micro):
    def loss(p):
      logits, moe = forward(p, micro)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, micro["targets"])
      counts = {"nll_sum": jnp.sum(nll * micro["next_mask"]),
                "tokens": jnp.sum(micro["next_mask"]),
                "input_tokens": jnp.sum(micro["segment_ids"] > 0).astype(jnp.float32)}
      total = jnp.sum(nll * micro["next_weight"])
      if is_moe:   # micro-batch means, summed over micro-batches: divide by their number
        counts.update({name: value / accum_steps for name, value in moe.items()})
        total = total + model.config.load_balance_coef * counts["load_balance_loss"]
      if has_prefix:
        mlm_nll = optax.softmax_cross_entropy_with_integer_labels(logits, micro["originals"])
        counts["mlm_nll_sum"] = jnp.sum(mlm_nll * micro["mlm_mask"])
        counts["mlm_tokens"] = jnp.sum(micro["mlm_mask"])
        total = total + jnp.sum(mlm_nll * micro["mlm_weight"])
      return total, counts
    (_, counts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    if byte_lengths is not None:
      counts["bytes"] = jnp.sum(jnp.take(byte_lengths, micro["targets"]) * micro["next_mask"])
    return grads, counts

  def step(state: TrainState, batch):
    batch_size = batch["inputs"].shape[0]
    if batch_size % accum_steps:
      raise ValueError(f"batch size {batch_size} is not divisible by accum_steps={accum_steps}")
    inputs, next_mask, mlm_mask = loss_masks(
        model.config, batch, jax.random.fold_in(state.rng, state.step), mlm_prob=mlm_prob,
        mask_token_id=mask_token_id)
    full = {"inputs": inputs, "targets": batch["targets"], "segment_ids": batch["segment_ids"],
            "next_mask": next_mask, "next_weight": next_mask / jnp.maximum(next_mask.sum(), 1.0)}
    if has_prefix:
      full.update(originals=batch["inputs"], mlm_mask=mlm_mask,
                  mlm_weight=mlm_weight * mlm_mask / jnp.maximum(mlm_mask.sum(), 1.0))
    if accum_steps == 1:
      grads, counts = micro_grads(state.params, full)
    else:
      micros = jax.tree_util.tree_map(
          lambda x: x.reshape((accum_steps, batch_size // accum_steps) + x.shape[1:]), full)
      zeros = jax.eval_shape(micro_grads, state.params,
                             jax.tree_util.tree_map(lambda x: x[0], micros))
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)

      def body(total, micro):
        return jax.tree_util.tree_map(jnp.add, total, micro_grads(state.params, micro)), None
      (grads, counts), _ = jax.lax.scan(body, zeros, micros)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(counts, loss=counts["nll_sum"] / jnp.maximum(counts["tokens"], 1.0),
                   grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates))
    if has_prefix:
      metrics["mlm_loss"] = counts["mlm_nll_sum"] / jnp.maximum(counts["mlm_tokens"], 1.0)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step
