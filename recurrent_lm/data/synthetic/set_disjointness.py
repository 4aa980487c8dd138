"""Set disjointness (Arora et al. 2024, "Just read twice"): find the one shared token.

An example with sets ``A`` and ``B`` (``|A| = a``, ``|B| = b``)::

    [sep1] A₁ … A_a [sep2] B₁ … B_b [sep3]   →  label at [sep3]: the token in A ∩ B
    └──────────────── context ─────────────┘

Tokens 1, 2, 3 are the separators; set tokens are drawn from ``[4, V)``. Each set
has distinct tokens and ``A ∩ B`` is exactly one token, planted at a random
position of ``B``. Only the last position is scored.

JRT's description says A and B come from disjoint halves of the vocabulary.
Its reference (``HazyResearch/prefix-linear-attention``,
``synthetic/zoology/data/non_autoreg.py``) splits the vocabulary into two
*random* halves per example, which is the same distribution as drawing the
``|A| + |B| − 1`` distinct tokens from the whole range — what we do. With
*fixed* halves (``disjoint_halves=True``: A from the lower, B from the upper)
the shared token is the one token of ``B`` from the lower half and can be found
from ``B`` alone, so the order of the sets could not matter; the option is
there to show that, not to train on.

The claim measured with it: a recurrent model needs less state when the
shorter set comes first (``set_order`` = ``SHORT_FIRST``), since it then has
fewer tokens to remember. JRT's train sizes ``(a, b)`` are ``TRAIN_SIZES``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recurrent_lm.data.synthetic import _example

SEP1, SEP2, SEP3 = 1, 2, 3
FIRST_SET_TOKEN = 4
SHORT_FIRST, LONG_FIRST, EQUAL = 0, 1, 2
# JRT's training sizes (|A|, |B|); 20k examples each in the paper.
TRAIN_SIZES = ((4, 16), (16, 4), (8, 32), (32, 8), (64, 16), (16, 64), (4, 128), (128, 4),
               (16, 256), (256, 16), (4, 256), (256, 4))


@dataclasses.dataclass(frozen=True)
class SetDisjointnessConfig:
  """One set-disjointness setting.

  Attributes:
    vocab_size: V (JRT uses 2048).
    sizes: the ``(|A|, |B|)`` pairs; example ``i`` has ``sizes[i % len(sizes)]``.
    disjoint_halves: draw A from ``[4, m)`` and B from ``[m, V)`` (the shared
      token aside), m the midpoint: fixed halves, solvable without remembering A
      (module docstring).
  """
  vocab_size: int = 2048
  sizes: tuple[tuple[int, int], ...] = TRAIN_SIZES
  disjoint_halves: bool = False

  def __post_init__(self):
    if not self.sizes:
      raise ValueError("SetDisjointnessConfig.sizes is empty; expected (|A|, |B|) pairs")
    pool = self.vocab_size - FIRST_SET_TOKEN
    for a, b in self.sizes:
      if min(a, b) < 1:
        raise ValueError(f"set sizes {(a, b)}; expected both ≥ 1")
      need = max(a, b) if self.disjoint_halves else a + b - 1
      room = pool // 2 if self.disjoint_halves else pool
      if need > room:
        raise ValueError(f"set sizes {(a, b)} need {need} distinct tokens; vocab_size="
                         f"{self.vocab_size} gives {room}")

  @property
  def max_len(self) -> int:
    """The longest example: ``3 + |A| + |B|``."""
    return 3 + max(a + b for a, b in self.sizes)


def set_order(a: int, b: int) -> int:
  """``SHORT_FIRST`` when ``|A| < |B|``, ``LONG_FIRST`` when ``|A| > |B|``, else ``EQUAL``."""
  return SHORT_FIRST if a < b else LONG_FIRST if a > b else EQUAL


def set_disjointness_example(config: SetDisjointnessConfig, sizes: tuple[int, int],
                             rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One example with ``(|A|, |B|) = sizes`` (module docstring), drawn from ``rng``."""
  a, b = sizes
  if config.disjoint_halves:
    mid = FIRST_SET_TOKEN + (config.vocab_size - FIRST_SET_TOKEN) // 2
    set_a = rng.choice(np.arange(FIRST_SET_TOKEN, mid), size=a, replace=False)
    rest_b = rng.choice(np.arange(mid, config.vocab_size), size=b - 1, replace=False)
  else:
    drawn = rng.choice(np.arange(FIRST_SET_TOKEN, config.vocab_size), size=a + b - 1,
                       replace=False)
    set_a, rest_b = drawn[:a], drawn[a:]
  shared = set_a[rng.integers(a)]
  set_b = np.insert(rest_b, rng.integers(b), shared)
  inputs = np.concatenate([[SEP1], set_a, [SEP2], set_b, [SEP3]])
  targets = np.append(inputs[1:], shared)
  loss_mask = np.zeros(inputs.size, np.int32)
  loss_mask[-1] = 1
  return _example.make_example(inputs, targets, loss_mask, context_len=inputs.size - 1,
                               size_a=a, size_b=b, set_order=set_order(a, b))


class SetDisjointnessSource(_example.Source):
  """``num_examples`` examples cycling through ``config.sizes`` (grain source)."""

  def __init__(self, config: SetDisjointnessConfig = SetDisjointnessConfig(),
               num_examples: int = 1000, seed: int = 0):
    super().__init__(num_examples, seed)
    self.config = config

  def draw(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sizes = self.config.sizes[index % len(self.config.sizes)]
    return set_disjointness_example(self.config, sizes, rng)
