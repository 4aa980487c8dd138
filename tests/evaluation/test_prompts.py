"""JRT-Prompt and answer scoring, on strings, token ids and real models."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from recurrent_lm import evaluation
from recurrent_lm import models

VOCAB = 64


def test_the_context_is_read_twice_before_the_query():
  assert evaluation.jrt_prompt("doc. ", "Q?") == "doc. doc. Q?"
  assert evaluation.jrt_prompt("doc.", "Q?", separator="\n") == "doc.\ndoc.Q?"
  assert evaluation.jrt_prompt("doc ", "Q? ", repeat_query=True) == "doc Q? doc Q? "
  assert evaluation.jrt_prompt("doc ", "Q?", repeats=1) == "doc Q?"


def test_token_ids_give_one_int32_array():
  prompt = evaluation.jrt_prompt([5, 6, 7], np.array([9]), separator=[2], repeats=3)
  np.testing.assert_array_equal(prompt, [5, 6, 7, 2, 5, 6, 7, 2, 5, 6, 7, 9])
  assert prompt.dtype == np.int32


@pytest.mark.parametrize("context, query, separator, repeats, message", [
    ("doc", [1, 2], None, 2, "all be strings or all token ids"),
    ([1], [2], "\n", 2, "all be strings or all token ids"),
    ("doc", "Q", None, 0, r"repeats=0; expected a positive int"),
])
def test_bad_arguments_are_one_clear_error(context, query, separator, repeats, message):
  with pytest.raises((TypeError, ValueError), match=message):
    evaluation.jrt_prompt(context, query, separator=separator, repeats=repeats)


@pytest.mark.parametrize("preset", ["gpt_cpu_tiny", "qlstm_cpu_tiny"])
def test_answer_log_likelihood_equals_decoding_the_answer_token_by_token(preset):
  model = models.LanguageModel(models.presets.get(preset, vocab_size=VOCAB, max_len=64))
  rng = np.random.default_rng(0)
  context, query, answer = (rng.integers(3, VOCAB, n) for n in (9, 3, 4))
  prompt = evaluation.jrt_prompt(context, query)
  params = nn.meta.unbox(model.init(jax.random.key(0), prompt[None, :2]))["params"]
  score = evaluation.answer_log_likelihood(model, params, prompt, answer)

  apply = jax.jit(model.apply)
  logits, state = apply({"params": params}, prompt[None])
  expected = 0.0
  for token in answer:
    expected += float(jax.nn.log_softmax(logits[0, -1])[token])
    logits, state = apply({"params": params}, np.array([[token]]), state)
  assert score == pytest.approx(expected, rel=1e-5)
  assert score < 0
