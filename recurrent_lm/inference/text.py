"""Text in, text out: prompts through the run's tokenizer, tokens streamed back as text.

A prompt reads as the start of a document, ``[eod] + encode(text)`` (the
pipeline puts ``eod`` before every document), and generation stops at the
next ``eod``: the end of the document. Tokens are turned into text as they
come (:class:`Detokenizer`), holding back only the bytes of a character not
yet complete, so the streamed pieces join to ``tokenizer.decode(all tokens)``
(for tokens that spell valid UTF-8).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax

from recurrent_lm import data as data_lib
from recurrent_lm.inference import decoding
from recurrent_lm.inference.restore import Run
from recurrent_lm.inference.sampling import GREEDY, Sampling

_REPLACEMENT = "\ufffd"   # what a partial UTF-8 sequence decodes to
_MAX_CHAR_BYTES = 4


def prompt_ids(tokenizer: data_lib.Tokenizer, text: str) -> list[int]:
  """``[eod] + encode(text)``: ``text`` as the start of a document."""
  if not isinstance(text, str) or not text:
    raise ValueError(f"prompt {text!r} is empty; expected some text to continue")
  return [tokenizer.eod_id] + tokenizer.encode(text)


class Detokenizer:
  """Token ids → text, incrementally: ``push(id)`` returns the text it completes.

  Ids are held until they decode to whole characters: a character outside
  the vocabulary is spelled by up to four byte pieces, and its first ones
  alone decode to U+FFFD. For ids that spell valid UTF-8 the pieces returned
  join to ``decode(all ids)``; a stray byte piece comes out as U+FFFD.
  """

  def __init__(self, tokenizer: data_lib.Tokenizer):
    self._tokenizer = tokenizer
    self._pending: list[int] = []

  def push(self, token: int) -> str:
    self._pending.append(int(token))
    text = self._tokenizer.decode(self._pending)
    if text.endswith(_REPLACEMENT) and len(self._pending) < _MAX_CHAR_BYTES:
      return ""
    self._pending = []
    return text

  def flush(self) -> str:
    """The text of ids still held (an incomplete character decodes to U+FFFD)."""
    text, self._pending = self._tokenizer.decode(self._pending), []
    return text


def stream_text(run: Run, prompt: str, *, max_new_tokens: int, sampling: Sampling = GREEDY,
                key: jax.Array | None = None, jrt_repeats: int = 1) -> Iterator[str]:
  """Yields the continuation of ``prompt`` as text, piece by piece, until the
  end of the document or ``max_new_tokens`` tokens (:func:`decoding.stream`)."""
  eod = run.tokenizer.eod_id
  detokenizer = Detokenizer(run.tokenizer)
  for tokens, active in decoding.stream(
      run.model, run.params, [prompt_ids(run.tokenizer, prompt)],
      max_new_tokens=max_new_tokens, sampling=sampling, key=key, stop_tokens=(eod,),
      jrt_repeats=jrt_repeats, pad_id=run.tokenizer.pad_id):
    if active[0] and tokens[0] != eod:
      piece = detokenizer.push(tokens[0])
      if piece:
        yield piece
  tail = detokenizer.flush()
  if tail:
    yield tail


def complete(run: Run, prompts: Sequence[str], *, max_new_tokens: int,
             sampling: Sampling = GREEDY, key: jax.Array | None = None,
             jrt_repeats: int = 1) -> list[str]:
  """The continuation of every prompt (one batch, ragged prompts left-padded)."""
  eod = run.tokenizer.eod_id
  outputs = decoding.generate(
      run.model, run.params, [prompt_ids(run.tokenizer, p) for p in prompts],
      max_new_tokens=max_new_tokens, sampling=sampling, key=key, stop_tokens=(eod,),
      jrt_repeats=jrt_repeats, pad_id=run.tokenizer.pad_id)
  return [run.tokenizer.decode([t for t in out if t != eod]) for out in outputs]
