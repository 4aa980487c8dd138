"""Linearizing a trained softmax-attention LM into a Liger model (Lan et al. 2025).

:func:`liger_config` swaps every ``attention`` slot of a layout for a Liger
mixer (``liger_attention``: ½·sliding window + ½·gated linear attention, or
``liger_gla``: the gated linear attention alone); everything else — the
embeddings, norms, MLPs, logits — is unchanged. :func:`liger_params` then
copies every parameter of the attention model into the Liger tree (the q/k/v/o
projections keep their names and shapes) and initialises only the LoRA
deltas (``A`` random, ``B`` zero), so the converted model starts as the
attention model's weights read through Liger's mixers. Liger fine-tunes the
LoRA parameters alone; :func:`lora_mask` selects them.

    gpt = presets.get("gpt_cpu_small")
    config = liger_config(gpt, window=64, lora_rank=8)
    params = liger_params(gpt_params, config, jax.random.key(0))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm.models.lm import LanguageModel, MixerSpec, ModelConfig

MIXERS = ("liger_attention", "liger_gla")
# Attention fields that have no meaning for a Liger mixer: the full-attention
# cache length, and the window / rotary base where a mixer has none.
_DROPPED = {"liger_attention": ("max_len", "window"),
            "liger_gla": ("max_len", "window", "rope_theta")}


def liger_config(gpt_config: ModelConfig, *, mixer: str = "liger_attention", window: int = 64,
                 lora_rank: int = 8, lora_alpha: float = 8.0) -> ModelConfig:
  """``gpt_config`` with every ``attention`` slot of its layout made a Liger mixer.

  Args:
    gpt_config: a config whose layout has at least one ``attention`` slot.
    mixer: ``liger_attention`` or ``liger_gla``.
    window: the sliding window of ``liger_attention`` (ignored by ``liger_gla``).
    lora_rank: rank of the LoRA deltas on q/k/v; 0 for none.
    lora_alpha: LoRA scale numerator (the deltas are scaled by alpha / rank).

  Returns:
    The Liger config: the attention slots keep their heads, head width, kv
    heads, bias and (for ``liger_attention``) rotary base; ``max_len`` is dropped.
  """
  if mixer not in MIXERS:
    raise ValueError(f"mixer={mixer!r}; expected one of {', '.join(MIXERS)}")
  if not any(spec.name == "attention" for spec in gpt_config.layout):
    raise ValueError(
        "the layout has no 'attention' slot to linearize; its mixers are "
        f"{[spec.name for spec in gpt_config.layout]}")
  extra = {"lora_rank": lora_rank, "lora_alpha": lora_alpha}
  if mixer == "liger_attention":
    extra["window"] = window

  def convert(spec: MixerSpec) -> MixerSpec:
    if spec.name != "attention":
      return spec
    kwargs = {k: v for k, v in spec.kwargs if k not in _DROPPED[mixer]}
    kwargs.update(extra)
    return MixerSpec(mixer, tuple(sorted(kwargs.items())))

  return dataclasses.replace(gpt_config, layout=tuple(convert(s) for s in gpt_config.layout))


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _flat(tree) -> dict[tuple[str, ...], Any]:
  """``{path of keys: leaf}``, a partitioning box counting as one leaf."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]
  return {tuple(str(k.key) for k in path): leaf for path, leaf in flat}


def _is_lora(path: tuple[str, ...]) -> bool:
  return any("lora" in key for key in path)


def lora_mask(params):
  """A tree of bools shaped like ``params``: True exactly at the LoRA parameters."""
  paths = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
  leaves = [_is_lora(tuple(str(k.key) for k in path)) for path, _ in paths[0]]
  return jax.tree_util.tree_unflatten(paths[1], leaves)


@functools.lru_cache(maxsize=16)
def _lora_init(config: ModelConfig):
  """Jitted ``rng ↦ {"path/of/leaf": value}`` of the model's LoRA parameters.

  Only the LoRA leaves are returned, so XLA drops every other initialiser;
  cached per config, so converting again does not compile again.
  """
  model = LanguageModel(config)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.jit(lambda key: {"/".join(p): v for p, v in _flat(nn.meta.unbox(
      model.init(key, tokens))).items() if _is_lora(p)})


def liger_params(gpt_params, liger_config: ModelConfig, rng):
  """The Liger model's parameters from the attention model's.

  Args:
    gpt_params: the attention model's variables ``{"params": ...}`` (as from
      ``LanguageModel(gpt_config).init``), boxed with logical axis names or not.
    liger_config: from :func:`liger_config` applied to that model's config.
    rng: key of the LoRA ``A`` matrices.

  Returns:
    ``{"params": ...}`` of ``LanguageModel(liger_config)``, boxed like
    ``gpt_params``: every attention-model parameter carried over unchanged,
    every LoRA parameter freshly initialised (``B = 0``).

  Raises:
    ValueError: when a parameter of either model has no counterpart of the
      same shape in the other (other than the LoRA ones).
  """
  if not isinstance(gpt_params, dict) or "params" not in gpt_params:
    raise ValueError("gpt_params must be the variables {'params': ...} of a LanguageModel")
  model = LanguageModel(liger_config)
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed_shapes = jax.eval_shape(model.init, rng, tokens)
  target = _flat(boxed_shapes)
  source = _flat(gpt_params)

  missing = sorted(p for p in source if p not in target)
  if missing:
    raise ValueError(f"attention-model parameters with no place in the Liger model: "
                     f"{['/'.join(p) for p in missing]}")
  foreign = sorted(p for p in target if p not in source and not _is_lora(p))
  if foreign:
    raise ValueError(f"Liger parameters that are neither in the attention model nor LoRA: "
                     f"{['/'.join(p) for p in foreign]}")
  for path, leaf in source.items():
    want, got = nn.meta.unbox(target[path]), nn.meta.unbox(leaf)
    if (want.shape, want.dtype) != (got.shape, jnp.dtype(got.dtype)):
      raise ValueError(f"parameter {'/'.join(path)} is {got.dtype}{list(got.shape)} in the "
                       f"attention model and {want.dtype}{list(want.shape)} in the Liger model")

  lora = _lora_init(liger_config)(rng)
  boxed = any(_is_box(leaf) for leaf in source.values())

  def leaf_at(path, shape_leaf):
    path = tuple(str(k.key) for k in path)
    if path in source:
      value = nn.meta.unbox(source[path])
    else:
      value = lora["/".join(path)]
    return shape_leaf.replace_boxed(value) if boxed and _is_box(shape_leaf) else value

  return jax.tree_util.tree_map_with_path(leaf_at, boxed_shapes, is_leaf=_is_box)
