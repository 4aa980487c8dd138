"""Training a model on synthetic tasks until it solves them (the recall sweeps).

``fit`` is the training of Zoology / BASED's MQAR runs, on the library's own
step and optimizer (``training.step``, ``training.optimizer``)::

    batches   round-robin over the train sources, each batch from one source
              (one shape per source, no padding), read through grain
    loss      cross-entropy at the labelled positions only (``loss_mask``)
    optimizer AdamW (weight decay 0.1 on matrices), linear warm-up, cosine to 0
    stop      when ``validate(params)`` (the caller's validation accuracy) reaches
              ``target_accuracy`` (0.99), checked every ``eval_every`` steps, or after ``steps``

A model with a prefix (JRT-RNN) reads each source's context as its prefix:
the model is rebuilt per source with ``prefix_len = context_len`` (the prefix
length is not a parameter, so all of them share the weights).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import tqdm

from recurrent_lm import models
from recurrent_lm.data import synthetic
from recurrent_lm.models import lm
from recurrent_lm.training import optimizer as optimizer_lib
from recurrent_lm.training import step as step_lib


@dataclasses.dataclass
class FitResult:
  """What ``fit`` returns.

  Attributes:
    params: the trained parameters.
    steps: updates done.
    val_accuracy: ``validate(params)`` at the last check.
    history: ``(step, train loss, val accuracy)`` at every check.
    wall_s: seconds spent, compiles included.
  """
  params: object
  steps: int
  val_accuracy: float
  history: list[tuple[int, float, float]]
  wall_s: float


def context_len(source) -> int:
  """The context length of a source's examples (equal across a homogeneous source)."""
  return int(source[0]["context_len"])


def for_context(config: models.Config, context: int) -> models.Config:
  """``config`` with its prefix mixers' ``prefix_len`` set to ``context`` (unchanged without one)."""
  if models.prefix_len(config) is None:
    return config
  layout = tuple(
      lm.MixerSpec(spec.name, tuple((k, context if k == "prefix_len" else v)
                                    for k, v in spec.kwargs))
      for spec in config.layout)
  return dataclasses.replace(config, layout=layout)


def fit(config: models.Config, train_sources: Sequence, *, validate: Callable[[Any], float],
        steps: int, batch_size: int, lr: float, weight_decay: float = 0.1,
        warmup_steps: int | None = None, eval_every: int = 100, target_accuracy: float = 0.99,
        seed: int = 0, progress: bool = True, description: str = "") -> FitResult:
  """Trains ``config`` on ``train_sources`` (module docstring).

  Args:
    config: the model config (its ``vocab_size`` covers the task's tokens).
    train_sources: task sources (each padded to its longest example, one shape each).
    validate: ``params -> accuracy`` on held-out examples, for early stopping.
    steps: the most updates; the cosine schedule spans them.
    batch_size: examples per update.
    lr: peak learning rate.
    weight_decay: AdamW's, on matrices.
    warmup_steps: linear warm-up; 10% of ``steps`` if None.
    eval_every: updates between validation checks.
    target_accuracy: stop once the validation accuracy reaches it.
    seed: parameters and data order.
    progress: show a tqdm bar with loss and accuracy.
    description: the bar's label.
  """
  if not train_sources:
    raise ValueError("no train sources; expected at least one")
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps={steps!r}; expected a positive int")
  start = time.perf_counter()
  optimizer = optimizer_lib.make_optimizer(
      dict(peak_lr=lr, end_lr=0.0, b1=0.9, b2=0.98, eps=1e-8, weight_decay=weight_decay,
           grad_clip_norm=1.0,
           warmup_steps=max(steps // 10, 1) if warmup_steps is None else warmup_steps), steps)
  # One model (and one compiled step) per distinct config: without a prefix, one in all.
  configs = {s: for_context(config, context_len(s)) for s in train_sources}
  built = {c: models.build(c) for c in set(configs.values())}
  state = step_lib.init_state(built[configs[train_sources[0]]], optimizer, (1, 1), seed)
  train_step = {c: jax.jit(step_lib.make_train_step(m, optimizer, mask_token_id=0),
                           donate_argnums=0) for c, m in built.items()}
  # Sources of varying lengths (ICLL) pad to their longest example: one shape each.
  iterators = [(configs[s], iter(synthetic.task_dataset(
      s, batch_size=batch_size, seed=seed + i, seq_len=getattr(s, "max_len", None))))
      for i, s in enumerate(train_sources)]
  history, accuracy, losses = [], 0.0, []
  bar = tqdm.tqdm(total=steps, desc=description, unit="step", disable=not progress,
                  leave=False)
  done = 0
  for done, (c, iterator) in enumerate(itertools.islice(itertools.cycle(iterators), steps), 1):
    batch = next(iterator)
    state, metrics = train_step[c](state, {k: batch[k] for k in
                                           ("inputs", "targets", "segment_ids", "loss_mask")})
    losses.append(metrics["loss"])
    if done % eval_every == 0 or done == steps:
      loss = float(np.mean(jax.device_get(losses)))
      losses = []
      if not np.isfinite(loss):
        raise FloatingPointError(f"{description}: loss {loss} at step {done}")
      accuracy = float(validate(state.params))
      history.append((done, loss, accuracy))
      bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{accuracy:.3f}")
      if accuracy >= target_accuracy:
        break
    bar.update(1)
  bar.close()
  return FitResult(params=state.params, steps=done, val_accuracy=accuracy, history=history,
                   wall_s=time.perf_counter() - start)
