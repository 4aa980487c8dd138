"""The synthetic tasks' example format: ``make_example``, ``jrt_example``, ``batches_of``,
``InMemorySource`` (``_example``) and the grain pipeline ``task_dataset`` (``__init__``)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from recurrent_lm import models
from recurrent_lm.data import synthetic
from recurrent_lm.data.synthetic import _example
from recurrent_lm.data.synthetic import set_disjointness
from recurrent_lm.training import step as step_lib

FIELDS = ("inputs", "targets", "loss_mask")


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 31))


def _random_example(rng: np.random.Generator, length: int, context_len: int,
                    **extra) -> dict[str, np.ndarray]:
  """An example of random tokens, scored at random positions after the context."""
  inputs = rng.integers(0, 50, size=length)
  targets = rng.integers(0, 50, size=length)
  loss_mask = np.zeros(length, np.int32)
  loss_mask[context_len:] = rng.integers(0, 2, size=length - context_len)
  return _example.make_example(inputs, targets, loss_mask, context_len, **extra)


class _ListSource:
  """A grain source over given examples, counting its reads."""

  def __init__(self, examples):
    self.examples, self.reads = list(examples), 0

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index: int):
    self.reads += 1
    return self.examples[index]


def _key(example) -> bytes:
  return np.asarray(example["inputs"]).tobytes()


# make_example ----------------------------------------------------------------------------


def test_make_example_gives_int32_fields_of_one_length_and_scalars():
  example = _example.make_example([5, 6, 7], np.array([6, 7, 0], np.int64), [0, 1, 1], 2,
                                  num_kv_pairs=1, set_order=np.int64(2))
  assert set(example) == {"inputs", "targets", "loss_mask", "context_len", "num_kv_pairs",
                          "set_order"}
  for name in FIELDS:
    assert example[name].dtype == np.int32 and example[name].shape == (3,), name
  np.testing.assert_array_equal(example["inputs"], [5, 6, 7])
  np.testing.assert_array_equal(example["targets"], [6, 7, 0])
  np.testing.assert_array_equal(example["loss_mask"], [0, 1, 1])
  for name, value in (("context_len", 2), ("num_kv_pairs", 1), ("set_order", 2)):
    assert example[name].dtype == np.int32 and example[name].shape == () and example[name] == value


@pytest.mark.parametrize("inputs,targets,loss_mask", [
    ([1, 2, 3], [1, 2], [0, 0, 1]),                    # targets shorter
    ([1, 2, 3], [1, 2, 3], [0, 1, 1, 0]),              # mask longer
    ([[1, 2], [3, 4]], [[1, 2], [3, 4]], [[0, 1], [0, 1]]),  # not 1-D
    (1, 2, 1),                                         # scalars
])
def test_make_example_rejects_fields_of_other_shapes(inputs, targets, loss_mask):
  with pytest.raises(ValueError, match="expected one shape"):
    _example.make_example(inputs, targets, loss_mask, 0)


def test_make_example_context_len_must_lie_in_0_to_length():
  for context_len in (0, 1, 4):
    example = _example.make_example([1] * 4, [1] * 4, [0] * 4, context_len)
    assert example["context_len"] == context_len
  for context_len in (-1, 5, 100):
    with pytest.raises(ValueError, match=rf"context_len={context_len}; expected 0\.\.4"):
      _example.make_example([1] * 4, [1] * 4, [0] * 4, context_len)


# jrt_example -----------------------------------------------------------------------------


@pytest.mark.parametrize("repeats", [1, 2, 3])
def test_jrt_example_reads_the_context_repeats_times_and_keeps_the_labels(repeats):
  seed = _seed()
  rng = np.random.default_rng(seed)
  for _ in range(20):
    length = int(rng.integers(2, 40))
    n = int(rng.integers(1, length + 1))
    original = _random_example(rng, length, n, size_a=int(rng.integers(100)))
    frozen = {k: np.copy(v) for k, v in original.items()}
    out = _example.jrt_example(original, repeats)
    shift = (repeats - 1) * n
    msg = f"seed {seed}, length {length}, context {n}"
    for k in frozen:                                    # the input is not modified
      np.testing.assert_array_equal(original[k], frozen[k], err_msg=msg)
    context = original["inputs"][:n]
    np.testing.assert_array_equal(
        out["inputs"], np.concatenate([context] * repeats + [original["inputs"][n:]]), err_msg=msg)
    for name in FIELDS:
      assert out[name].dtype == np.int32 and out[name].shape == (length + shift,), msg
      # The last copy and the rest: the original, shifted by the extra copies.
      np.testing.assert_array_equal(out[name][shift:], original[name], err_msg=msg)
    # The same positions are scored, on the same labels, shifted.
    scored = np.flatnonzero(original["loss_mask"])
    np.testing.assert_array_equal(np.flatnonzero(out["loss_mask"]), scored + shift, err_msg=msg)
    np.testing.assert_array_equal(out["targets"][scored + shift], original["targets"][scored],
                                  err_msg=msg)
    # The extra copies are unscored and predict the next token read.
    assert not out["loss_mask"][:shift].any(), msg
    np.testing.assert_array_equal(out["targets"][:shift], out["inputs"][1:shift + 1], err_msg=msg)
    assert out["context_len"] == repeats * n and out["context_len"].dtype == np.int32, msg
    assert out["size_a"] == original["size_a"], msg


def test_jrt_example_of_an_example_without_context_is_unchanged():
  example = _random_example(np.random.default_rng(_seed()), 7, 0)
  out = _example.jrt_example(example, 3)
  assert set(out) == set(example) and out["context_len"] == 0
  for name in FIELDS:
    np.testing.assert_array_equal(out[name], example[name])


def test_jrt_example_of_a_whole_example_context():
  example = _example.make_example([4, 5, 6], [5, 6, 9], [0, 0, 1], 3)
  out = _example.jrt_example(example, 2)
  np.testing.assert_array_equal(out["inputs"], [4, 5, 6, 4, 5, 6])
  np.testing.assert_array_equal(out["targets"], [5, 6, 4, 5, 6, 9])
  np.testing.assert_array_equal(out["loss_mask"], [0, 0, 0, 0, 0, 1])
  assert out["context_len"] == 6


@pytest.mark.parametrize("repeats", [0, -1, 1.0, 2.5, True, "2", None])
def test_jrt_example_rejects_repeats_that_are_not_positive_ints(repeats):
  example = _random_example(np.random.default_rng(0), 6, 2)
  with pytest.raises(ValueError, match="expected a positive int"):
    _example.jrt_example(example, repeats)


# batches_of ------------------------------------------------------------------------------


def test_batches_of_pads_on_the_right_with_segment_ids_and_loss_mask_0():
  seed = _seed()
  rng = np.random.default_rng(seed)
  lengths = [int(x) for x in rng.integers(1, 30, size=6)]
  examples = [_random_example(rng, t, int(rng.integers(0, t + 1)), size_b=i)
              for i, t in enumerate(lengths)]
  for seq_len in (None, max(lengths), max(lengths) + 5):
    batch = _example.batches_of(iter(examples), seq_len=seq_len)
    width = max(lengths) if seq_len is None else seq_len
    assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "context_len", "size_b"}
    for name in FIELDS + ("segment_ids",):
      assert batch[name].shape == (6, width) and batch[name].dtype == np.int32, (name, seed)
    for row, (example, t) in enumerate(zip(examples, lengths)):
      for name in FIELDS:
        np.testing.assert_array_equal(batch[name][row, :t], example[name], err_msg=f"seed {seed}")
        assert not batch[name][row, t:].any(), (name, seed)
      np.testing.assert_array_equal(batch["segment_ids"][row],
                                    np.arange(width) < t, err_msg=f"seed {seed}")
    # Per-example scalars, stacked to [B].
    np.testing.assert_array_equal(batch["size_b"], np.arange(6))
    np.testing.assert_array_equal(batch["context_len"], [e["context_len"] for e in examples])
    assert batch["size_b"].shape == (6,) and batch["context_len"].shape == (6,)


def test_batches_of_rejects_a_seq_len_below_the_longest_example_and_no_examples():
  rng = np.random.default_rng(_seed())
  examples = [_random_example(rng, 5, 1), _random_example(rng, 9, 2)]
  with pytest.raises(ValueError, match="an example has 9 tokens; expected at most seq_len=8"):
    _example.batches_of(examples, seq_len=8)
  assert _example.batches_of(examples, seq_len=9)["inputs"].shape == (2, 9)
  with pytest.raises(ValueError, match="no examples"):
    _example.batches_of([])


# InMemorySource --------------------------------------------------------------------------


def test_in_memory_source_holds_the_source_examples():
  seed = _seed()
  source = synthetic.MQARSource(synthetic.MQARConfig(64, 32, 4), 12, seed)
  memory = synthetic.InMemorySource(source)
  assert len(memory) == 12 and repr(source) in repr(memory)
  for i in np.random.default_rng(seed).permutation(12):
    expected = source[int(i)]
    assert set(memory[int(i)]) == set(expected)
    for name in expected:
      np.testing.assert_array_equal(memory[int(i)][name], expected[name], err_msg=f"seed {seed}")
  counted = _ListSource(source[i] for i in range(5))
  memory = synthetic.InMemorySource(counted)
  reads = counted.reads
  for _ in range(3):
    [memory[i] for i in range(5)]
  assert reads == 5 and counted.reads == 5      # drawn once, then read from memory


# task_dataset ----------------------------------------------------------------------------


def _sd_source(num_examples: int, seed: int) -> synthetic.SetDisjointnessSource:
  config = synthetic.SetDisjointnessConfig(vocab_size=64, sizes=((2, 5), (6, 3), (4, 4)))
  return synthetic.SetDisjointnessSource(config, num_examples, seed)


def _assert_batches_equal(a, b, msg=""):
  assert set(a) == set(b), msg
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=msg)


def test_task_dataset_is_deterministic_by_seed():
  seed = _seed()
  source = _sd_source(40, seed)

  def first(ds_seed, count=6):
    it = iter(synthetic.task_dataset(source, batch_size=8, seed=ds_seed))
    return [next(it) for _ in range(count)]
  one, two, other = first(seed), first(seed), first(seed + 1)
  for a, b in zip(one, two):
    _assert_batches_equal(a, b, f"seed {seed}")
  assert any(not np.array_equal(a["inputs"], b["inputs"])
             for a, b in zip(one, other)), f"seeds {seed}, {seed + 1} read in the same order"
  # Repeated forever: 6 batches of 8 read 48 examples of 40, every one at least once.
  keys = [_key({"inputs": row[row > 0]}) for b in one for row in b["inputs"]]
  assert len(keys) == 48 and len(set(keys)) == 40


def test_task_dataset_one_epoch_in_order_reads_every_example_once():
  seed = _seed()
  source = _sd_source(22, seed)
  batches = list(synthetic.task_dataset(source, batch_size=8, num_epochs=1, shuffle=False))
  assert [b["inputs"].shape[0] for b in batches] == [8, 8, 6]
  rows = [{name: b[name][r] for name in b} for b in batches for r in range(b["inputs"].shape[0])]
  for i, row in enumerate(rows):
    expected = source[i]
    t = expected["inputs"].size
    for name in FIELDS:
      np.testing.assert_array_equal(row[name][:t], expected[name], err_msg=f"{i}, seed {seed}")
      assert not row[name][t:].any()
    assert row["segment_ids"].sum() == t
    for name in ("context_len", "size_a", "size_b", "set_order"):
      assert row[name] == expected[name], (name, i, seed)
  # Each batch is padded to its own longest example.
  for b in batches:
    assert b["inputs"].shape[1] == b["segment_ids"].sum(axis=1).max()


def test_task_dataset_one_shuffled_epoch_is_a_permutation():
  seed = _seed()
  source = _sd_source(21, seed)
  batches = list(synthetic.task_dataset(source, batch_size=4, seed=seed, num_epochs=1,
                                        seq_len=source.config.max_len))
  assert [b["inputs"].shape for b in batches] == [(4, 12)] * 5 + [(1, 12)]
  read = sorted(_key({"inputs": row[seg > 0]}) for b in batches
                for row, seg in zip(b["inputs"], b["segment_ids"]))
  assert read == sorted(_key(source[i]) for i in range(21)), f"seed {seed}"
  in_order = [_key(source[i]) for i in range(21)]
  read_order = [_key({"inputs": row[seg > 0]}) for b in batches
                for row, seg in zip(b["inputs"], b["segment_ids"])]
  assert read_order != in_order, f"seed {seed}: shuffle=True read in order"


@pytest.mark.parametrize("repeats", [2, 3])
def test_task_dataset_applies_jrt_repeats(repeats):
  seed = _seed()
  source = synthetic.MQARSource(synthetic.MQARConfig(64, 24, 3), 6, seed)
  (batch,) = list(synthetic.task_dataset(source, batch_size=6, num_epochs=1, shuffle=False,
                                         jrt_repeats=repeats))
  expected = _example.batches_of([_example.jrt_example(source[i], repeats) for i in range(6)])
  _assert_batches_equal(batch, expected, f"seed {seed}")
  assert batch["inputs"].shape == (6, 24 + 6 * (repeats - 1))
  np.testing.assert_array_equal(batch["context_len"], 6 * repeats)
  assert batch["loss_mask"].sum() == 6 * 3


@pytest.mark.parametrize("batch_size", [0, -2, 2.0, None])
def test_task_dataset_rejects_a_bad_batch_size(batch_size):
  with pytest.raises(ValueError, match="expected a positive int"):
    synthetic.task_dataset(_sd_source(4, 0), batch_size=batch_size)


def test_task_dataset_batches_are_what_the_training_step_reads():
  seed = _seed()
  source = _sd_source(16, seed)
  batch = next(iter(synthetic.task_dataset(source, batch_size=16, seed=seed)))
  for name in ("inputs", "targets", "loss_mask", "segment_ids"):
    assert batch[name].dtype == np.int32 and batch[name].shape == batch["inputs"].shape, name
  assert (batch["segment_ids"] == 0).any(), "sizes of different lengths give padding"
  config = models.presets.get("gpt_cpu_tiny", vocab_size=64)
  inputs, next_mask, mlm_mask = step_lib.loss_masks(config, batch, jax.random.key(seed))
  np.testing.assert_array_equal(np.asarray(inputs), batch["inputs"])
  # Scored: exactly the loss mask (one label per example, at [SEP3]), never padding.
  np.testing.assert_array_equal(np.asarray(next_mask), batch["loss_mask"])
  assert np.asarray(next_mask).sum() == 16 and not np.asarray(mlm_mask).any()
  last = batch["segment_ids"].sum(axis=1) - 1
  np.testing.assert_array_equal(batch["inputs"][np.arange(16), last], set_disjointness.SEP3)
  np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask"]) % batch["inputs"].shape[1],
                                last)
