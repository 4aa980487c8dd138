"""MQAR (Zoology / BASED): layout of keys, values and queries, labels and loss mask, filler,
the power-law gap distribution, JRT passes, determinism, config and index validation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from recurrent_lm.data.synthetic import _example
from recurrent_lm.data.synthetic import mqar

# Chi-square tests reject at this level: a fresh seed makes a false failure ~1e-6 likely.
ALPHA = 1e-6


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 31))


def _gap_probs(space: int, a: float) -> np.ndarray:
  p = np.arange(1, space + 1, dtype=np.float64) ** (a - 1)
  return p / p.sum()


def _queries(example, n: int, context: int):
  """The scored positions' offsets in the query region, keys and labels."""
  positions = np.flatnonzero(example["loss_mask"])
  return (positions - context, example["inputs"][positions], example["targets"][positions])


@pytest.mark.parametrize("v,length,n", [(64, 64, 4), (8192, 256, 16), (8, 12, 3), (32, 16, 4),
                                        (64, 63, 5), (16, 40, 1)])
def test_layout_keys_values_queries_and_labels(v, length, n):
  seed = _seed()
  config = mqar.MQARConfig(vocab_size=v, seq_len=length, num_kv_pairs=n)
  source = mqar.MQARSource(config, 40, seed)
  for i in range(len(source)):
    example = source[i]
    msg = f"seed {seed}, example {i}"
    for name in ("inputs", "targets", "loss_mask"):
      assert example[name].shape == (length,) and example[name].dtype == np.int32, msg
    assert example["context_len"] == 2 * n and example["num_kv_pairs"] == n, msg
    assert example["seq_len"] == length, msg
    inputs = example["inputs"]
    # The first 2n tokens: k v pairs, keys in [1, V/2), values in [V/2, V), all distinct.
    keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
    assert np.all((1 <= keys) & (keys < v // 2)), (keys, msg)
    assert np.all((v // 2 <= values) & (values < v)), (values, msg)
    assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n, msg
    # Every key queried once, at an even offset of the query region, labelled with its value.
    offsets, queried, labels = _queries(example, n, 2 * n)
    assert offsets.size == n == example["loss_mask"].sum(), msg
    assert np.all(offsets >= 0) and np.all(offsets % 2 == 0), (offsets, msg)
    assert np.all(offsets // 2 < (length - 2 * n) // 2), (offsets, msg)
    assert sorted(queried.tolist()) == sorted(keys.tolist()), msg
    value_of = dict(zip(keys.tolist(), values.tolist()))
    assert [value_of[k] for k in queried.tolist()] == labels.tolist(), msg
    assert set(np.unique(example["loss_mask"]).tolist()) <= {0, 1}, msg
    # Every token of the vocabulary; unscored positions predict the next token read.
    assert np.all((0 <= inputs) & (inputs < v)), msg
    unscored = np.flatnonzero(example["loss_mask"][:-1] == 0)
    np.testing.assert_array_equal(example["targets"][unscored], inputs[unscored + 1], err_msg=msg)


def test_seq_len_of_4n_queries_every_even_offset():
  seed = _seed()
  n = 6
  source = mqar.MQARSource(mqar.MQARConfig(vocab_size=100, seq_len=4 * n, num_kv_pairs=n), 20, seed)
  for i in range(20):
    offsets, _, _ = _queries(source[i], n, 2 * n)
    np.testing.assert_array_equal(np.sort(offsets), np.arange(0, 2 * n, 2),
                                  err_msg=f"seed {seed}, example {i}")


def test_filler_is_random_tokens_of_the_whole_vocabulary():
  seed = _seed()
  v, n, length = 32, 2, 64
  source = mqar.MQARSource(mqar.MQARConfig(vocab_size=v, seq_len=length, num_kv_pairs=n), 100, seed)
  filler = []
  for i in range(len(source)):
    example = source[i]
    rest = np.ones(length, bool)
    rest[:2 * n] = False
    rest[example["loss_mask"] == 1] = False
    filler.append(example["inputs"][rest])
  filler = np.concatenate(filler)
  assert filler.min() >= 0 and filler.max() < v
  # ~6000 draws over 32 tokens: every token appears, none far from uniform.
  counts = np.bincount(filler, minlength=v)
  assert stats.chisquare(counts).pvalue > ALPHA, (counts, seed)
  assert counts.min() > 0, (counts, seed)


@pytest.mark.parametrize("a", [0.01, 0.3, 1.0])
def test_gaps_follow_the_power_law(a):
  """One pair per example: its gap is one draw of p(g) ∝ (g + 1)^(a−1) over 16 gaps."""
  seed = _seed()
  length, samples = 34, 6000
  space = (length - 2) // 2
  source = mqar.MQARSource(mqar.MQARConfig(vocab_size=16, seq_len=length, num_kv_pairs=1,
                                           power_a=a), samples, seed)
  gaps = np.array([_queries(source[i], 1, 2)[0][0] // 2 for i in range(samples)])
  counts = np.bincount(gaps, minlength=space)
  assert counts.size == space, (counts, seed)
  p = _gap_probs(space, a)
  # Total variation: 6000 draws stay within 0.045 of p (the mean distance is ~0.02).
  tv = 0.5 * np.abs(counts / samples - p).sum()
  assert tv < 0.045, (a, tv, counts, seed)
  assert stats.chisquare(counts, samples * p).pvalue > ALPHA, (a, counts, seed)
  # The check tells the exponents apart: a = 0.01 vs the uniform gaps of a = 1.
  other = _gap_probs(space, 1.0 if a < 0.5 else 0.01)
  assert stats.chisquare(counts, samples * other).pvalue < ALPHA, (a, counts, seed)


def test_short_gaps_are_the_most_frequent():
  seed = _seed()
  n, length, samples = 4, 64, 1000
  space = (length - 2 * n) // 2
  source = mqar.MQARSource(mqar.MQARConfig(vocab_size=64, seq_len=length, num_kv_pairs=n), samples,
                           seed)
  gaps = np.concatenate([_queries(source[i], n, 2 * n)[0] // 2 for i in range(samples)])
  counts = np.bincount(gaps, minlength=space)
  assert counts.argmax() == 0, (counts, seed)
  # Decreasing on average: the first quarter of the gaps holds far more than the last.
  assert counts[:space // 4].sum() > 2 * counts[-(space // 4):].sum(), (counts, seed)


@pytest.mark.parametrize("passes", [2, 3])
def test_num_passes_repeats_the_kv_block_then_the_same_queries(passes):
  seed = _seed()
  v, length, n = 128, 48, 5
  plain = mqar.MQARSource(mqar.MQARConfig(v, length, n), 10, seed)
  jrt = mqar.MQARSource(mqar.MQARConfig(v, length, n, num_passes=passes), 10, seed)
  extra = 2 * n * (passes - 1)
  for i in range(10):
    one, many = plain[i], jrt[i]
    msg = f"seed {seed}, example {i}"
    assert many["inputs"].shape == (length + extra,), msg
    block = one["inputs"][:2 * n]
    np.testing.assert_array_equal(many["inputs"][:2 * n * passes], np.tile(block, passes),
                                  err_msg=msg)
    for name in ("inputs", "targets", "loss_mask"):
      np.testing.assert_array_equal(many[name][extra:], one[name], err_msg=msg)
    assert many["context_len"] == 2 * n * passes and many["num_kv_pairs"] == n, msg
    np.testing.assert_array_equal(np.flatnonzero(many["loss_mask"]),
                                  np.flatnonzero(one["loss_mask"]) + extra, err_msg=msg)
    expected = _example.jrt_example(one, passes)
    assert set(many) == set(expected), msg
    for name in expected:
      np.testing.assert_array_equal(many[name], expected[name], err_msg=msg)


def test_examples_are_determined_by_seed_and_index():
  seed = _seed()
  config = mqar.MQARConfig(vocab_size=256, seq_len=64, num_kv_pairs=8)
  one, two = mqar.MQARSource(config, 50, seed), mqar.MQARSource(config, 50, seed)
  order = np.random.default_rng(seed).permutation(50)
  first = {i: one[i] for i in range(50)}
  for i in order:                                        # another order, another source
    again = two[int(i)]
    for name in first[int(i)]:
      np.testing.assert_array_equal(again[name], first[int(i)][name], err_msg=f"seed {seed}")
  distinct = {first[i]["inputs"].tobytes() for i in range(50)}
  assert len(distinct) == 50, f"seed {seed}: indices gave equal examples"
  other = mqar.MQARSource(config, 50, seed + 1)
  assert all(not np.array_equal(other[i]["inputs"], first[i]["inputs"]) for i in range(50))
  assert np.array_equal(one[np.int64(7)]["inputs"], first[7]["inputs"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(vocab_size=0), "vocab_size=0; expected a positive int"),
    (dict(vocab_size=63), "vocab_size=63; expected an even V"),
    (dict(vocab_size=8, num_kv_pairs=4, seq_len=16), "vocab_size=8; expected an even V"),
    (dict(vocab_size=2.0 * 32), "vocab_size=64.0; expected a positive int"),
    (dict(seq_len=15, num_kv_pairs=4), "seq_len=15; expected at least 4·num_kv_pairs=16"),
    (dict(seq_len=-1), "seq_len=-1; expected a positive int"),
    (dict(num_kv_pairs=0), "num_kv_pairs=0; expected a positive int"),
    (dict(num_kv_pairs=True), "num_kv_pairs=True; expected a positive int"),
    (dict(num_passes=0), "num_passes=0; expected a positive int"),
    (dict(num_passes=1.5), "num_passes=1.5; expected a positive int"),
    (dict(power_a=0.0), "power_a=0.0; expected 0 < a ≤ 1"),
    (dict(power_a=-0.5), "power_a=-0.5; expected 0 < a ≤ 1"),
    (dict(power_a=1.5), "power_a=1.5; expected 0 < a ≤ 1"),
    (dict(power_a=float("nan")), "power_a=nan; expected 0 < a ≤ 1"),
])
def test_config_validation_raises_one_line(kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    mqar.MQARConfig(**kwargs)
  assert "\n" not in str(info.value)


def test_config_limits_are_accepted():
  mqar.MQARConfig(vocab_size=8, seq_len=12, num_kv_pairs=3, power_a=1.0)  # n = V/2 − 1, L = 4n
  example = mqar.MQARSource(mqar.MQARConfig(vocab_size=8, seq_len=12, num_kv_pairs=3), 1)[0]
  assert sorted(example["inputs"][0:6:2].tolist()) == [1, 2, 3]


def test_source_index_and_size_validation():
  source = mqar.MQARSource(mqar.MQARConfig(), 5, _seed())
  assert len(source) == 5 and "num_examples=5" in repr(source)
  source[4]
  for index in (5, -1, 100):
    with pytest.raises(IndexError, match=f"index {index} out of range for 5 examples"):
      source[index]
  for num_examples in (0, -3, 2.0):
    with pytest.raises(ValueError, match="expected a positive int"):
      mqar.MQARSource(mqar.MQARConfig(), num_examples)
