"""Generation: sampling filters against numpy, greedy decoding against a
recompute-everything reference, ragged batches, stop tokens, JRT, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import inference
from recurrent_lm import models
from tests.layers._util import perturb

VOCAB = 61


def _model(name, **overrides):
  config = models.presets.get(name, vocab_size=VOCAB, max_len=64)
  if overrides:
    config = models.ModelConfig.from_dict({**config.to_dict(), **overrides})
  model = models.build(config)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  return model, perturb(params, scale=0.05)


def _prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(1, VOCAB, n)) for n in lengths]


# ---------------------------------------------------------------------------
# Sampling.


def test_greedy_is_the_argmax_and_top_k_1_is_greedy_at_any_temperature():
  logits = jax.random.normal(jax.random.key(1), (5, VOCAB))
  argmax = np.argmax(np.asarray(logits), -1)
  np.testing.assert_array_equal(inference.sample(logits, None, inference.GREEDY), argmax)
  hot = inference.Sampling(temperature=3.0, top_k=1)
  for seed in range(3):
    np.testing.assert_array_equal(inference.sample(logits, jax.random.key(seed), hot), argmax)


def test_top_k_and_top_p_keep_the_sets_numpy_computes():
  logits = np.asarray(jax.random.normal(jax.random.key(2), (6, VOCAB))) * 2
  kept = np.isfinite(np.asarray(inference.filter_logits(
      jnp.asarray(logits), inference.Sampling(top_k=7))))
  np.testing.assert_array_equal(kept, logits >= np.sort(logits, -1)[:, -7:-6])
  for p in (0.3, 0.9):
    kept = np.isfinite(np.asarray(inference.filter_logits(
        jnp.asarray(logits), inference.Sampling(top_p=p))))
    for row in range(logits.shape[0]):
      order = np.argsort(-logits[row])
      probs = np.exp(logits[row] - logits[row].max())
      probs /= probs.sum()
      # The smallest prefix of the sorted tokens whose probability reaches p.
      size = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
      assert set(np.flatnonzero(kept[row])) == set(order[:size]), (row, p)


def test_draws_follow_the_tempered_softmax():
  logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
  sampling = inference.Sampling(temperature=2.0)
  keys = jax.random.split(jax.random.key(3), 20_000)
  draws = np.asarray(jax.vmap(lambda k: inference.sample(logits, k, sampling))(keys))[:, 0]
  expected = np.asarray(jax.nn.softmax(logits[0] / 2.0))
  observed = np.bincount(draws, minlength=4) / draws.size
  np.testing.assert_allclose(observed, expected, atol=0.015)   # ~4 standard errors


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -1.0, "temperature=-1.0"), ("top_k", -2, "top_k=-2"),
    ("top_p", 0.0, "top_p=0.0"), ("top_p", 1.5, "top_p=1.5")])
def test_bad_sampling_settings_are_one_line(field, value, message):
  with pytest.raises(ValueError, match=message):
    inference.Sampling(**{field: value})


# ---------------------------------------------------------------------------
# Decoding.


def _reference_greedy(model, params, prompt, steps):
  """Greedy decoding that reruns the whole sequence for every token (no state)."""
  tokens = list(prompt)
  for _ in range(steps):
    logits, _ = model.apply({"params": params}, jnp.asarray([tokens], jnp.int32))
    tokens.append(int(jnp.argmax(logits[0, -1])))
  return tokens[len(prompt):]


@pytest.mark.parametrize("name", ["qlstm_cpu_tiny", "gpt_cpu_tiny"])
def test_greedy_generation_equals_rerunning_the_whole_sequence(name):
  model, params = _model(name)
  prompts = _prompts(4, [5, 1])
  generated = inference.generate(model, params, prompts, max_new_tokens=5)
  for prompt, out in zip(prompts, generated):
    assert out == _reference_greedy(model, params, prompt, 5)


def test_a_ragged_batch_equals_each_prompt_alone_and_sampling_follows_its_key():
  model, params = _model("qlstm_cpu_tiny")
  prompts = _prompts(5, [3, 11, 6])
  batch = inference.generate(model, params, prompts, max_new_tokens=6)
  alone = [inference.generate(model, params, [p], max_new_tokens=6)[0] for p in prompts]
  assert batch == alone    # the left padding is a document of its own: never read
  sampling = inference.Sampling(temperature=1.0, top_k=20)
  one = inference.generate(model, params, prompts, max_new_tokens=6, sampling=sampling,
                           key=jax.random.key(7))
  again = inference.generate(model, params, prompts, max_new_tokens=6, sampling=sampling,
                             key=jax.random.key(7))
  other = inference.generate(model, params, prompts, max_new_tokens=6, sampling=sampling,
                             key=jax.random.key(8))
  assert one == again and one != other
  assert all(len(row) == 6 and all(0 <= t < VOCAB for t in row) for row in one)


def test_a_row_stops_at_its_stop_token_and_the_others_go_on():
  model, params = _model("qlstm_cpu_tiny")
  prompts = _prompts(6, [4, 7])
  # Sampled (greedy rows of a random tiny model fall into the same short cycle).
  draw = dict(max_new_tokens=8, sampling=inference.Sampling(temperature=1.0),
              key=jax.random.key(11))
  free = inference.generate(model, params, prompts, **draw)
  stop = next(t for t in free[0][1:] if t not in free[1])   # ends row 0 only, not at once
  stopped = inference.generate(model, params, prompts, stop_tokens=[stop], **draw)
  assert stopped[0] == free[0][:free[0].index(stop) + 1]
  assert stopped[1] == free[1]


def test_jrt_repeats_read_the_prompt_again():
  model, params = _model("qlstm_cpu_tiny")
  prompt = _prompts(9, [6])[0]
  twice = inference.generate(model, params, [prompt], max_new_tokens=5, jrt_repeats=2)
  assert twice == inference.generate(model, params, [prompt + prompt], max_new_tokens=5)


def test_bad_generation_requests_are_one_line():
  model, params = _model("gpt_cpu_tiny")
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    inference.generate(model, params, [[1, 2], []], max_new_tokens=2)
  with pytest.raises(ValueError, match=f"token id {VOCAB} is outside"):
    inference.generate(model, params, [[1, VOCAB]], max_new_tokens=2)
  with pytest.raises(ValueError, match="exceeds the model's max_len=64"):
    inference.generate(model, params, [[1] * 60], max_new_tokens=5)
  with pytest.raises(ValueError, match="needs a key"):
    inference.generate(model, params, [[1]], max_new_tokens=2,
                       sampling=inference.Sampling(temperature=1.0))
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    inference.generate(model, params, [[1]], max_new_tokens=0)
