"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

    logits [B, V] --(÷ temperature)--> keep the k largest --> keep the smallest
    set whose probability reaches p --> categorical draw with an explicit key

``temperature == 0`` is greedy (argmax; the key is unused). Filters compose:
top-k first, then top-p on what is left (as in Hugging Face's and most
reference samplers). Ties at the k-th value are all kept.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn.

  Attributes:
    temperature: divides the logits; 0 is greedy decoding.
    top_k: keep the ``top_k`` most likely tokens (0: all).
    top_p: keep the most likely tokens whose probabilities sum to at least
      ``top_p`` (nucleus sampling; 1.0: all). The most likely token is always kept.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature={self.temperature}; expected >= 0 (0: greedy)")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k={self.top_k!r}; expected an int >= 0 (0: no top-k filter)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p}; expected 0 < top_p <= 1")


GREEDY = Sampling(temperature=0.0)


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """``logits`` ``[B, V]`` divided by the temperature, with the tokens that
  top-k and top-p drop set to ``-inf``."""
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs        # probability of the tokens ahead
    # The smallest logit still kept: the last one whose predecessors sum below p.
    keep = before < sampling.top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """``[B]`` int32 next tokens from ``logits`` ``[B, V]``."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)
