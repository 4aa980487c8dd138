"""The mixer registry: token-mixer names → constructors.

A constructor is called as ``make(d_model, dtype=..., param_dtype=..., **kwargs)``
and returns a Flax module following the mixer protocol of
:mod:`recurrent_lm.layers`. Layouts name mixers by these names, so a config
file can say ``{"mixer": "gla", "num_heads": 4}``.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from recurrent_lm import layers

MixerFactory = Callable[..., nn.Module]

_MIXERS: dict[str, MixerFactory] = {}


def register_mixer(name: str, factory: MixerFactory) -> None:
  """Registers ``factory`` under ``name``; a name is registered once."""
  if name in _MIXERS:
    raise ValueError(f"mixer {name!r} is already registered")
  _MIXERS[name] = factory


def mixer_names() -> tuple[str, ...]:
  """The registered mixer names, sorted."""
  return tuple(sorted(_MIXERS))


def get_mixer(name: str) -> MixerFactory:
  """The constructor registered under ``name``."""
  try:
    return _MIXERS[name]
  except KeyError:
    raise ValueError(
        f"unknown mixer {name!r}; expected one of {', '.join(mixer_names())}") from None


def _sliding_window(d_model: int, *, window: int, **kwargs) -> layers.Attention:
  """Softmax attention over the last ``window`` tokens (a ring-buffer cache)."""
  return layers.Attention(d_model, window=window, **kwargs)


def _based(d_model: int, *, num_heads: int, feature_dim: int = 16, **kwargs):
  """BASED's linear attention: Taylor features of width d′ = 16, normalised."""
  return layers.LinearAttention(d_model, num_heads=num_heads, feature_dim=feature_dim,
                                feature_map="taylor", normalize=True, **kwargs)


def _miras(objective: str, retention: str):
  """A Miras model's memory: a 2-layer MLP (expansion 4), plain gradient steps."""
  def make(d_model: int, **kwargs) -> layers.NeuralMemory:
    options = dict(memory="mlp", objective=objective, retention=retention, momentum=False)
    return layers.NeuralMemory(d_model, **{**options, **kwargs})
  make.__doc__ = f"Miras: {objective} attentional bias, {retention} retention."
  return make


register_mixer("attention", layers.Attention)
register_mixer("based", _based)
register_mixer("base_conv", layers.BaseConv)
register_mixer("sliding_window", _sliding_window)
register_mixer("h3", layers.H3)
register_mixer("jrt", layers.PrefixLinearAttention)
register_mixer("liger_gla", layers.LigerGLA)
register_mixer("liger_attention", layers.LigerAttention)
register_mixer("linear_attention", layers.LinearAttention)
register_mixer("gla", layers.GatedLinearAttention)
register_mixer("mamba", layers.Mamba)
register_mixer("mamba2", layers.Mamba2)
register_mixer("mlstm", layers.MLSTM)
register_mixer("qlstm", layers.QLSTM)
register_mixer("slstm", layers.SLSTM)
register_mixer("ngram", layers.NGramHead)
register_mixer("titans", layers.NeuralMemory)
register_mixer("titans_mag", layers.TitansMAG)
register_mixer("titans_mac", layers.TitansMAC)
register_mixer("moneta", _miras("lp", "lq"))
register_mixer("yaad", _miras("huber", "decay"))
register_mixer("memora", _miras("l2", "kl"))
