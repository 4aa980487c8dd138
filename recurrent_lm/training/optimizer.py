"""AdamW with linear warm-up and cosine decay (Languini's defaults).

    lr(s) = peak · s / warmup                                   s < warmup
    lr(s) = end + (peak − end) · (1 + cos(π (s − warmup) / (steps − warmup))) / 2

Languini trains with Adam(β = 0.9, 0.95), peak 6e-4, end 6e-6, 200 warm-up
steps and no clipping; ``weight_decay = 0`` makes AdamW that Adam. Weight
decay, when set, applies to matrices (``kernel`` and ``embedding`` leaves) only.

``trainable`` (a regular expression; empty for all) freezes every parameter
whose path (``layers/block_0/mixer/q_proj_lora/a/kernel``) it does not match: those get
zero updates and no optimizer state — LoRA fine-tuning is
``trainable = "lora"``.
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
import optax


def learning_rate(config: Mapping, steps: int) -> optax.Schedule:
  """The schedule of ``config`` (``optimizer`` section) over ``steps`` updates."""
  warmup = min(int(config["warmup_steps"]), max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config["peak_lr"], warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=config["end_lr"])


def _decay_mask(params):
  def is_matrix(path, _):
    return getattr(path[-1], "key", None) in ("kernel", "embedding", "position_embedding")
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def param_path(path) -> str:
  """``layers/block_0/mixer/q_proj/kernel``: a parameter's tree path as a string."""
  return "/".join(str(getattr(key, "key", key)) for key in path)


def trainable_labels(pattern: str):
  """``params -> tree of "train" | "frozen"``: which leaves ``pattern`` matches."""
  regex = re.compile(pattern)
  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if regex.search(param_path(path)) else "frozen", params)
  return labels


def make_optimizer(config: Mapping, steps: int) -> optax.GradientTransformation:
  """Clipping (when ``grad_clip_norm > 0``) then AdamW on the schedule.

  Args:
    config: the ``optimizer`` config section: ``peak_lr, end_lr,
      warmup_steps, b1, b2, eps, weight_decay, grad_clip_norm`` and optionally
      ``trainable`` (module docstring).
    steps: total number of updates (the cosine reaches ``end_lr`` there).
  """
  for name in ("peak_lr", "end_lr", "b1", "b2", "eps", "weight_decay", "grad_clip_norm"):
    if config[name] < 0:
      raise ValueError(f"optimizer.{name}={config[name]}; expected >= 0")
  adamw = optax.adamw(learning_rate(config, steps), b1=config["b1"], b2=config["b2"],
                      eps=config["eps"], weight_decay=config["weight_decay"],
                      mask=_decay_mask)
  if config["grad_clip_norm"] > 0:
    adamw = optax.chain(optax.clip_by_global_norm(config["grad_clip_norm"]), adamw)
  pattern = config.get("trainable", "")
  if not pattern:
    return adamw
  try:
    labels = trainable_labels(pattern)
  except re.error as error:
    raise ValueError(f"optimizer.trainable={pattern!r} is not a regular expression "
                     f"({error})") from None
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
