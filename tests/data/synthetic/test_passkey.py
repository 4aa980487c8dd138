"""Passkey retrieval: prompt layout, length, depth, labels, exact match, determinism."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from recurrent_lm import data
from recurrent_lm.data.synthetic import _example
from recurrent_lm.data.synthetic import passkey
from tests.data._texts import write_corpus

CONFIG = passkey.PasskeyConfig(lengths=(400, 700), num_depths=4)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  root = tmp_path_factory.mktemp("texts")
  write_corpus(root)
  corpus_dir = data.prepare_corpus(root, tmp_path_factory.mktemp("cache"))
  return data.train_tokenizer(corpus_dir, 500, tmp_path_factory.mktemp("tok") / "bpe")


def _fixed_tokens(tokenizer, config=CONFIG) -> int:
  key = config.key_sentence.format(key="0" * config.num_digits)
  return (len(tokenizer.encode(config.intro)) + len(tokenizer.encode(" " + key))
          + len(tokenizer.encode(" " + config.question)))


def _sentence_tokens(tokenizer, config=CONFIG) -> list[int]:
  return [len(tokenizer.encode(" " + s)) for s in config.filler]


def _split(tokenizer, prompt, key, config=CONFIG) -> tuple[str, str]:
  """The filler text before and after the key sentence, from the decoded prompt."""
  text = tokenizer.decode(prompt)
  key_sentence = config.key_sentence.format(key=config.key_text(key))
  assert text.startswith(config.intro + " ") and text.endswith(" " + config.question)
  assert text.count(key_sentence) == 1
  at = text.index(key_sentence)
  assert text[at - 1] == " "
  return text[len(config.intro):at - 1], text[at + len(key_sentence):-len(config.question) - 1]


def test_answer_is_a_space_then_one_token_per_digit(tokenizer):
  for key in (0, 12345, 99999, 4071):
    _, answer = passkey.passkey_prompt(tokenizer, key, 400, 0.5, CONFIG)
    digits = f"{key:05d}"
    assert answer == tokenizer.encode(" ") + [tokenizer.encode(d)[0] for d in digits]
    assert len(answer) == 6 and tokenizer.decode(answer) == " " + digits


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_ids_are_the_encoding_of_the_whole_text(tokenizer, depth):
  prompt, answer = passkey.passkey_prompt(tokenizer, 2024, 500, depth, CONFIG)
  text = tokenizer.decode(prompt)
  assert tokenizer.encode(text) == prompt
  assert tokenizer.encode(text + tokenizer.decode(answer)) == prompt + answer


def test_prompt_length_fills_the_target(tokenizer):
  fixed, longest = _fixed_tokens(tokenizer), max(_sentence_tokens(tokenizer))
  prompt, _ = passkey.passkey_prompt(tokenizer, 7, fixed, 0.5, CONFIG)
  assert len(prompt) == fixed  # no filler at all
  for length in range(fixed, fixed + 400, 7):
    prompt, _ = passkey.passkey_prompt(tokenizer, 31337, length, 0.5, CONFIG)
    assert length - longest < len(prompt) <= length, length
  with pytest.raises(ValueError, match=f"length={fixed - 1}; expected at least {fixed}"):
    passkey.passkey_prompt(tokenizer, 7, fixed - 1, 0.5, CONFIG)


@pytest.mark.parametrize("depth", [0.0, 0.05, 0.125, 0.375, 0.5, 0.875, 0.95, 1.0])
def test_key_sentence_sits_at_the_depth_of_the_filler(tokenizer, depth):
  key = 90210
  prompt, _ = passkey.passkey_prompt(tokenizer, key, 1000, depth, CONFIG)
  before, after = _split(tokenizer, prompt, key)
  # The filler is the sentences cycled from the first, cut at a sentence boundary.
  units = [" " + s for s in CONFIG.filler]
  count = (before + after).count(".")
  assert before + after == "".join(units[i % len(units)] for i in range(count))
  assert count > 40
  n_before, n_after = len(tokenizer.encode(before)), len(tokenizer.encode(after))
  # The nearest sentence boundary: within half the longest sentence of d·F.
  assert abs(n_before - depth * (n_before + n_after)) <= max(_sentence_tokens(tokenizer)) / 2
  assert (before == "") == (depth == 0.0) and (after == "") == (depth == 1.0)


def test_example_fields(tokenizer):
  source = passkey.PasskeySource(tokenizer, CONFIG, num_examples=16, seed=3)
  for index in (0, 5, 11):
    example = source[index]
    key, length = int(example["key"]), int(example["length"])
    depth = CONFIG.depths[int(example["depth_index"])]
    prompt, answer = passkey.passkey_prompt(tokenizer, key, length, depth, CONFIG)
    tokens = np.asarray(prompt + answer)
    np.testing.assert_array_equal(example["inputs"], tokens[:-1])
    np.testing.assert_array_equal(example["targets"], tokens[1:])
    scored = np.flatnonzero(example["loss_mask"])
    np.testing.assert_array_equal(scored, np.arange(len(prompt) - 1, tokens.size - 1))
    assert scored.size == CONFIG.num_digits + 1  # the space token, then the digits
    assert tokenizer.decode(example["targets"][scored]) == " " + f"{key:05d}"
    # JRT-Prompt repeats everything before the question, the key sentence included.
    n = int(example["context_len"])
    assert tokenizer.decode(example["inputs"][n:]).startswith(" " + CONFIG.question)
    assert f"{key:05d} is the pass key." in tokenizer.decode(example["inputs"][:n])
    assert all(example[name].dtype == np.int32 for name in example)


def test_the_grid_cycles_and_only_the_key_is_random(tokenizer):
  source = passkey.PasskeySource(tokenizer, CONFIG)
  assert len(source) == 2 * 4
  many = passkey.PasskeySource(tokenizer, CONFIG, num_examples=20)
  grid = [(int(many[i]["length"]), int(many[i]["depth_index"])) for i in range(20)]
  assert grid[:8] == [(400, 0), (700, 0), (400, 1), (700, 1), (400, 2), (700, 2), (400, 3),
                      (700, 3)]
  assert grid[8:16] == grid[:8] and grid[16:] == grid[:4]
  keys = [int(many[i]["key"]) for i in range(20)]
  assert len(set(keys)) > 15 and all(0 <= k < 100_000 for k in keys)
  assert CONFIG.depths == (0.125, 0.375, 0.625, 0.875)


def test_examples_depend_on_seed_and_index_only(tokenizer):
  a = passkey.PasskeySource(tokenizer, CONFIG, num_examples=10, seed=5)
  b = pickle.loads(pickle.dumps(passkey.PasskeySource(tokenizer, CONFIG, num_examples=10, seed=5)))
  forward = [a[i] for i in range(10)]
  backward = [b[i] for i in reversed(range(10))][::-1]
  for x, y in zip(forward, backward):
    assert x.keys() == y.keys()
    for name in x:
      np.testing.assert_array_equal(x[name], y[name])
  other = passkey.PasskeySource(tokenizer, CONFIG, num_examples=10, seed=6)
  assert [int(e["key"]) for e in forward] != [int(other[i]["key"]) for i in range(10)]


def test_exact_match(tokenizer):
  source = passkey.PasskeySource(tokenizer, CONFIG, num_examples=4)
  batch = _example.batches_of(source[i] for i in range(4))  # two lengths: padded rows
  targets = batch["targets"]
  assert passkey.exact_match(batch, targets).tolist() == [True] * 4
  logits = np.eye(tokenizer.vocab_size, dtype=np.float32)[targets]
  assert passkey.exact_match(batch, logits).tolist() == [True] * 4
  # One wrong answer digit fails its row only.
  wrong = targets.copy()
  digit = np.flatnonzero(batch["loss_mask"][2])[3]
  wrong[2, digit] = tokenizer.encode("7" if tokenizer.decode(targets[2, digit]) != "7" else "8")[0]
  assert passkey.exact_match(batch, wrong).tolist() == [True, True, False, True]
  # So does a missing space token; an unscored position does not count.
  wrong = targets.copy()
  wrong[1, np.flatnonzero(batch["loss_mask"][1])[0]] = targets[1, 0]
  wrong[3, 0] = targets[3, 1]
  assert passkey.exact_match(batch, wrong).tolist() == [True, False, True, True]


@pytest.mark.parametrize("kwargs, match", [
    (dict(key=7, length=600, depth=-0.1), "depth=-0.1"),
    (dict(key=7, length=600, depth=1.5), "depth=1.5"),
    (dict(key=7, length=600, depth=float("nan")), "depth=nan"),
    (dict(key=-1, length=600, depth=0.5), "key=-1"),
    (dict(key=100_000, length=600, depth=0.5), "key=100000"),
    (dict(key=1.0, length=600, depth=0.5), "key=1.0"),
    (dict(key=7, length=0, depth=0.5), "length=0"),
    (dict(key=7, length=50, depth=0.5), "length=50"),
])
def test_bad_prompt_arguments_raise(tokenizer, kwargs, match):
  with pytest.raises(ValueError, match=match):
    passkey.passkey_prompt(tokenizer, config=CONFIG, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lengths=()), "lengths"),
    (dict(lengths=(512, 0)), "lengths"),
    (dict(lengths=[512]), "lengths"),
    (dict(num_depths=0), "num_depths"),
    (dict(num_digits=0), "num_digits"),
    (dict(num_digits=10), "num_digits"),
    (dict(filler=()), "filler"),
    (dict(filler=("a.", "")), "filler"),
    (dict(key_sentence="The pass key is 5."), "key_sentence"),
])
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    passkey.PasskeyConfig(**kwargs)


def test_bad_source_and_batch_raise(tokenizer):
  with pytest.raises(ValueError, match="length=100; expected at least"):
    passkey.PasskeySource(tokenizer, passkey.PasskeyConfig(lengths=(700, 100)))
  with pytest.raises(ValueError, match="num_examples=0"):
    passkey.PasskeySource(tokenizer, CONFIG, num_examples=0)
  source = passkey.PasskeySource(tokenizer, CONFIG, num_examples=2)
  with pytest.raises(IndexError):
    source[2]
  batch = _example.batches_of([source[0], source[1]])
  with pytest.raises(ValueError, match="expected"):
    passkey.exact_match(batch, batch["targets"][:, :-1])
  batch["loss_mask"][1] = 0
  with pytest.raises(ValueError, match="row 1 has no scored position"):
    passkey.exact_match(batch, batch["targets"])
