"""The BPE tokenizer: exact round trips, byte lengths, special ids, deterministic training."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from recurrent_lm import data
from tests.data._texts import make_document
from tests.data._texts import write_corpus

VOCAB = 500

TRICKY = [
    "",
    "a  b\n\n  c\t",
    "   leading spaces",
    "trailing spaces   ",
    "\n\nnewlines first and last\n",
    "tabs\tand\t\ttabs",
    "café naïve Ωmega 日本語 한국어 עברית",
    "emoji 👍🏽 and 🏳️‍🌈 flags",
    "digits 1234567890 and 3.14159",
    "\u2581 sentencepiece's own space mark \u2581\u2581",
    "<eod> <pad> <unk> </s> look like specials",
    "\r\n windows\r line ends",
    "\x00\x01 control \x7f chars",
    "\u00a0no-break\u3000ideographic\u200bzero-width",
    " ",
    "x" * 3000,
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("texts")
  write_corpus(root)
  return data.prepare_corpus(root, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tokenizer(corpus_dir, tmp_path_factory):
  return data.train_tokenizer(corpus_dir, VOCAB, tmp_path_factory.mktemp("tok") / "bpe")


@pytest.mark.parametrize("text", TRICKY)
def test_decode_inverts_encode_exactly(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_random_text_round_trips(tokenizer):
  rng = random.Random(1)
  alphabet = "ab \n\t.,é日👍\u2581 0123"
  for _ in range(200):
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", TRICKY)
def test_byte_lengths_sum_to_the_utf8_length(tokenizer, text):
  ids = tokenizer.encode(text)
  assert tokenizer.byte_lengths[ids].sum() == len(text.encode("utf-8"))


def test_byte_lengths_of_whole_documents(tokenizer, corpus_dir):
  for text in data.read_documents(corpus_dir, "validation"):
    assert tokenizer.byte_lengths[tokenizer.encode(text)].sum() == len(text.encode("utf-8"))


def test_byte_lengths_of_special_and_byte_ids(tokenizer):
  lengths = tokenizer.byte_lengths
  assert lengths.shape == (VOCAB,) and lengths.dtype == np.int32
  assert lengths[tokenizer.eod_id] == 0 and lengths[tokenizer.pad_id] == 0
  byte_ids = tokenizer.encode("\x01")  # no piece holds a control character: byte fallback
  assert len(byte_ids) == 1 and lengths[byte_ids[0]] == 1


def test_digits_are_split_one_by_one(tokenizer):
  ids = tokenizer.encode("1999 and 12345")
  digit_pieces = [tokenizer.decode([i]) for i in ids if tokenizer.decode([i]).isdigit()]
  assert "".join(digit_pieces) == "199912345"
  assert all(len(p) == 1 for p in digit_pieces)


def test_encode_never_produces_eod_or_pad(tokenizer, corpus_dir):
  texts = TRICKY + list(data.read_documents(corpus_dir, "train"))
  for ids in tokenizer.encode_batch(texts):
    assert tokenizer.eod_id not in ids and tokenizer.pad_id not in ids
    assert all(0 <= i < VOCAB for i in ids)


def test_encode_batch_equals_encode(tokenizer):
  assert tokenizer.encode_batch(TRICKY) == [tokenizer.encode(t) for t in TRICKY]


def test_decode_skips_eod_and_pad(tokenizer):
  ids = tokenizer.encode("one two")
  padded = [tokenizer.eod_id] + ids + [tokenizer.pad_id, tokenizer.eod_id]
  assert tokenizer.decode(padded) == "one two"
  assert tokenizer.decode(np.asarray(padded, np.int32)) == "one two"


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
  with pytest.raises(ValueError, match=f"{VOCAB + 3}"):
    tokenizer.decode([5, VOCAB + 3])


def test_the_vocabulary_has_exactly_the_requested_size(tokenizer):
  assert tokenizer.vocab_size == VOCAB
  assert tokenizer.eod_id != tokenizer.pad_id


def test_training_compresses_the_training_text(tokenizer, corpus_dir):
  text = "\n\n".join(data.read_documents(corpus_dir, "train"))
  assert len(text.encode()) / len(tokenizer.encode(text)) > 2.0


def test_training_is_deterministic(corpus_dir, tokenizer, tmp_path):
  again = data.train_tokenizer(corpus_dir, VOCAB, tmp_path / "again")
  with open(again.model_path, "rb") as a, open(tokenizer.model_path, "rb") as b:
    assert a.read() == b.read()


def test_training_writes_model_and_vocab_and_no_temp_files(corpus_dir, tmp_path):
  tok = data.train_tokenizer(corpus_dir, VOCAB, tmp_path / "sub" / "bpe")
  assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["bpe.model", "bpe.vocab"]
  assert tok.model_path == str(tmp_path / "sub" / "bpe.model")
  assert len((tmp_path / "sub" / "bpe.vocab").read_text(encoding="utf-8").splitlines()) == VOCAB


def test_max_sentences_caps_the_training_lines_by_seed(corpus_dir, tmp_path):
  a = data.train_tokenizer(corpus_dir, 400, tmp_path / "a", seed=0, max_sentences=40)
  b = data.train_tokenizer(corpus_dir, 400, tmp_path / "b", seed=0, max_sentences=40)
  c = data.train_tokenizer(corpus_dir, 400, tmp_path / "c", seed=1, max_sentences=40)
  read = lambda t: open(t.model_path, "rb").read()  # pylint: disable=unnecessary-lambda-assignment
  assert read(a) == read(b) != read(c)


def test_a_vocabulary_too_small_for_the_text_is_a_value_error(corpus_dir, tmp_path):
  with pytest.raises(ValueError, match="vocab_size=100 "):
    data.train_tokenizer(corpus_dir, 100, tmp_path / "tiny")
  assert not list(tmp_path.iterdir())


def test_pickle_carries_the_model(tokenizer, tmp_path):
  text = make_document(random.Random(3), 50)
  clone = pickle.loads(pickle.dumps(tokenizer))
  assert clone.encode(text) == tokenizer.encode(text)
  assert clone.model_path == tokenizer.model_path
  np.testing.assert_array_equal(clone.byte_lengths, tokenizer.byte_lengths)
  rebuilt = data.Tokenizer(tokenizer.model_path)
  assert rebuilt.encode(text) == tokenizer.encode(text)


def test_a_missing_model_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.model"):
    data.Tokenizer(tmp_path / "nothing.model")
