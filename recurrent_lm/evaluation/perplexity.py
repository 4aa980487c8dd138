"""Perplexity of a language model on a token stream, Languini-style.

The stream is a split's documents concatenated, each starting with the
end-of-document id (as in training); ``segment_ids`` restart every mixer's
state at each document, exactly as in packed training rows. Every token but
the first of the stream (or of a lane, see below) is scored once::

    token perplexity       = exp(Σ nll / number of scored tokens)
    normalised perplexity  = exp(Σ nll / number of UTF-8 bytes of the scored tokens)
    bits per byte          = Σ nll / bytes / ln 2

The per-byte figures do not depend on the tokenizer (Languini's "normalised
perplexity"), so models with different vocabularies compare.

Two ways to give every token its context:

* ``carry`` (recurrent models): the stream is cut into ``batch_size``
  contiguous lanes, each read in windows of ``seq_len`` with the state
  carried from window to window — unbounded context at constant memory.
  A lane starts with no context; that costs ``batch_size`` tokens their
  history, nothing more.
* ``window`` (attention with a bounded cache): windows of ``seq_len`` tokens
  shifted by ``stride``; each scores only its last ``stride`` targets (the
  first window scores all), so every scored token sees at least
  ``seq_len − stride`` tokens of context (Languini: 512 and 128).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
import tqdm

MODES = ("auto", "carry", "window")


def default_mode(model_config) -> str:
  """``window`` when any layer is full attention (bounded by its cache) or
  positions are learned (bounded by the table: a document longer than
  ``max_len`` would read past it), else ``carry`` (also for HMT, whose state
  is bounded whatever its backbone)."""
  if not hasattr(model_config, "layout"):
    return "carry"
  bounded = (model_config.positions == "learned"
             or any(s.name == "attention" for s in model_config.layout))
  return "window" if bounded else "carry"


def _segments(tokens: np.ndarray, eod_id: int) -> np.ndarray:
  """Document number of every token: it increments at each end-of-document id."""
  return np.cumsum(tokens == eod_id).astype(np.int32) + 1


def _totals(nll, mask, targets, byte_lengths) -> dict[str, float]:
  return {"nll": float(np.sum(nll * mask, dtype=np.float64)),
          "tokens": float(np.sum(mask)),
          "bytes": float(np.sum(byte_lengths[targets] * mask))}


def perplexity(model, params, tokens: np.ndarray, byte_lengths: np.ndarray, *, eod_id: int,
               seq_len: int, batch_size: int, mode: str = "auto", stride: int = 128,
               progress: bool = True) -> dict[str, Any]:
  """Scores ``tokens`` (``[N]`` int) with ``model`` (a ``LanguageModel``).

  Args:
    model: the model; ``params`` its parameters (the ``params`` collection).
    tokens: the stream, ``N ≥ 2``.
    byte_lengths: ``[V]`` UTF-8 bytes of every token id.
    eod_id: the end-of-document id that starts every document.
    seq_len: window length.
    batch_size: lanes (``carry``) or windows per call (``window``).
    mode: ``carry``, ``window`` or ``auto`` (:func:`default_mode`).
    stride: ``window`` mode's shift, ``1 ≤ stride ≤ seq_len``.
    progress: show a progress bar.

  Returns:
    ``{"tokens", "bytes", "nll", "loss", "token_perplexity",
    "byte_perplexity", "bits_per_byte", "mode"}``.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or tokens.size < 2:
    raise ValueError(f"tokens have shape {list(tokens.shape)}; expected [N] with N >= 2")
  vocab = model.config.vocab_size
  if tokens.min() < 0 or tokens.max() >= vocab:
    bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
    raise ValueError(f"token id {bad} is outside [0, {vocab}); the stream does not match the model")
  for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("stride", stride)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}; expected a positive int")
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {', '.join(MODES)}")
  if mode == "auto":
    mode = default_mode(model.config)
  byte_lengths = np.asarray(byte_lengths)
  segments = _segments(tokens, eod_id)

  @jax.jit
  def score(params, inputs, targets, segment_ids, state):
    logits, state = model.apply({"params": params}, inputs, state=state,
                                segment_ids=segment_ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), state

  if mode == "carry":
    totals = _carry(score, params, model, tokens, segments, byte_lengths, seq_len,
                    batch_size, progress)
  elif mode == "window":
    if stride > seq_len:
      raise ValueError(f"stride={stride} exceeds seq_len={seq_len}; expected stride <= seq_len")
    totals = _window(score, params, tokens, segments, byte_lengths, seq_len, batch_size,
                     stride, progress)
  loss = totals["nll"] / totals["tokens"]
  return {**totals, "mode": mode, "loss": loss, "token_perplexity": math.exp(loss),
          "byte_perplexity": math.exp(totals["nll"] / totals["bytes"]),
          "bits_per_byte": totals["nll"] / totals["bytes"] / math.log(2)}


def _carry(score, params, model, tokens, segments, byte_lengths, seq_len, lanes, progress):
  lane_len = tokens.size // lanes
  if lane_len < 2:
    raise ValueError(f"{tokens.size} tokens are too few for batch_size={lanes} lanes; "
                     "expected at least 2 per lane")
  cut = lambda a: a[:lanes * lane_len].reshape(lanes, lane_len)
  stream, segs = cut(tokens), cut(segments)
  state = model.init_state(lanes)
  totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
  starts = range(0, lane_len - 1, seq_len)
  for start in tqdm.tqdm(starts, desc="carry", unit="window", disable=not progress):
    stop = min(start + seq_len, lane_len - 1)
    width = stop - start
    pad = ((0, 0), (0, seq_len - width))   # one shape for every call: one compile
    inputs = np.pad(stream[:, start:stop], pad)
    targets = np.pad(stream[:, start + 1:stop + 1], pad)
    # Padding continues the last document: it comes after every real token,
    # so causality keeps it out of their scores; it is masked and the state
    # after it is never used.
    segment_ids = np.pad(segs[:, start:stop], pad, mode="edge")
    nll, state = score(params, inputs, targets, segment_ids, state)
    mask = np.zeros(inputs.shape, np.float32)
    mask[:, :width] = 1.0
    for key, value in _totals(np.asarray(nll), mask, targets, byte_lengths).items():
      totals[key] += value
  return totals


def _window(score, params, tokens, segments, byte_lengths, seq_len, batch_size, stride,
            progress):
  num_targets = tokens.size - 1
  starts = [0]
  while starts[-1] + seq_len < num_targets:
    starts.append(starts[-1] + stride)
  totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
  batches = range(0, len(starts), batch_size)
  for first in tqdm.tqdm(batches, desc="window", unit="batch", disable=not progress):
    group = starts[first:first + batch_size]
    inputs = np.zeros((batch_size, seq_len), tokens.dtype)
    targets = np.zeros((batch_size, seq_len), tokens.dtype)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    mask = np.zeros((batch_size, seq_len), np.float32)
    for row, start in enumerate(group):
      stop = min(start + seq_len, num_targets)
      width = stop - start
      inputs[row, :width] = tokens[start:stop]
      targets[row, :width] = tokens[start + 1:stop + 1]
      segment_ids[row, :width] = segments[start:stop]
      segment_ids[row, width:] = segments[stop - 1]
      # The targets no earlier window scored: all in the first window, else
      # those past the previous window's end, the last ``stride``.
      first_new = 0 if start == 0 else seq_len - stride
      mask[row, first_new:width] = 1.0
    nll, _ = score(params, inputs, targets, segment_ids, None)
    for key, value in _totals(np.asarray(nll), mask, targets, byte_lengths).items():
      totals[key] += value
  return totals
