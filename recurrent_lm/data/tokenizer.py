"""A byte-exact sentencepiece BPE tokenizer with an end-of-document id.

Trained with Languini's settings (``languini/vocabs/create_spm_vocab.ipynb``):
BPE, byte fallback, digits split one by one, identity normalisation, no dummy
prefix, no removal of extra whitespace, whitespace-only pieces allowed,
splits by Unicode script / number / whitespace, pieces up to 99 characters,
``<pad>`` = 0 and ``<unk>`` = 1, no BOS/EOS. Where Languini adds its document
separator ``<D>`` as a user-defined symbol (so the text ``"<D>"`` encodes to
it), ours, ``<eod>`` = 2, is a control symbol: ``encode`` never produces it,
nor ``<pad>``; ``<unk>`` never appears either, since byte fallback spells
every character outside the vocabulary as its UTF-8 bytes.

Training reads the train split line by line (as Languini does), so newlines
never enter a piece and encode as the byte piece ``<0x0A>``. Hence for every
string ``s``: ``decode(encode(s)) == s`` and
``byte_lengths[encode(s)].sum() == len(s.encode("utf-8"))``.
"""

from __future__ import annotations

import io
import os
import pathlib
import time
from typing import Iterator, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from recurrent_lm.data import _files
from recurrent_lm.data import corpus as _corpus

EOD_PIECE = "<eod>"
# sentencepiece writes a space as this piece character, and reads one in the
# input as a space; `Tokenizer.encode` spells a literal one as its bytes.
_META_SPACE = "\u2581"

_TRAINER_SETTINGS = dict(
    model_type="bpe",
    pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
    control_symbols=[EOD_PIECE],
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_number=True,
    split_by_whitespace=True,
    max_sentencepiece_length=99,
    hard_vocab_limit=True,
    vocabulary_output_piece_score=False,
    # We choose the training lines ourselves (seeded), so sentencepiece takes them all.
    input_sentence_size=0,
    shuffle_input_sentence=False,
)


class Tokenizer:
  """A trained sentencepiece model with byte-exact ``encode`` / ``decode``.

  Attributes:
    model_path: the ``.model`` file it was loaded from.
    vocab_size: number of ids, ``[0, vocab_size)``.
    eod_id: the end-of-document id; the pipeline puts it before every document.
    pad_id: the padding id (0); ``encode`` never produces it.
    byte_lengths: ``[vocab_size]`` int32, the UTF-8 bytes each id adds when
      decoded: 0 for ``<pad>``, ``<unk>``, ``<eod>``; 1 for a byte piece; the
      UTF-8 length of the piece, ``▁`` counted as one space, otherwise.

  A tokenizer pickles with its model inside, so it unpickles where the file is absent.
  """

  def __init__(self, model_path: str | os.PathLike):
    self.model_path = str(model_path)
    if not pathlib.Path(self.model_path).is_file():
      raise FileNotFoundError(f"tokenizer model {self.model_path} does not exist")
    self._load(pathlib.Path(self.model_path).read_bytes())

  def _load(self, proto: bytes) -> None:
    self._proto = proto
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.vocab_size = self._sp.get_piece_size()
    self.eod_id = self._sp.piece_to_id(EOD_PIECE)
    self.pad_id = self._sp.pad_id()
    if not self._sp.is_control(self.eod_id) or self.pad_id < 0:
      raise ValueError(f"{self.model_path} has no control piece {EOD_PIECE!r} or no <pad>; "
                       "expected a model made by train_tokenizer")
    self._meta_space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META_SPACE.encode()]
    self.byte_lengths = self._byte_lengths()

  def __getstate__(self):
    return {"model_path": self.model_path, "proto": self._proto}

  def __setstate__(self, state):
    self.model_path = state["model_path"]
    self._load(state["proto"])

  def __repr__(self) -> str:
    return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str) -> list[int]:
    """The ids of ``text``, without ``eod_id``."""
    if _META_SPACE not in text:
      return self._sp.encode(text)
    ids = []
    for i, part in enumerate(text.split(_META_SPACE)):
      if i:
        ids += self._meta_space_ids
      ids += self._sp.encode(part)
    return ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """``[encode(t) for t in texts]``, on several threads (-1: all cores)."""
    plain = [i for i, t in enumerate(texts) if _META_SPACE not in t]
    out: list[list[int]] = [None] * len(texts)  # type: ignore[list-item]
    for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain], num_threads=num_threads)):
      out[i] = ids
    for i, t in enumerate(texts):
      if out[i] is None:
        out[i] = self.encode(t)
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of ``ids``; ``eod_id`` and ``pad_id`` decode to nothing."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"token id {int(bad[0])} is outside the vocabulary; "
                       f"expected ids in [0, {self.vocab_size})")
    ids = ids[(ids != self.eod_id) & (ids != self.pad_id)]
    return self._sp.decode(ids.tolist())

  def _byte_lengths(self) -> np.ndarray:
    lengths = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      if self._sp.is_byte(i):
        lengths[i] = 1
      else:
        lengths[i] = len(self._sp.id_to_piece(i).replace(_META_SPACE, " ").encode("utf-8"))
    return lengths


def train_tokenizer(corpus_dir: str | os.PathLike, vocab_size: int,
                    model_prefix: str | os.PathLike, *, seed: int = 0,
                    max_sentences: int = 2_000_000) -> Tokenizer:
  """Trains the BPE tokenizer on the train split of a prepared corpus.

  Args:
    corpus_dir: a directory made by ``prepare_corpus``.
    vocab_size: the exact number of ids (sentencepiece's hard limit); at least
      the 3 special ids + 256 byte pieces + the characters of the text.
    model_prefix: writes ``<model_prefix>.model`` and ``<model_prefix>.vocab``
      (one piece per line), each atomically, the ``.model`` last.
    seed: picks the training lines when there are more than ``max_sentences``.
    max_sentences: at most this many non-blank lines of the train split are
      used (Languini's ``input_sentence_size``), drawn uniformly with ``seed``.

  Returns:
    The tokenizer loaded from ``<model_prefix>.model``. The model is a function
    of the corpus, ``vocab_size``, ``seed`` and ``max_sentences`` only — the
    same bytes on any machine.

  Raises:
    ValueError: ``vocab_size`` does not suit the text (too small for its
      characters, or more pieces than the text can make).
  """
  if not isinstance(vocab_size, int) or vocab_size < 1:
    raise ValueError(f"vocab_size={vocab_size!r}; expected a positive int")
  if not isinstance(max_sentences, int) or max_sentences < 1:
    raise ValueError(f"max_sentences={max_sentences!r}; expected a positive int")
  model_prefix = pathlib.Path(model_prefix).absolute()
  total = sum(1 for _ in _train_lines(corpus_dir))
  if total == 0:
    raise ValueError(f"the train split of {corpus_dir} has no text; expected some lines")
  keep = None
  if total > max_sentences:
    keep = np.zeros(total, bool)
    keep[np.random.default_rng(seed).choice(total, max_sentences, replace=False)] = True
  lines = (line for i, line in enumerate(_train_lines(corpus_dir)) if keep is None or keep[i])

  _files.log(f"training a {vocab_size}-piece BPE tokenizer on {min(total, max_sentences):,} "
             f"lines of {corpus_dir}")
  start = time.perf_counter()
  writer = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=writer, vocab_size=vocab_size,
        num_threads=os.cpu_count() or 1, minloglevel=2, **_TRAINER_SETTINGS)
  except RuntimeError as e:
    raise ValueError(f"vocab_size={vocab_size} does not suit the train split of "
                     f"{corpus_dir}: {str(e).strip().splitlines()[-1]}") from None
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(writer.getvalue())
  # The thread count is recorded in the model but does not change the pieces.
  proto.trainer_spec.ClearField("num_threads")
  model_path = model_prefix.with_name(model_prefix.name + ".model")
  with _files.atomic_write(model_prefix.with_name(model_prefix.name + ".vocab")) as f:
    f.writelines(p.piece + "\n" for p in proto.pieces)
  with _files.atomic_write(model_path, "wb") as f:
    f.write(proto.SerializeToString(deterministic=True))
  _files.log(f"wrote {model_path} in {time.perf_counter() - start:.1f} s")
  return Tokenizer(model_path)


def _train_lines(corpus_dir) -> Iterator[str]:
  for text in _corpus.read_documents(corpus_dir, "train"):
    for line in text.split("\n"):
      if line.strip():
        yield line
