"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"; BASED's benchmark).

An example of length ``L`` with ``n`` key–value pairs over a vocabulary of ``V``::

    k₁ v₁ k₂ v₂ … kₙ vₙ │ · · k₃ · · · k₁ · k₂ · · · …
    └── context (2n) ──┘ └──── L − 2n: queries among random filler ────┘

* keys from ``[1, V/2)``, values from ``[V/2, V)``, no key repeated in an example;
* every key is queried once, at an even offset ``2·g`` of the query region, the
  gaps ``g`` drawn without replacement from ``{0 … (L−2n)/2 − 1}`` with
  ``p(g) ∝ (g + 1)^{a−1}`` (``a = 0.01``: most queries come soon after the context);
* the label of a query is its key's value, predicted *at the query position*
  (the token the model reads next is filler); nothing else is scored;
* every other position holds a random token of ``[0, V)``.

``num_passes = p`` repeats the key–value block ``p`` times before the queries
(JRT-Prompt on MQAR): the example is ``2n(p − 1)`` tokens longer.
Metric: accuracy over the scored positions (``evaluation.recall``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recurrent_lm.data.synthetic import _example


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """One MQAR setting.

  Attributes:
    vocab_size: V (even; BASED's figure uses 8192).
    seq_len: L, the length before JRT repeats.
    num_kv_pairs: n, with ``2n ≤ L`` and ``n < V/2``.
    power_a: the gap distribution's exponent ``a``.
    num_passes: copies of the key–value block (1: the plain task).
  """
  vocab_size: int = 8192
  seq_len: int = 64
  num_kv_pairs: int = 4
  power_a: float = 0.01
  num_passes: int = 1

  def __post_init__(self):
    for name in ("vocab_size", "seq_len", "num_kv_pairs", "num_passes"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"MQARConfig.{name}={value!r}; expected a positive int")
    if self.vocab_size % 2 or self.num_kv_pairs >= self.vocab_size // 2:
      raise ValueError(f"MQARConfig.vocab_size={self.vocab_size}; expected an even V with "
                       f"V/2 > num_kv_pairs={self.num_kv_pairs}")
    if 4 * self.num_kv_pairs > self.seq_len:
      raise ValueError(f"MQARConfig.seq_len={self.seq_len}; expected at least 4·num_kv_pairs="
                       f"{4 * self.num_kv_pairs} (the pairs, then room for every query)")
    if not 0 < self.power_a <= 1:
      raise ValueError(f"MQARConfig.power_a={self.power_a}; expected 0 < a ≤ 1")


def mqar_example(config: MQARConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One example (module docstring), drawn from ``rng``."""
  v, n, length = config.vocab_size, config.num_kv_pairs, config.seq_len
  keys = rng.choice(np.arange(1, v // 2), size=n, replace=False)
  values = rng.choice(np.arange(v // 2, v), size=n, replace=False)
  context = np.empty(2 * n, np.int64)
  context[0::2], context[1::2] = keys, values
  space = (length - 2 * n) // 2
  p = (np.arange(1, space + 1, dtype=np.float64)) ** (config.power_a - 1)
  gaps = rng.choice(space, size=n, replace=False, p=p / p.sum())
  inputs = rng.integers(0, v, size=length)
  targets = np.zeros(length, np.int64)
  loss_mask = np.zeros(length, np.int32)
  inputs[:2 * n] = context
  positions = 2 * n + 2 * gaps
  inputs[positions], targets[positions], loss_mask[positions] = keys, values, 1
  # Unscored positions predict the next token read (the stream's own next token).
  unscored = loss_mask == 0
  targets[unscored] = np.append(inputs[1:], 0)[unscored]
  example = _example.make_example(inputs, targets, loss_mask, context_len=2 * n,
                                  num_kv_pairs=n, seq_len=length)
  return _example.jrt_example(example, config.num_passes)


class MQARSource(_example.Source):
  """``num_examples`` MQAR examples; example ``i`` from ``default_rng([seed, i])`` (grain source)."""

  def __init__(self, config: MQARConfig = MQARConfig(), num_examples: int = 1000, seed: int = 0):
    super().__init__(num_examples, seed)
    self.config = config

  def draw(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return mqar_example(self.config, rng)
