"""ICLL: DFA sampling, minimisation, disjoint splits, examples and the acceptance metric."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import pickle
import time

import grain
import numpy as np
import pytest

from recurrent_lm.data.synthetic import _example
from recurrent_lm.data.synthetic import icll

SMALL = icll.ICLLConfig(num_dfas=(50, 10, 10))


@pytest.fixture
def rng(request) -> np.random.Generator:
  seed = np.random.SeedSequence().entropy
  print(f"{request.node.name}: rng seed {seed}")
  return np.random.default_rng(seed)


def _all_dfas(config=SMALL) -> list[icll.DFA]:
  return [d for dfas in icll.sample_dfas(config).values() for d in dfas]


def _edges(dfa: icll.DFA, q: int) -> dict[int, int]:
  return {tok: t for tok, t in enumerate(dfa.transitions[q]) if t != -1}


def _walk_accepts(dfa: icll.DFA, string) -> bool:
  """Acceptance by hand, independent of DFA.accepts."""
  q = dfa.start
  for tok in string:
    q = _edges(dfa, q).get(int(tok))
    if q is None:
      return False
  return q in dfa.accepting


def _equivalent(a: icll.DFA, b: icll.DFA) -> bool:
  """Exact language equality: no reachable pair of the product automaton disagrees on acceptance."""
  seen = {(a.start, b.start)}
  stack = list(seen)
  while stack:
    p, q = stack.pop()
    if (p != -1 and p in a.accepting) != (q != -1 and q in b.accepting):
      return False
    ep = _edges(a, p) if p != -1 else {}
    eq = _edges(b, q) if q != -1 else {}
    for tok in ep.keys() | eq.keys():
      pair = (ep.get(tok, -1), eq.get(tok, -1))
      if pair not in seen:
        seen.add(pair)
        stack.append(pair)
  return True


def _random_general_dfa(rng, num_states, letters, p_edge=0.6, p_accept=0.5) -> icll.DFA:
  """Any partial DFA: self-loops, dead ends, non-accepting and unreachable states allowed."""
  rows = []
  for _ in range(num_states):
    row = [-1] * icll.VOCAB_SIZE
    for tok in letters:
      if rng.random() < p_edge:
        row[tok] = int(rng.integers(num_states))
    rows.append(tuple(row))
  accepting = frozenset(int(q) for q in np.flatnonzero(rng.random(num_states) < p_accept))
  return icll.DFA(tuple(rows), accepting, tuple(letters), start=int(rng.integers(num_states)))


def _relabel(dfa: icll.DFA, perm) -> icll.DFA:
  """The same DFA with state q renamed perm[q]."""
  rows = [None] * dfa.num_states
  for q, row in enumerate(dfa.transitions):
    rows[perm[q]] = tuple(perm[t] if t != -1 else -1 for t in row)
  return icll.DFA(tuple(rows), frozenset(perm[q] for q in dfa.accepting), dfa.alphabet,
                  start=perm[dfa.start])


def _tokens(example) -> np.ndarray:
  return np.append(example["inputs"], example["targets"][-1])


def _strings(example) -> list[np.ndarray]:
  tokens = _tokens(example)
  pieces = np.split(tokens, np.flatnonzero(tokens == icll.SEPARATOR))
  return pieces[:1] + [p[1:] for p in pieces[1:]]  # each but the first starts with its SEP


# ----------------------------------------------------------------------------
# DFAs: sampling, constraints, minimisation


def test_raw_dfas_satisfy_constraints(rng):
  config = icll.ICLLConfig(num_dfas=(1, 1, 1))
  for _ in range(200):
    dfa = icll._random_dfa(rng, config)
    assert 4 <= dfa.num_states <= 12 and dfa.start == 0
    assert dfa.accepting == frozenset(range(dfa.num_states))
    assert 4 <= len(dfa.alphabet) <= 18 and set(dfa.alphabet) <= set(icll.LETTERS)
    assert list(dfa.alphabet) == sorted(set(dfa.alphabet))
    for q in range(dfa.num_states):
      edges = _edges(dfa, q)
      assert 1 <= len(edges) <= 3
      assert set(edges) <= set(dfa.alphabet)
      assert q not in edges.values(), "self-loop"
      assert len(set(edges.values())) == len(edges), "two edges to one state"
    small = dfa.minimize()
    assert 1 <= small.num_states <= dfa.num_states
    assert _equivalent(small, dfa)


def test_sampled_dfas_satisfy_constraints():
  for dfa in _all_dfas():
    assert 1 <= dfa.num_states <= 12 and dfa.start == 0
    assert dfa.accepting == frozenset(range(dfa.num_states))
    assert 4 <= len(dfa.alphabet) <= 18 and set(dfa.alphabet) <= set(icll.LETTERS)
    for q in range(dfa.num_states):
      edges = _edges(dfa, q)
      assert 1 <= len(edges) <= 3 and set(edges) <= set(dfa.alphabet)
    assert dfa.minimize() == dfa, "not minimised and canonical"


def test_minimisation_preserves_language_brute_force(rng):
  letters = (2, 3, 4)
  outside = 5
  for _ in range(30):
    dfa = _random_general_dfa(rng, int(rng.integers(1, 7)), letters)
    small = dfa.minimize()
    assert small.num_states <= dfa.num_states
    for length in range(6):
      for string in itertools.product(letters + (outside,), repeat=length):
        assert small.accepts(string) == dfa.accepts(string) == _walk_accepts(dfa, string), string


def test_minimisation_is_minimal_and_canonical(rng):
  letters = (2, 3, 7)
  for _ in range(100):
    dfa = _random_general_dfa(rng, int(rng.integers(1, 9)), letters)
    small = dfa.minimize()
    assert _equivalent(small, dfa)
    perm = rng.permutation(dfa.num_states).tolist()
    assert _relabel(dfa, perm).minimize() == small, "depends on state numbering"
    if small.accepting:  # every state reachable and no two equivalent
      states = [dataclasses.replace(small, start=q) for q in range(small.num_states)]
      for a, b in itertools.combinations(states, 2):
        assert not _equivalent(a, b)
    else:
      assert small.num_states == 1 and not any(t != -1 for t in small.transitions[0])


def test_minimisation_merges_a_cycle_into_a_self_loop():
  row = lambda target: tuple(target if tok == 2 else -1 for tok in range(icll.VOCAB_SIZE))
  dfa = icll.DFA((row(1), row(0)), frozenset({0, 1}), (2, 3))  # 0 -a-> 1 -a-> 0: a*
  small = dfa.minimize()
  assert small.num_states == 1 and _edges(small, 0) == {2: 0}
  assert small.accepts([2] * 7) and not small.accepts([2, 3])


def test_sample_dfas_deterministic_by_seed():
  first = icll.sample_dfas(SMALL)
  icll._sample_dfas.cache_clear()
  assert icll.sample_dfas(SMALL) == first
  other = icll.sample_dfas(dataclasses.replace(SMALL, seed=1))
  assert other["train"] != first["train"]
  assert {k: len(v) for k, v in first.items()} == {"train": 50, "validation": 10, "test": 10}


def test_splits_disjoint_by_equivalence():
  dfas = _all_dfas()
  assert len(dfas) == 70
  for a, b in itertools.combinations(dfas, 2):
    assert not _equivalent(a, b)


def test_dedup_where_draws_repeat():
  # Few states, one edge each, small alphabets: many draws share a language.
  config = icll.ICLLConfig(num_states=(2, 3), alphabet_size=(1, 2), out_degree=(1, 1),
                           num_dfas=(40, 10, 10), seed=3)
  dfas = _all_dfas(config)
  assert len(dfas) == 60
  for a, b in itertools.combinations(dfas, 2):
    assert not _equivalent(a, b)


def test_sample_dfas_returns_fresh_lists():
  icll.sample_dfas(SMALL)["train"].clear()
  assert len(icll.sample_dfas(SMALL)["train"]) == 50


# ----------------------------------------------------------------------------
# Strings and examples


def test_sample_string_is_accepted_random_walk(rng):
  dfa = _all_dfas()[int(rng.integers(70))]
  seen = collections.Counter()
  for _ in range(200):
    string = dfa.sample_string(rng, 9, 3)
    assert string.dtype == np.int32 and 3 <= string.size <= 9
    assert _walk_accepts(dfa, string)
    seen[int(string[0])] += 1
  assert set(seen) == set(_edges(dfa, dfa.start)), "every first edge is taken"


def test_examples_are_deterministic_by_seed_and_index(rng):
  seed, index = (int(x) for x in rng.integers(1000, size=2))
  source = icll.ICLLSource(SMALL, "train", num_examples=1000, seed=seed)
  again = icll.ICLLSource(SMALL, "train", num_examples=1000, seed=seed)
  a = source[index]
  for _ in range(2):  # the same whatever was read before
    source[int(rng.integers(1000))]
    for key in a:
      np.testing.assert_array_equal(again[index][key], a[key])
  other = icll.ICLLSource(SMALL, "train", num_examples=1000, seed=seed + 1)[index]
  assert not np.array_equal(other["inputs"], a["inputs"])


def test_example_format(rng):
  source = icll.ICLLSource(SMALL, str(rng.choice(icll.SPLITS)), num_examples=40,
                           seed=int(rng.integers(1000)))
  dfa_indices = set()
  for i in range(len(source)):
    example = source[i]
    inputs, targets, mask = example["inputs"], example["targets"], example["loss_mask"]
    for key in ("inputs", "targets", "loss_mask"):
      assert example[key].dtype == np.int32 and example[key].shape == inputs.shape
    for key in ("context_len", "dfa_index", "num_states"):
      assert example[key].dtype == np.int32 and example[key].shape == ()
    np.testing.assert_array_equal(targets[:-1], inputs[1:])
    tokens = _tokens(example)
    assert icll.PAD not in tokens and tokens.min() >= 1 and tokens.max() < icll.VOCAB_SIZE
    assert tokens[0] != icll.SEPARATOR and tokens[-1] != icll.SEPARATOR
    np.testing.assert_array_equal(mask, targets != icll.SEPARATOR)
    strings = _strings(example)
    assert 10 <= len(strings) <= 19
    dfa = source.dfa(example)
    assert example["dfa_index"] == i % len(source.dfas) and dfa is source.dfas[i % len(source.dfas)]
    assert example["num_states"] == dfa.num_states
    for s in strings:
      assert 1 <= s.size <= 49 and icll.SEPARATOR not in s
      assert _walk_accepts(dfa, s)
    context = int(example["context_len"])
    assert inputs[context - 1] == icll.SEPARATOR
    assert icll.SEPARATOR not in tokens[context:] and tokens.size - context == strings[-1].size
    dfa_indices.add(int(example["dfa_index"]))
  assert dfa_indices == set(range(min(len(source), len(source.dfas))))


def test_source_default_length_and_grain():
  source = icll.ICLLSource(SMALL, "validation")
  assert len(source) == 10
  ds = grain.MapDataset.source(source)
  restored = pickle.loads(pickle.dumps(source))
  for i in (0, 9):
    for key, value in source[i].items():
      np.testing.assert_array_equal(ds[i][key], value)
      np.testing.assert_array_equal(restored[i][key], value)
  with pytest.raises(IndexError):
    source[10]


# ----------------------------------------------------------------------------
# The metric


def _language_up_to(dfa: icll.DFA, length: int) -> set[tuple[int, ...]]:
  """Every accepted string of at most ``length`` letters, by enumeration.

  Extends accepted strings only: the language is prefix-closed, every state accepting.
  """
  assert dfa.accepting == frozenset(range(dfa.num_states))
  words = set()
  frontier = [()]
  for _ in range(length + 1):
    frontier = [w for w in frontier if _walk_accepts(dfa, w)]
    words.update(frontier)
    frontier = [w + (x,) for w in frontier for x in icll.LETTERS]
  return words


def test_next_token_valid_agrees_with_brute_force(rng):
  dfas = _all_dfas()
  for _ in range(10):
    dfa = dfas[int(rng.integers(len(dfas)))]
    language = _language_up_to(dfa, 5)
    for _ in range(5):
      prefix = tuple(dfa.sample_string(rng, 4).tolist()) if rng.random() < 0.8 else ()
      for token in range(icll.VOCAB_SIZE):
        expected = token in icll.LETTERS and prefix + (token,) in language
        assert icll.next_token_valid(dfa, prefix, token) == expected, (prefix, token)
      assert not icll.next_token_valid(dfa, prefix, icll.SEPARATOR)
      assert not icll.next_token_valid(dfa, prefix, icll.PAD)


def _per_position_accuracy(source, batch, predictions) -> float:
  """acceptance_accuracy spelled out with next_token_valid."""
  scores = []
  for b, t in zip(*np.nonzero(batch["loss_mask"])):
    seen = [icll.SEPARATOR] + batch["inputs"][b, :t + 1].tolist()
    current = seen[len(seen) - seen[::-1].index(icll.SEPARATOR):]  # after the last SEP
    scores.append(icll.next_token_valid(source.dfas[batch["dfa_index"][b]], current,
                                        int(predictions[b, t])))
  return float(np.mean(scores))


def test_acceptance_accuracy(rng):
  source = icll.ICLLSource(SMALL, "test", num_examples=30, seed=int(rng.integers(1000)))
  examples = [source[int(i)] for i in rng.choice(30, 6, replace=False)]
  batch = _example.batches_of(examples)
  assert batch["inputs"].shape[1] > min(e["inputs"].size for e in examples), "has padding"
  assert icll.acceptance_accuracy(source, batch, batch["targets"]) == 1.0
  random = rng.integers(icll.VOCAB_SIZE, size=batch["inputs"].shape)
  score = icll.acceptance_accuracy(source, batch, random)
  assert score == pytest.approx(_per_position_accuracy(source, batch, random))
  assert score < 0.5
  seps = np.full_like(batch["inputs"], icll.SEPARATOR)
  assert icll.acceptance_accuracy(source, batch, seps) == 0.0
  # A prediction valid but unlike the target scores too: the other edges of the state.
  mixed = np.where(rng.random(batch["inputs"].shape) < 0.5, batch["targets"], random)
  assert icll.acceptance_accuracy(source, batch, mixed) == pytest.approx(
      _per_position_accuracy(source, batch, mixed))
  jrt = _example.batches_of([_example.jrt_example(e) for e in examples])
  assert icll.acceptance_accuracy(source, jrt, jrt["targets"]) == 1.0


# ----------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("kwargs, match", [
    ({"num_states": (1, 12)}, "num_states"),
    ({"num_states": [4, 12]}, "num_states"),
    ({"alphabet_size": (4, 19)}, "alphabet_size"),
    ({"out_degree": (0, 3)}, "out_degree"),
    ({"out_degree": (1, 5)}, "out_degree"),
    ({"num_strings": (1, 19)}, "num_strings"),
    ({"string_length": (5, 4)}, "string_length"),
    ({"num_dfas": (5, 0, 5)}, "num_dfas"),
    ({"seed": -1}, "seed"),
])
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    icll.ICLLConfig(**kwargs)
  assert "\n" not in str(info.value)


def test_bad_arguments_raise_one_line(rng):
  source = icll.ICLLSource(SMALL, "test")
  dfa = source.dfas[0]
  batch = _example.batches_of([source[0], source[1]])
  calls = [
      (lambda: icll.ICLLSource(SMALL, "valid"), "split"),
      (lambda: icll.ICLLSource(SMALL, "train", num_examples=0), "num_examples"),
      (lambda: icll.ICLLSource(SMALL, "train", seed=-3), "seed"),
      (lambda: dfa.sample_string(rng, 3, 4), "min_len"),
      (lambda: dfa.accepts([2, 25]), "token 25"),
      (lambda: icll.next_token_valid(dfa, [], 20), "token=20"),
      (lambda: icll.acceptance_accuracy(source, batch, batch["targets"][:, :-1]), "predictions"),
      (lambda: icll.acceptance_accuracy(source, batch, batch["targets"] + 20), "predictions"),
      (lambda: icll.acceptance_accuracy(source, dict(batch, loss_mask=0 * batch["loss_mask"]),
                                        batch["targets"]), "no scored"),
      # Two states, one letter: 0 -x-> 1 -x-> 0, x*, one language per letter (18).
      (lambda: icll.sample_dfas(icll.ICLLConfig(num_states=(2, 2), alphabet_size=(1, 1),
                                                out_degree=(1, 1), num_dfas=(20, 1, 1))),
       "distinct DFAs"),
      (lambda: icll.DFA(((-1,) * 5,), frozenset(), ()), "transitions"),
  ]
  for call, match in calls:
    with pytest.raises(ValueError, match=match) as info:
      call()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------
# The paper's 5500 DFAs


@pytest.mark.slow
def test_full_sample_dfas_disjoint_and_fast():
  config = icll.ICLLConfig()
  icll._sample_dfas.cache_clear()
  start = time.perf_counter()
  dfas = icll.sample_dfas(config)
  elapsed = time.perf_counter() - start
  assert elapsed < 20, elapsed
  assert {k: len(v) for k, v in dfas.items()} == {"train": 5000, "validation": 250, "test": 250}
  everything = [d for split in dfas.values() for d in split]
  assert len({(d.transitions, d.accepting) for d in everything}) == 5500
  for dfa in everything:
    assert dfa.minimize() == dfa and 1 <= dfa.num_states <= 12
    assert all(1 <= len(_edges(dfa, q)) <= 3 for q in range(dfa.num_states))
  # Canonical forms are exact (tested above); spot-check equivalence across splits.
  for a in dfas["test"][:50]:
    for b in dfas["validation"][:50] + dfas["train"][:200]:
      assert not _equivalent(a, b)
