"""Perplexity: every target scored once, with the context each mode promises.

References are independent computations on the same model: one call over the
whole stream (carry mode), and per-target windows chosen by formula (window
mode). Tolerance: summed nll agrees to 1e-5 relative (float32 logits).
"""

import functools

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from recurrent_lm import evaluation
from recurrent_lm import models
from tests.layers._util import perturb

VOCAB = 61
EOD = 2


def _stream(seed, length):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, length)
  tokens[0] = EOD
  tokens[rng.choice(np.arange(5, length), 4, replace=False)] = EOD   # documents
  return tokens


@functools.lru_cache(maxsize=None)
def _setup(preset):
  model = models.LanguageModel(models.presets.get(preset, vocab_size=VOCAB, max_len=64))
  params = perturb(nn.meta.unbox(model.init(jax.random.key(0), np.zeros((1, 4), np.int32))),
                   scale=0.05)
  byte_lengths = np.random.default_rng(1).integers(0, 5, VOCAB)
  return model, params["params"], byte_lengths


def _nll(model, params, tokens):
  """nll of tokens[1:] from one call on tokens[:-1] with document segment ids."""
  segments = np.cumsum(tokens == EOD)[None, :-1]
  logits, _ = _apply(model)({"params": params}, tokens[None, :-1], segment_ids=segments)
  return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[None, 1:]))[0]


@functools.lru_cache(maxsize=None)
def _apply(model):
  return jax.jit(model.apply)


def test_carry_mode_with_one_lane_equals_one_call_over_the_stream():
  model, params, byte_lengths = _setup("qlstm_cpu_tiny")
  tokens = _stream(0, 150)
  result = evaluation.perplexity(model, params, tokens, byte_lengths, eod_id=EOD, seq_len=16,
                                 batch_size=1, mode="carry", progress=False)
  reference = _nll(model, params, tokens)
  assert result["mode"] == "carry" and result["tokens"] == 149
  assert result["nll"] == pytest.approx(reference.sum(), rel=1e-5)
  assert result["bytes"] == byte_lengths[tokens[1:]].sum()
  assert result["byte_perplexity"] == pytest.approx(np.exp(reference.sum() / result["bytes"]),
                                                    rel=1e-5)
  assert result["bits_per_byte"] == pytest.approx(
      reference.sum() / result["bytes"] / np.log(2), rel=1e-5)


def test_carry_mode_lanes_are_contiguous_pieces_of_the_stream():
  model, params, byte_lengths = _setup("qlstm_cpu_tiny")
  tokens = _stream(1, 203)
  lanes = 4
  result = evaluation.perplexity(model, params, tokens, byte_lengths, eod_id=EOD, seq_len=16,
                                 batch_size=lanes, mode="carry", progress=False)
  lane_len = tokens.size // lanes
  reference = 0.0
  for lane in range(lanes):
    piece = tokens[lane * lane_len:(lane + 1) * lane_len]
    # A lane's segment ids continue the stream's document count; only changes matter.
    reference += _nll(model, params, piece).sum()
  assert result["tokens"] == lanes * (lane_len - 1)
  assert result["nll"] == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("seq_len, stride", [(32, 8), (32, 32), (20, 7)])
def test_window_mode_scores_each_target_once_with_its_promised_context(seq_len, stride):
  model, params, byte_lengths = _setup("gpt_cpu_tiny")
  tokens = _stream(2, 111)
  result = evaluation.perplexity(model, params, tokens, byte_lengths, eod_id=EOD,
                                 seq_len=seq_len, batch_size=3, stride=stride, mode="window",
                                 progress=False)
  reference, windows = 0.0, {}
  for target in range(tokens.size - 1):   # target predicts tokens[target + 1]
    # The first window scores targets < seq_len; later windows (starts k·stride)
    # score their last ``stride``: the window whose end first passes the target.
    start = 0 if target < seq_len else ((target - seq_len) // stride + 1) * stride
    assert target - start >= min(target, seq_len - stride)   # context promised
    if start not in windows:
      window = tokens[start:start + seq_len + 1]
      windows[start] = _nll(model, params, np.pad(window, (0, seq_len + 1 - window.size)))
    reference += windows[start][target - start]
  assert result["mode"] == "window" and result["tokens"] == tokens.size - 1
  assert result["nll"] == pytest.approx(reference, rel=1e-5)


def test_auto_mode_picks_window_for_attention_or_learned_positions_and_carry_otherwise():
  assert evaluation.default_mode(models.presets.get("gpt_cpu_tiny")) == "window"
  assert evaluation.default_mode(models.presets.get("qlstm_cpu_tiny")) == "carry"
  liger = models.linearize.liger_config(models.presets.get("gpt_cpu_tiny"))
  assert evaluation.default_mode(liger) == "window"      # recurrent, but positions are learned


@pytest.mark.parametrize("kwargs, message", [
    (dict(tokens=np.array([2, VOCAB + 3, 4])), f"token id {VOCAB + 3} is outside"),
    (dict(tokens=np.array([2])), r"expected \[N\] with N >= 2"),
    (dict(mode="window", stride=40), "stride=40 exceeds seq_len=32"),
    (dict(mode="sideways"), "mode='sideways'; expected one of"),
    (dict(batch_size=200, mode="carry"), "too few for batch_size=200 lanes"),
])
def test_bad_input_is_one_clear_error(kwargs, message):
  model, params, byte_lengths = _setup("gpt_cpu_tiny")
  call = dict(tokens=_stream(3, 100), eod_id=EOD, seq_len=32, batch_size=2, progress=False)
  call.update(kwargs)
  tokens = call.pop("tokens")
  with pytest.raises(ValueError, match=message):
    evaluation.perplexity(model, params, tokens, byte_lengths, **call)
