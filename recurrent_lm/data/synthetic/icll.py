"""ICLL: in-context language learning on random regular languages.

Akyürek et al. (2024), "In-Context Language Learning: Architectures and
Algorithms". Each example shows strings of one regular language, drawn from a
random DFA the model has never seen, joined by a separator::

    inputs  = s₁ SEP s₂ SEP … SEP sₙ   (without its last token)
    targets = inputs shifted by one     (the next token)

and the model must continue each string in the language: a greedy prediction
counts as correct when the current string with it appended is still accepted
(:func:`next_token_valid`, :func:`acceptance_accuracy`).

Details follow the reference code (``berlino/seq_icl``,
``src/dataloaders/dfa.py`` for the data, ``train.py`` ``_get_dfa_accuracy``
for the metric):

* A DFA has ``n ~ U{4..12}`` states, start state 0, an alphabet of
  ``a ~ U{4..18}`` of the 18 letters, and at each state ``k ~ U{1..3}``
  outgoing edges on ``k`` distinct letters of its alphabet to ``k`` distinct
  *other* states (no self-loops). Every state accepts; a missing edge rejects,
  so the language is prefix-closed: a string is in it iff its walk from the
  start never leaves the edges.
* DFAs are minimised (unreachable states dropped, equivalent states merged).
  Merging can shorten a cycle into a self-loop (``q –a→ r –a→ q`` with only
  ``a`` out of both becomes one state with an ``a`` loop), as in the reference;
  "no self-loops" holds for the DFAs as drawn. Out-degrees stay in 1..3.
* A string is a random walk from the start, each outgoing edge equally likely,
  of ``U{1..49}`` letters; an example has ``U{10..19}`` strings, with no
  separator after the last (as in the reference).
* Splits: the reference dedupes on a hash of state-numbered transitions (which
  neither catches equivalent DFAs numbered differently nor dedupes at all, its
  ``DFA`` lacking ``__eq__``); here DFAs are deduped on the canonical form of
  the minimised DFA (:meth:`DFA.minimize`), so no two DFAs over all three
  splits accept the same language. Distinct DFAs are shuffled, then split
  5000 / 250 / 250 (train, validation, test).
* Loss mask: the reference scores every position whose target is a letter
  (targets equal to the separator are ignored, ``-100``): inside strings and
  the first letter of each string after a separator, all strings included.
  The metric scores the same positions. ``context_len`` is the tokens before
  the last string (up to and including its separator), what JRT-Prompt
  repeats.

Token ids (``V = 20``): 0 = PAD (never emitted), 1 = SEPARATOR, 2..19 = the 18
letters.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import operator
from typing import Sequence

import numpy as np

from recurrent_lm.data.synthetic._example import make_example

VOCAB_SIZE = 20
PAD = 0
SEPARATOR = 1
LETTERS = tuple(range(2, VOCAB_SIZE))
SPLITS = ("train", "validation", "test")

_NO_EDGE = -1
_MAX_DRAWS_PER_DFA = 20  # draws allowed per distinct DFA asked for before giving up


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_range(name: str, value, lo_min: int, hi_max: int | None = None) -> None:
  ok = (isinstance(value, tuple) and len(value) == 2 and all(_is_int(v) for v in value)
        and lo_min <= value[0] <= value[1] and (hi_max is None or value[1] <= hi_max))
  if not ok:
    bound = f"{lo_min} <= lo <= hi" + ("" if hi_max is None else f" <= {hi_max}")
    raise ValueError(f"{name}={value!r}; expected a tuple (lo, hi) of ints with {bound}")


@dataclasses.dataclass(frozen=True)
class ICLLConfig:
  """How ICLL draws its DFAs and examples; the defaults are the paper's.

  Ranges are ``(lo, hi)``, both inclusive, each value drawn uniformly.

  Attributes:
    num_states: states of a DFA as drawn (before minimisation).
    alphabet_size: letters of a DFA's alphabet, drawn from the 18 without replacement.
    out_degree: outgoing edges of each state, on distinct letters to distinct other states.
    num_strings: strings in an example.
    string_length: letters in a string.
    num_dfas: DFAs of the (train, validation, test) splits; no two of them,
      over all splits, accept the same language.
    seed: seeds the DFAs (an example's strings are seeded by ``ICLLSource``).
  """

  num_states: tuple[int, int] = (4, 12)
  alphabet_size: tuple[int, int] = (4, 18)
  out_degree: tuple[int, int] = (1, 3)
  num_strings: tuple[int, int] = (10, 19)
  string_length: tuple[int, int] = (1, 49)
  num_dfas: tuple[int, int, int] = (5000, 250, 250)
  seed: int = 0

  def __post_init__(self):
    _check_range("num_states", self.num_states, 2)
    _check_range("alphabet_size", self.alphabet_size, 1, len(LETTERS))
    _check_range("out_degree", self.out_degree, 1,
                 min(self.alphabet_size[0], self.num_states[0] - 1))
    _check_range("num_strings", self.num_strings, 2)
    _check_range("string_length", self.string_length, 1)
    if not (isinstance(self.num_dfas, tuple) and len(self.num_dfas) == 3
            and all(_is_int(n) and n >= 1 for n in self.num_dfas)):
      raise ValueError(f"num_dfas={self.num_dfas!r}; expected a tuple of 3 positive ints "
                       "(train, validation, test)")
    if not _is_int(self.seed) or self.seed < 0:
      raise ValueError(f"seed={self.seed!r}; expected a non-negative int")


@dataclasses.dataclass(frozen=True)
class DFA:
  """A partial deterministic finite automaton over the tokens; a missing edge rejects.

  Attributes:
    transitions: ``[num_states][VOCAB_SIZE]`` the next state on each token,
      ``-1`` where there is no edge (always so for PAD and SEPARATOR).
    accepting: the accepting states (all of them, in the DFAs ICLL draws).
    alphabet: the letters the DFA was drawn with, sorted; its edges use some of them.
    start: the start state.
  """

  transitions: tuple[tuple[int, ...], ...]
  accepting: frozenset[int]
  alphabet: tuple[int, ...]
  start: int = 0

  def __post_init__(self):
    n = len(self.transitions)
    if n == 0 or any(len(row) != VOCAB_SIZE for row in self.transitions):
      raise ValueError(f"transitions has rows of lengths {[len(r) for r in self.transitions]}; "
                       f"expected >= 1 rows of {VOCAB_SIZE}")
    if any(not -1 <= t < n for row in self.transitions for t in row) or any(
        row[PAD] != _NO_EDGE or row[SEPARATOR] != _NO_EDGE for row in self.transitions):
      raise ValueError(f"transitions={self.transitions}; expected states in -1..{n - 1}, "
                       "-1 on PAD and SEPARATOR")
    if not 0 <= self.start < n or not all(0 <= q < n for q in self.accepting):
      raise ValueError(f"start={self.start}, accepting={set(self.accepting)}; "
                       f"expected states in 0..{n - 1}")

  @property
  def num_states(self) -> int:
    return len(self.transitions)

  @functools.cached_property
  def _edges(self) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Per state, its edges' (letters, next states), letters ascending."""
    out = []
    for row in self.transitions:
      letters = tuple(tok for tok, t in enumerate(row) if t != _NO_EDGE)
      out.append((letters, tuple(row[tok] for tok in letters)))
    return tuple(out)

  def _run(self, string: Sequence[int], state: int | None = None) -> int:
    """The state after reading ``string`` from ``state`` (the start if None); -1 once rejected."""
    state = self.start if state is None else state
    string = [int(tok) for tok in string]
    bad = [tok for tok in string if not 0 <= tok < VOCAB_SIZE]
    if bad:
      raise ValueError(f"token {bad[0]} in string; expected ids in 0..{VOCAB_SIZE - 1}")
    for tok in string:
      state = self.transitions[state][tok]
      if state == _NO_EDGE:
        return _NO_EDGE
    return state

  def accepts(self, string: Sequence[int]) -> bool:
    """Whether the DFA accepts ``string``, a sequence of letter ids."""
    state = self._run(string)
    return state != _NO_EDGE and state in self.accepting

  def sample_string(self, rng: np.random.Generator, max_len: int, min_len: int = 1) -> np.ndarray:
    """A random walk from the start: ``U{min_len..max_len}`` letters, each edge equally likely.

    The walk stops early at a state without edges (none has one in the DFAs
    ICLL draws). Every string is accepted when every state accepts.

    Returns:
      ``[length]`` int32 letter ids.
    """
    if not (_is_int(min_len) and _is_int(max_len) and 1 <= min_len <= max_len):
      raise ValueError(f"min_len={min_len!r}, max_len={max_len!r}; expected ints 1 <= min_len "
                       "<= max_len")
    length = int(rng.integers(min_len, max_len + 1))
    draws = rng.random(length).tolist()
    edges = self._edges
    string = []
    state = self.start
    for u in draws:
      letters, targets = edges[state]
      if not letters:
        break
      k = int(u * len(letters))
      string.append(letters[k])
      state = targets[k]
    return np.asarray(string, np.int32)

  def minimize(self) -> DFA:
    """The minimal DFA of the same language, in canonical form.

    Drops states unreachable from the start or from which no accepting state is
    reachable, merges equivalent states (Moore's partition refinement: states
    split while their acceptance or their successors' classes differ, a missing
    edge being its own class), then numbers the states breadth-first from the
    start, edges in letter order. Two DFAs accept the same language iff their
    minimised ``transitions`` and ``accepting`` are equal. The empty language
    gives one non-accepting state without edges. ``alphabet`` is kept.
    """
    edges = self._edges
    reachable = _closure([self.start], lambda q: edges[q][1])
    parents = collections.defaultdict(list)
    for q in reachable:
      for t in edges[q][1]:
        parents[t].append(q)
    live = sorted(_closure([q for q in reachable if q in self.accepting], parents.__getitem__))
    if self.start not in live:
      return DFA(((_NO_EDGE,) * VOCAB_SIZE,), frozenset(), self.alphabet)
    index = {q: i for i, q in enumerate(live)}
    succ = [[index.get(t, _NO_EDGE) for t in self.transitions[q]] for q in live]
    cls = [int(q in self.accepting) for q in live]
    num_classes = len(set(cls))
    while True:
      ids: dict[tuple[int, ...], int] = {}
      new = [ids.setdefault((cls[i], *(cls[t] if t != _NO_EDGE else -1 for t in row)), len(ids))
             for i, row in enumerate(succ)]
      cls = new
      if len(ids) == num_classes:
        break
      num_classes = len(ids)
    # One representative per class; breadth-first numbering from the start's class.
    rep = {c: i for i, c in reversed(list(enumerate(cls)))}
    number = {cls[index[self.start]]: 0}
    queue = collections.deque([cls[index[self.start]]])
    rows = []
    while queue:
      c = queue.popleft()
      row = [_NO_EDGE] * VOCAB_SIZE
      for tok, t in enumerate(succ[rep[c]]):
        if t != _NO_EDGE:
          if cls[t] not in number:
            number[cls[t]] = len(number)
            queue.append(cls[t])
          row[tok] = number[cls[t]]
      rows.append(tuple(row))
    accepting = frozenset(number[cls[i]] for i, q in enumerate(live) if q in self.accepting)
    return DFA(tuple(rows), accepting, self.alphabet)


def _closure(start, neighbours) -> set[int]:
  seen = set(start)
  stack = list(seen)
  while stack:
    for t in neighbours(stack.pop()):
      if t not in seen:
        seen.add(t)
        stack.append(t)
  return seen


def _random_dfa(rng: np.random.Generator, config: ICLLConfig) -> DFA:
  """One DFA as drawn (module docstring), before minimisation."""
  n = int(rng.integers(config.num_states[0], config.num_states[1] + 1))
  size = int(rng.integers(config.alphabet_size[0], config.alphabet_size[1] + 1))
  alphabet = np.sort(rng.choice(len(LETTERS), size, replace=False)) + LETTERS[0]
  degrees = rng.integers(config.out_degree[0], config.out_degree[1] + 1, size=n)
  rows = []
  for q, k in enumerate(degrees.tolist()):
    letters = rng.choice(alphabet, k, replace=False).tolist()
    others = rng.choice(n - 1, k, replace=False)
    targets = (others + (others >= q)).tolist()  # skip q itself: no self-loops
    row = [_NO_EDGE] * VOCAB_SIZE
    for tok, t in zip(letters, targets):
      row[tok] = t
    rows.append(tuple(row))
  return DFA(tuple(rows), frozenset(range(n)), tuple(alphabet.tolist()))


@functools.lru_cache(maxsize=8)
def _sample_dfas(config: ICLLConfig) -> tuple[tuple[DFA, ...], ...]:
  rng = np.random.default_rng(config.seed)
  total = sum(config.num_dfas)
  found: dict[tuple, DFA] = {}
  for _ in range(_MAX_DRAWS_PER_DFA * total):
    dfa = _random_dfa(rng, config).minimize()
    found.setdefault((dfa.transitions, dfa.accepting), dfa)
    if len(found) == total:
      break
  else:
    raise ValueError(f"num_dfas={config.num_dfas}: only {len(found)} distinct DFAs in "
                     f"{_MAX_DRAWS_PER_DFA * total} draws; expected fewer DFAs or wider ranges")
  dfas = list(found.values())
  dfas = [dfas[i] for i in rng.permutation(total)]
  bounds = np.cumsum((0,) + config.num_dfas).tolist()
  return tuple(tuple(dfas[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:]))


def sample_dfas(config: ICLLConfig) -> dict[str, list[DFA]]:
  """The DFAs of every split, minimised, pairwise inequivalent, from ``config.seed`` alone.

  Draws DFAs, minimises them and keeps the first of each language until there
  are ``sum(config.num_dfas)``, shuffles them and splits them in order
  (train, validation, test). Cached per config.

  Returns:
    ``{"train": [...], "validation": [...], "test": [...]}`` of ``config.num_dfas`` DFAs.
  """
  return {split: list(dfas) for split, dfas in zip(SPLITS, _sample_dfas(config))}


class ICLLSource:
  """ICLL examples of one split as a grain random-access source.

  Example ``i`` shows DFA ``i mod len(self.dfas)`` of the split (so the
  default ``num_examples`` shows each once, as the reference does) with
  strings drawn from ``np.random.default_rng([seed, i])`` alone. Its fields
  (``_example``): ``inputs``, ``targets``, ``loss_mask`` ``[T]`` int32 with
  ``T + 1`` the tokens of ``s₁ SEP … SEP sₙ``; ``loss_mask`` 1 where the
  target is a letter; ``context_len`` the tokens before ``sₙ``; ``dfa_index``
  and ``num_states`` (of the minimised DFA) ``[]`` int32.
  """

  def __init__(self, config: ICLLConfig = ICLLConfig(), split: str = "train",
               num_examples: int | None = None, seed: int = 0):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    if num_examples is not None and (not _is_int(num_examples) or num_examples < 1):
      raise ValueError(f"num_examples={num_examples!r}; expected a positive int or None")
    if not _is_int(seed) or seed < 0:
      raise ValueError(f"seed={seed!r}; expected a non-negative int")
    self.config = config
    self.split = split
    self.dfas = sample_dfas(config)[split]
    self.num_examples = len(self.dfas) if num_examples is None else int(num_examples)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = operator.index(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index={index}; expected 0..{self.num_examples - 1}")
    rng = np.random.default_rng([self.seed, index])
    dfa_index = index % len(self.dfas)
    dfa = self.dfas[dfa_index]
    lo, hi = self.config.string_length
    count = int(rng.integers(self.config.num_strings[0], self.config.num_strings[1] + 1))
    pieces = []
    for i in range(count):
      if i:
        pieces.append(np.array([SEPARATOR], np.int32))
      pieces.append(dfa.sample_string(rng, hi, lo))
    tokens = np.concatenate(pieces)
    targets = tokens[1:]
    return make_example(tokens[:-1], targets, targets != SEPARATOR,
                        context_len=tokens.size - pieces[-1].size,
                        dfa_index=dfa_index, num_states=dfa.num_states)

  def dfa(self, example) -> DFA:
    """The DFA an example (or its ``dfa_index``) shows."""
    return self.dfas[int(example["dfa_index"])]


def next_token_valid(dfa: DFA, string_so_far: Sequence[int], token: int) -> bool:
  """Whether predicting ``token`` after the current string's letters counts as correct.

  As in the reference: the prediction is appended to the current string and
  the DFA must accept the result, so a letter ``x`` is valid iff
  ``dfa.accepts(string_so_far + [x])``. SEPARATOR and PAD are never valid: the
  reference feeds the separator to the DFA as a symbol, which has no edge.
  (Ending the string is always "accepted" when every state accepts, which would
  let a model that always predicts SEPARATOR score 1; scored positions are
  those whose true next token is a letter.)
  """
  if not _is_int(token) or not 0 <= token < VOCAB_SIZE:
    raise ValueError(f"token={token!r}; expected an id in 0..{VOCAB_SIZE - 1}")
  return token in LETTERS and dfa.accepts([*string_so_far, int(token)])


def acceptance_accuracy(source: ICLLSource, batch: dict, predictions: np.ndarray) -> float:
  """The paper's ICLL accuracy: the mean of :func:`next_token_valid` over scored positions.

  At position ``t`` of row ``b`` the current string is the letters of
  ``inputs[b, :t+1]`` after its last SEPARATOR, and the prediction
  ``predictions[b, t]`` is checked against DFA ``source.dfas[dfa_index[b]]``
  where ``loss_mask[b, t]`` is 1.

  Args:
    source: the source the batch was drawn from (its split's DFAs).
    batch: ``inputs`` and ``loss_mask`` ``[B, L]``, ``dfa_index`` ``[B]`` (``_example.batches_of``).
    predictions: ``[B, L]`` int predicted tokens (the argmax).

  Returns:
    correct / scored, over the whole batch.
  """
  inputs = np.asarray(batch["inputs"])
  mask = np.asarray(batch["loss_mask"])
  dfa_index = np.asarray(batch["dfa_index"])
  predictions = np.asarray(predictions)
  if inputs.ndim != 2 or mask.shape != inputs.shape or predictions.shape != inputs.shape or (
      dfa_index.shape != inputs.shape[:1]):
    raise ValueError(f"inputs {inputs.shape}, loss_mask {mask.shape}, predictions "
                     f"{predictions.shape}, dfa_index {dfa_index.shape}; "
                     "expected [B, L] x3 and [B]")
  if not np.issubdtype(predictions.dtype, np.integer) or (
      predictions.size and not 0 <= predictions.min() <= predictions.max() < VOCAB_SIZE):
    raise ValueError(f"predictions of dtype {predictions.dtype} in "
                     f"[{predictions.min()}, {predictions.max()}]; expected int ids in "
                     f"0..{VOCAB_SIZE - 1}")
  correct = total = 0
  for row_inputs, row_mask, row_preds, d in zip(inputs.tolist(), mask.tolist(),
                                                predictions.tolist(), dfa_index.tolist()):
    dfa = source.dfas[d]
    table, accepting = dfa.transitions, dfa.accepting
    state = dfa.start
    for tok, scored, pred in zip(row_inputs, row_mask, row_preds):
      if tok == SEPARATOR:
        state = dfa.start
      elif state != _NO_EDGE:
        state = table[state][tok] if 0 <= tok < VOCAB_SIZE else _NO_EDGE
      if scored:
        total += 1
        nxt = table[state][pred] if state != _NO_EDGE else _NO_EDGE
        correct += nxt != _NO_EDGE and nxt in accepting
  if total == 0:
    raise ValueError("batch has no scored positions (loss_mask all 0); expected at least one")
  return correct / total
