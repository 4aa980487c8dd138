"""The example format every synthetic task emits, batching, and JRT-Prompt on examples.

A task source is a grain random-access source (``__len__``, ``__getitem__``):
example ``i`` is drawn from ``np.random.default_rng([seed, i])`` alone, so it
is the same whatever order, shard or worker reads it. An example is a dict of
numpy arrays of one length ``T``::

    inputs       [T] int32   what the model reads
    targets      [T] int32   the token to predict at each position (its label)
    loss_mask    [T] int32   1 where the position is scored (a label), else 0
    context_len  []  int32   leading tokens that are the context JRT-Prompt repeats

A task may add fields of its own (``num_kv_pairs``, ``set_order``, ``dfa_index``…),
as ``[]`` int32 scalars so that batches stack. ``batches`` pads examples to a
common length with ``segment_ids`` 0 (the training step's padding), so a batch
is exactly what ``recurrent_lm.training.step`` reads::

    inputs, targets, loss_mask, segment_ids  [B, L] int32   (+ the per-example scalars [B])
"""

from __future__ import annotations

import abc
from typing import Iterable, Mapping

import numpy as np

FIELDS = ("inputs", "targets", "loss_mask")


def make_example(inputs, targets, loss_mask, context_len: int, **extra) -> dict[str, np.ndarray]:
  """An example dict (module docstring), checked for matching lengths."""
  example = {"inputs": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32),
             "loss_mask": np.asarray(loss_mask, np.int32)}
  lengths = {name: value.shape for name, value in example.items()}
  if len(set(lengths.values())) != 1 or example["inputs"].ndim != 1:
    raise ValueError(f"example fields have shapes {lengths}; expected one shape [T]")
  if not 0 <= context_len <= example["inputs"].size:
    raise ValueError(f"context_len={context_len}; expected 0..{example['inputs'].size}")
  example["context_len"] = np.int32(context_len)
  example.update({name: np.int32(value) for name, value in extra.items()})
  return example


def jrt_example(example: Mapping[str, np.ndarray], repeats: int = 2) -> dict[str, np.ndarray]:
  """JRT-Prompt on an example: its context read ``repeats`` times, then the rest.

  With ``c = inputs[:context_len]``, the new inputs are ``c ‖ c ‖ … ‖ inputs[context_len:]``.
  The copies before the last are unscored (``loss_mask`` 0, each token's target the
  next token read); the last copy and the rest keep their labels and mask, so the
  same positions are scored on the same labels, only with the context read more
  often. ``context_len`` becomes the length of all the copies.
  """
  if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
    raise ValueError(f"repeats={repeats!r}; expected a positive int")
  n = int(example["context_len"])
  if repeats == 1 or n == 0:
    return dict(example)
  context = example["inputs"][:n]
  extra = repeats - 1
  # Targets of the extra copies: the next token read (the next copy's first token last).
  copy_targets = np.concatenate([context[1:], context[:1]])
  out = dict(example)
  out["inputs"] = np.concatenate([np.tile(context, extra), example["inputs"]])
  out["targets"] = np.concatenate([np.tile(copy_targets, extra), example["targets"]])
  out["loss_mask"] = np.concatenate([np.zeros(extra * n, np.int32), example["loss_mask"]])
  out["context_len"] = np.int32(repeats * n)
  return out


def batches_of(examples: Iterable[Mapping[str, np.ndarray]],
               seq_len: int | None = None) -> dict[str, np.ndarray]:
  """Stack examples into one batch, padded on the right to ``seq_len`` (their longest if None).

  Returns the fields of the module docstring: ``[B, L]`` arrays with ``segment_ids``
  1 on an example's tokens and 0 on padding (padding is unscored), and ``[B]``
  arrays of the per-example scalars.
  """
  examples = list(examples)
  if not examples:
    raise ValueError("no examples to batch; expected at least one")
  longest = max(e["inputs"].size for e in examples)
  length = longest if seq_len is None else seq_len
  if longest > length:
    raise ValueError(f"an example has {longest} tokens; expected at most seq_len={length}")
  batch = {name: np.zeros((len(examples), length), np.int32)
           for name in FIELDS + ("segment_ids",)}
  for row, example in enumerate(examples):
    size = example["inputs"].size
    for name in FIELDS:
      batch[name][row, :size] = example[name]
    batch["segment_ids"][row, :size] = 1
  for name in examples[0]:
    if name not in FIELDS:
      batch[name] = np.stack([np.asarray(e[name]) for e in examples])
  return batch


class Source(abc.ABC):
  """A grain random-access source whose example ``i`` is ``draw(i, default_rng([seed, i]))``.

  Subclasses define ``draw``; the example then depends on ``(seed, i)`` alone.
  """

  def __init__(self, num_examples: int, seed: int):
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
      raise ValueError(f"num_examples={num_examples!r}; expected a positive int")
    self.num_examples, self.seed = num_examples, seed

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    return self.draw(int(index), np.random.default_rng([self.seed, int(index)]))

  @abc.abstractmethod
  def draw(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Example ``index``, drawn from ``rng`` alone."""

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({getattr(self, 'config', '')}, "
            f"num_examples={self.num_examples}, seed={self.seed})")


class InMemorySource:
  """A source's examples drawn once and held in memory (a grain source).

  The papers train on fixed sets (e.g. MQAR's 100k examples); drawing them once
  lets every model of a sweep read the same examples without redrawing them.
  """

  def __init__(self, source):
    self.source = source          # what drew them (ICLL's metric needs its DFAs)
    self.examples = [source[i] for i in range(len(source))]
    self.max_len = max(e["inputs"].size for e in self.examples)   # pad batches to it: one shape

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.examples[index]

  def __repr__(self) -> str:
    return f"InMemorySource({self.source!r})"
