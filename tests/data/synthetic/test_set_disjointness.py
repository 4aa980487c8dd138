"""Set disjointness (JRT): the [SEP1] A [SEP2] B [SEP3] layout, set sizes and tokens, the one
shared token as the only label, disjoint halves, set order, uniform placement, validation,
determinism."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from recurrent_lm.data.synthetic import set_disjointness as sd

ALPHA = 1e-6   # chi-square rejection level (fresh seeds: a false failure ~1e-6 likely)
SIZES = ((4, 16), (16, 4), (8, 8), (1, 1), (1, 9), (9, 1), (30, 20))


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 31))


def _sets(example):
  """A and B read back from the layout."""
  a, b = int(example["size_a"]), int(example["size_b"])
  inputs = example["inputs"]
  return inputs[1:1 + a], inputs[2 + a:2 + a + b]


@pytest.mark.parametrize("disjoint_halves", [False, True])
def test_layout_sets_and_the_shared_label(disjoint_halves):
  seed = _seed()
  v = 128
  config = sd.SetDisjointnessConfig(vocab_size=v, sizes=SIZES, disjoint_halves=disjoint_halves)
  source = sd.SetDisjointnessSource(config, 3 * len(SIZES), seed)
  mid = sd.FIRST_SET_TOKEN + (v - sd.FIRST_SET_TOKEN) // 2
  for i in range(len(source)):
    example = source[i]
    msg = f"seed {seed}, example {i}"
    a, b = SIZES[i % len(SIZES)]                         # sizes cycle with the index
    assert (example["size_a"], example["size_b"]) == (a, b), msg
    inputs = example["inputs"]
    for name in ("inputs", "targets", "loss_mask"):
      assert example[name].shape == (3 + a + b,) and example[name].dtype == np.int32, msg
    assert (inputs[0], inputs[1 + a], inputs[-1]) == (sd.SEP1, sd.SEP2, sd.SEP3), msg
    set_a, set_b = _sets(example)
    assert np.all(set_a >= sd.FIRST_SET_TOKEN) and np.all(set_b >= sd.FIRST_SET_TOKEN), msg
    assert np.all(inputs < v), msg
    assert len(set(set_a.tolist())) == a and len(set(set_b.tolist())) == b, msg
    shared = set(set_a.tolist()) & set(set_b.tolist())
    assert len(shared) == 1, (shared, msg)
    # The only scored position is [SEP3], labelled with the shared token.
    np.testing.assert_array_equal(np.flatnonzero(example["loss_mask"]), [a + b + 2], err_msg=msg)
    assert example["targets"][-1] == shared.pop(), msg
    np.testing.assert_array_equal(example["targets"][:-1], inputs[1:], err_msg=msg)
    assert example["context_len"] == a + b + 2, msg      # all but [SEP3]
    assert example["set_order"] == sd.set_order(a, b), msg
    if disjoint_halves:
      assert np.all(set_a < mid), (set_a, msg)
      others = set_b[set_b != example["targets"][-1]]
      assert others.size == b - 1 and np.all(others >= mid), (set_b, msg)


def test_without_disjoint_halves_both_sets_span_the_range():
  """A and B's other tokens each reach both halves of the vocabulary (the default's point)."""
  seed = _seed()
  v = 64
  config = sd.SetDisjointnessConfig(vocab_size=v, sizes=((16, 16),))
  source = sd.SetDisjointnessSource(config, 100, seed)
  mid = sd.FIRST_SET_TOKEN + (v - sd.FIRST_SET_TOKEN) // 2
  a_tokens, b_tokens = [], []
  for i in range(100):
    set_a, set_b = _sets(source[i])
    a_tokens.append(set_a)
    b_tokens.append(set_b[set_b != source[i]["targets"][-1]])
  a_tokens, b_tokens = np.concatenate(a_tokens), np.concatenate(b_tokens)
  for tokens in (a_tokens, b_tokens):
    assert (tokens < mid).any() and (tokens >= mid).any(), seed
    assert np.unique(tokens).size == v - sd.FIRST_SET_TOKEN, seed   # all 60 tokens drawn


def test_sizes_using_the_whole_vocabulary():
  seed = _seed()
  full = sd.SetDisjointnessSource(sd.SetDisjointnessConfig(16, ((6, 7), (12, 1))), 4, seed)
  for i in range(4):
    set_a, set_b = _sets(full[i])
    assert set(set_a.tolist()) | set(set_b.tolist()) == set(range(4, 16)), (i, seed)
  halves = sd.SetDisjointnessSource(sd.SetDisjointnessConfig(16, ((6, 6),), True), 4, seed)
  for i in range(4):
    set_a, _ = _sets(halves[i])
    assert sorted(set_a.tolist()) == list(range(4, 10)), (i, seed)


def test_set_order():
  assert sd.set_order(3, 5) == sd.SHORT_FIRST == 0
  assert sd.set_order(5, 3) == sd.LONG_FIRST == 1
  assert sd.set_order(4, 4) == sd.EQUAL == 2
  source = sd.SetDisjointnessSource(sd.SetDisjointnessConfig(64, ((2, 9), (9, 2), (5, 5))), 6)
  assert [int(source[i]["set_order"]) for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_shared_token_sits_uniformly_in_b_and_in_a():
  seed = _seed()
  a, b, samples = 6, 8, 2400
  source = sd.SetDisjointnessSource(sd.SetDisjointnessConfig(64, ((a, b),)), samples, seed)
  where_a, where_b = [], []
  for i in range(samples):
    example = source[i]
    set_a, set_b = _sets(example)
    shared = example["targets"][-1]
    where_a.append(int(np.flatnonzero(set_a == shared)[0]))
    where_b.append(int(np.flatnonzero(set_b == shared)[0]))
  counts_b = np.bincount(where_b, minlength=b)
  counts_a = np.bincount(where_a, minlength=a)
  assert counts_b.size == b and counts_a.size == a, (counts_a, counts_b)
  assert stats.chisquare(counts_b).pvalue > ALPHA, (counts_b, seed)
  assert stats.chisquare(counts_a).pvalue > ALPHA, (counts_a, seed)
  # And within ±25% of the mean everywhere (~300 per place; 25% is > 4 standard deviations).
  assert np.all(np.abs(counts_b / (samples / b) - 1) < 0.25), (counts_b, seed)


@pytest.mark.parametrize("v,sizes,halves,match", [
    (16, ((6, 8),), False, r"set sizes \(6, 8\) need 13 distinct tokens; vocab_size=16 gives 12"),
    (16, ((1, 1), (13, 1)), False, r"set sizes \(13, 1\) need 13"),
    (16, ((6, 7),), True, r"set sizes \(6, 7\) need 7 distinct tokens; vocab_size=16 gives 6"),
    (16, ((7, 1),), True, r"set sizes \(7, 1\) need 7"),
    (2048, ((4, 16), (2100, 1)), False, r"set sizes \(2100, 1\)"),
    (4, ((1, 1),), False, r"vocab_size=4 gives 0"),
    (64, ((0, 3),), False, r"set sizes \(0, 3\); expected both ≥ 1"),
    (64, ((3, -1),), False, r"set sizes \(3, -1\); expected both ≥ 1"),
    (64, (), False, "sizes is empty"),
])
def test_config_validation(v, sizes, halves, match):
  with pytest.raises(ValueError, match=match) as info:
    sd.SetDisjointnessConfig(vocab_size=v, sizes=sizes, disjoint_halves=halves)
  assert "\n" not in str(info.value)


def test_config_defaults_and_max_len():
  config = sd.SetDisjointnessConfig()
  assert config.vocab_size == 2048 and config.sizes == sd.TRAIN_SIZES
  assert not config.disjoint_halves
  assert config.max_len == 3 + 256 + 16
  assert sd.SetDisjointnessConfig(64, ((2, 3), (10, 1))).max_len == 14
  source = sd.SetDisjointnessSource(config, 2 * len(sd.TRAIN_SIZES), _seed())
  assert max(source[i]["inputs"].size for i in range(len(source))) == config.max_len


def test_examples_are_determined_by_seed_and_index():
  seed = _seed()
  config = sd.SetDisjointnessConfig(vocab_size=256, sizes=((5, 9), (9, 5)))
  one, two = sd.SetDisjointnessSource(config, 40, seed), sd.SetDisjointnessSource(config, 40, seed)
  first = {i: one[i] for i in range(40)}
  for i in np.random.default_rng(seed).permutation(40):
    again = two[int(i)]
    assert set(again) == set(first[int(i)])
    for name in again:
      np.testing.assert_array_equal(again[name], first[int(i)][name], err_msg=f"seed {seed}")
  assert len({first[i]["inputs"].tobytes() for i in range(40)}) == 40, seed
  other = sd.SetDisjointnessSource(config, 40, seed + 1)
  assert all(not np.array_equal(other[i]["inputs"], first[i]["inputs"]) for i in range(40))


def test_source_index_and_size_validation():
  source = sd.SetDisjointnessSource(sd.SetDisjointnessConfig(), 3, _seed())
  assert len(source) == 3 and "num_examples=3" in repr(source)
  for index in (3, -1):
    with pytest.raises(IndexError, match=f"index {index} out of range for 3 examples"):
      source[index]
  for num_examples in (0, -1, 1.5):
    with pytest.raises(ValueError, match="expected a positive int"):
      sd.SetDisjointnessSource(sd.SetDisjointnessConfig(), num_examples)
