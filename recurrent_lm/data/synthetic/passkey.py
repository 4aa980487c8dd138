"""Passkey retrieval (Mohtashami & Jaggi 2023; the state-capacity test of "Stuffed Mamba").

A prompt of about ``N`` tokens of the project's tokenizer hides a random
``num_digits``-digit key in filler text, at relative depth ``d`` of the filler::

    There is an important info hidden … there. The grass is green. The sky is blue. …
    └──────────────── intro ─────────────────┘ └────────────── filler ──────────────┘
    The pass key is 04512. Remember it. 04512 is the pass key. … There and back again.
    └─────────────── key sentence, at depth d ───────────────┘ └────── filler ───────┘
    What is the pass key? The pass key is 04512
    └──────────── question ─────────────┘└────┘ answer (space, digits)

* The parts are joined by one space, and every part after the intro is encoded
  on its own *with* its leading space (``" The sky is blue."``, the answer
  ``" 04512"``); the prompt ids are those pieces concatenated, so every token
  belongs to exactly one part. With the project's tokenizer (a space starts a
  piece, digits are split one by one) this is also ``encode`` of the whole text,
  and the answer is ``[▁, 0, 4, 5, 1, 2]``: a space token, then one token per digit.
* Length: the filler is the filler sentences cycled from the first, as many as
  fit, so the prompt has ``P ≤ N`` tokens and ``N − P`` is less than the next
  filler sentence. ``N`` must hold the intro, key sentence and question.
* Depth: the key sentence goes between two filler sentences, at the boundary
  whose token offset in the filler is nearest ``d·F`` (``F`` filler tokens);
  ``d = 0`` right after the intro, ``d = 1`` right before the question. The
  source's depths are the paper's ``(i + 0.5)/n``, ``i < n``.
* The key is uniform in ``[0, 10^num_digits)``, written with leading zeros
  (Stuffed Mamba's key space ``00000 … 99999``).

An example (the format of :mod:`._example`) reads the prompt and the answer::

    s = prompt ‖ answer                       (P + A tokens)
    inputs = s[:-1], targets = s[1:]          [P + A − 1]
    loss_mask = 1 at positions P−1 … P+A−2    (exactly the A targets that are answer tokens)
    context_len = tokens before the question  (what JRT-Prompt repeats)

plus the ``[]`` int32 scalars ``length`` (``N``), ``depth_index`` and ``key``.

Why teacher-forced exact match is greedy decoding. The reference scores a
model by greedy decoding of the answer's tokens after the prompt (Stuffed Mamba:
5 new tokens; here ``A``, the space token included). :func:`exact_match` instead
reads prompt ‖ answer once and asks that at every scored position the argmax
equals the target, i.e. ``argmax p(· | prompt ‖ a_{<k}) = a_k`` for all
``k < A``. The two agree: if every such argmax is ``a_k``, greedy decoding
emits ``g_0 = argmax p(· | prompt) = a_0``, and by induction, having emitted
``a_{<k}``, emits ``g_k = argmax p(· | prompt ‖ a_{<k}) = a_k`` — exactly the
answer. Conversely, if greedy decoding emits exactly the answer, each ``a_k``
was the argmax given the prefix ``a_{<k}``, the very prefix teacher forcing
reads. (Both with the same argmax tie rule, and with the model giving the same
logits for a prefix whether it reads it in one pass or token by token.) So one
forward pass scores a batch of prompts exactly as greedy decoding would.

Differences from the reference code (the texts are fields of :class:`PasskeyConfig`):
Landmark Attention (``llama/run_test.py``) joins intro / filler / key / filler /
question by newlines, cuts the filler at a character count, writes "memorize
them" and draws the key from ``[1, 50000]``; Stuffed Mamba
(``passkey-retrieval/passkey.py``) drops the intro's last sentence, writes "The
passkey is", puts each five-sentence filler paragraph on its own line and swaps
paragraph ``int(d·(n − 1))`` for the key's.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import TYPE_CHECKING, Mapping

import numpy as np

from recurrent_lm.data.synthetic import _example

if TYPE_CHECKING:
  from recurrent_lm.data.tokenizer import Tokenizer

INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
  """The passkey prompts of one evaluation.

  Attributes:
    lengths: target prompt lengths ``N`` in tokens; example ``i`` has
      ``lengths[i % len(lengths)]``.
    num_depths: ``n``; the key depths are ``(i + 0.5)/n``, ``i < n``.
    num_digits: digits of the key, 1 … 9 (it is stored as an int32).
    intro: the sentence(s) the prompt starts with.
    filler: the filler sentences, cycled in order.
    key_sentence: the sentence that holds the key, with ``{key}`` where it goes.
    question: the end of the prompt; the answer (a space and the key) follows it.
  """
  lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
  num_depths: int = 10
  num_digits: int = 5
  intro: str = INTRO
  filler: tuple[str, ...] = FILLER
  key_sentence: str = KEY_SENTENCE
  question: str = QUESTION

  def __post_init__(self):
    if not isinstance(self.lengths, tuple) or not self.lengths or not all(
        _is_int(n) and n >= 1 for n in self.lengths):
      raise ValueError(f"PasskeyConfig.lengths={self.lengths!r}; expected a non-empty tuple "
                       "of positive ints")
    if not _is_int(self.num_depths) or self.num_depths < 1:
      raise ValueError(f"PasskeyConfig.num_depths={self.num_depths!r}; expected a positive int")
    if not _is_int(self.num_digits) or not 1 <= self.num_digits <= 9:
      raise ValueError(f"PasskeyConfig.num_digits={self.num_digits!r}; expected an int in 1 … 9")
    if (not isinstance(self.filler, tuple) or not self.filler
        or not all(isinstance(s, str) and s for s in self.filler)):
      raise ValueError(f"PasskeyConfig.filler={self.filler!r}; expected a non-empty tuple of "
                       "non-empty sentences")
    if not isinstance(self.key_sentence, str) or "{key}" not in self.key_sentence:
      raise ValueError(f"PasskeyConfig.key_sentence={self.key_sentence!r}; expected a string "
                       "with a {key} field")
    for name in ("intro", "question"):
      if not isinstance(getattr(self, name), str):
        raise ValueError(f"PasskeyConfig.{name}={getattr(self, name)!r}; expected a string")

  @property
  def depths(self) -> tuple[float, ...]:
    """The ``num_depths`` key depths ``(i + 0.5)/num_depths``."""
    return tuple((i + 0.5) / self.num_depths for i in range(self.num_depths))

  def key_text(self, key: int) -> str:
    """``key`` as the prompt writes it: ``num_digits`` digits, leading zeros kept."""
    if not _is_int(key) or not 0 <= key < 10**self.num_digits:
      raise ValueError(f"key={key!r}; expected an int in [0, {10**self.num_digits})")
    return f"{int(key):0{self.num_digits}d}"


def passkey_prompt(tokenizer: Tokenizer, key: int, length: int, depth: float,
                   config: PasskeyConfig = PasskeyConfig()) -> tuple[list[int], list[int]]:
  """The prompt and answer ids of one passkey example (module docstring).

  Args:
    tokenizer: the project's tokenizer (anything with ``encode(str) -> list[int]``).
    key: the key, in ``[0, 10^num_digits)``.
    length: ``N``, the prompt's target length in tokens.
    depth: ``d`` in ``[0, 1]``, where the key sentence sits in the filler.
    config: the texts and ``num_digits``; its ``lengths`` and ``num_depths`` are unused.

  Returns:
    ``(prompt, answer)``: ``P ≤ N`` prompt ids, the largest that fits, and the
    ids of ``" " + key_text``; feed ``prompt`` to greedy decoding of
    ``len(answer)`` tokens, or ``prompt ‖ answer`` to teacher forcing.
  """
  prompt, answer, _ = _build(tokenizer, key, length, depth, config)
  return prompt, answer


def _build(tokenizer, key, length, depth, config) -> tuple[list[int], list[int], int]:
  """``(prompt, answer, context_len)``."""
  digits = config.key_text(key)
  if not _is_int(length) or length < 1:
    raise ValueError(f"length={length!r}; expected a positive int")
  if isinstance(depth, bool) or not isinstance(depth, numbers.Real) or not 0 <= depth <= 1:
    raise ValueError(f"depth={depth!r}; expected a number in [0, 1]")
  intro = tokenizer.encode(config.intro)
  key_ids = tokenizer.encode(" " + config.key_sentence.format(key=digits))
  question = tokenizer.encode(" " + config.question)
  answer = tokenizer.encode(" " + digits)
  fixed = len(intro) + len(key_ids) + len(question)
  if length < fixed:
    raise ValueError(f"length={length}; expected at least {fixed} tokens to hold the intro, "
                     "key sentence and question")
  sentences = [tokenizer.encode(" " + s) for s in config.filler]
  if min(map(len, sentences)) < 1:
    raise ValueError(f"PasskeyConfig.filler={config.filler!r}; every sentence must encode to "
                     "at least one token")
  # The filler: sentences cycled from the first while they fit; offsets[j] = tokens of the first j.
  filler: list[list[int]] = []
  offsets = [0]
  while offsets[-1] + len(sentences[len(filler) % len(sentences)]) <= length - fixed:
    filler.append(sentences[len(filler) % len(sentences)])
    offsets.append(offsets[-1] + len(filler[-1]))
  target = float(depth) * offsets[-1]
  split = min(range(len(offsets)), key=lambda j: (abs(offsets[j] - target), j))
  prompt = list(intro)
  for ids in filler[:split]:
    prompt += ids
  prompt += key_ids
  for ids in filler[split:]:
    prompt += ids
  context_len = len(prompt)
  prompt += question
  return prompt, answer, context_len


class PasskeySource:
  """``num_examples`` passkey examples, example ``i`` from ``default_rng([seed, i])`` alone.

  A grain random-access source (``__len__``, ``__getitem__``).

  Example ``i`` has length ``lengths[i % len(lengths)]`` and depth index
  ``(i // len(lengths)) % num_depths``, so every ``len(lengths)·num_depths``
  consecutive examples are the full grid; only its key is random.

  Args:
    tokenizer: the project's tokenizer (it pickles, so grain workers can read it).
    config: the lengths, depths and texts.
    num_examples: the number of examples; None: one full grid.
    seed: with the index, draws the key.
  """

  def __init__(self, tokenizer: Tokenizer, config: PasskeyConfig = PasskeyConfig(),
               num_examples: int | None = None, seed: int = 0):
    if num_examples is None:
      num_examples = len(config.lengths) * config.num_depths
    if not _is_int(num_examples) or num_examples < 1:
      raise ValueError(f"num_examples={num_examples!r}; expected a positive int")
    self.tokenizer, self.config, self.num_examples, self.seed = (
        tokenizer, config, int(num_examples), seed)
    _build(tokenizer, 0, min(config.lengths), 0.5, config)  # The shortest fits iff all do.

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    index = int(index)
    config = self.config
    rng = np.random.default_rng([self.seed, index])
    length = config.lengths[index % len(config.lengths)]
    depth_index = (index // len(config.lengths)) % config.num_depths
    key = int(rng.integers(10**config.num_digits))
    prompt, answer, context_len = _build(self.tokenizer, key, length,
                                         config.depths[depth_index], config)
    tokens = np.asarray(prompt + answer, np.int32)
    loss_mask = np.zeros(tokens.size - 1, np.int32)
    loss_mask[len(prompt) - 1:] = 1
    return _example.make_example(tokens[:-1], tokens[1:], loss_mask, context_len=context_len,
                                 length=length, depth_index=depth_index, key=key)

  def __repr__(self) -> str:
    return (f"PasskeySource({self.config}, num_examples={self.num_examples}, "
            f"seed={self.seed})")


def exact_match(batch: Mapping[str, np.ndarray], predictions) -> np.ndarray:
  """Per example: is the argmax right at every scored position? (Greedy decoding; module docstring.)

  Args:
    batch: ``targets`` and ``loss_mask``, ``[B, L]`` (a batch of ``batches_of``).
    predictions: ``[B, L]`` predicted ids, or ``[B, L, V]`` logits (argmax taken).

  Returns:
    ``[B]`` bool: ``all(predictions[b, t] == targets[b, t] for t with loss_mask[b, t] = 1)``.
  """
  targets = np.asarray(batch["targets"])
  mask = np.asarray(batch["loss_mask"]) != 0
  predictions = np.asarray(predictions)
  if predictions.ndim == targets.ndim + 1:
    predictions = predictions.argmax(-1)
  if targets.ndim != 2 or predictions.shape != targets.shape or mask.shape != targets.shape:
    raise ValueError(f"predictions {predictions.shape}, targets {targets.shape} and loss_mask "
                     f"{mask.shape}; expected [B, L] ids (or [B, L, V] logits) and [B, L]")
  empty = np.flatnonzero(~mask.any(-1))
  if empty.size:
    raise ValueError(f"batch row {int(empty[0])} has no scored position; expected at least one")
  return np.all((predictions == targets) | ~mask, axis=-1)
