"""One entry for every kind of model config: a plain LM, or HMT around one.

    config = models.config_from_dict(run_config["model"])   # ModelConfig or HMTConfig
    model = models.build(config)                             # LanguageModel or HMT
    logits, state = model.apply(params, tokens, state=None, segment_ids=None)

Both follow the same protocol, so training, evaluation and generation take
either; these functions are where the two differ.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

import flax.linen as nn

from recurrent_lm.models import hmt, lm

Config = Union[lm.ModelConfig, hmt.HMTConfig]


def config_from_dict(config: Mapping[str, Any]) -> Config:
  """A ``ModelConfig``, or an ``HMTConfig`` when the dict has a ``backbone``."""
  return (hmt.HMTConfig.from_dict(config) if "backbone" in config
          else lm.ModelConfig.from_dict(config))


def build(config: Config) -> nn.Module:
  """The module of ``config``."""
  if isinstance(config, hmt.HMTConfig):
    return hmt.HMT(config)
  if isinstance(config, lm.ModelConfig):
    return lm.LanguageModel(config)
  raise TypeError(f"model config is a {type(config).__name__}; expected a ModelConfig or "
                  "an HMTConfig")


def state_bytes(config: Config, batch_size: int = 1) -> int:
  """Bytes of the state the model carries between calls (``lm.state_bytes``)."""
  if isinstance(config, hmt.HMTConfig):
    return hmt.state_bytes(config, batch_size)
  return lm.state_bytes(config, batch_size)


def prefix_len(config: Config) -> int | None:
  """JRT's prefix length M (``lm.prefix_len``); HMT's backbones have none."""
  return None if isinstance(config, hmt.HMTConfig) else lm.prefix_len(config)
