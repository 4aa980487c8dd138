"""Token shards in ArrayRecord and the grain pipeline that packs them into batches.

``prepare_dataset`` turns a corpus into ``<data_dir>/tokens/<corpus>-bpe<V>/
<split>-00000-of-000NN.array_record``: one record per document, the document's
ids as little-endian int32 with ``eod_id`` put *before* them, so every
document starts with ``eod`` and the ``eod`` that starts the next document is
what the model predicts at the end of this one.

``lm_dataset`` reads the shards with grain::

  ArrayRecordDataSource → MapDataset: decode each record to int32
    → shuffle(seed) → repeat(num_epochs)  a new permutation every epoch
    → [r::batch_size]                      row r's documents, for each row r of this process
    → {"inputs": doc, "targets": doc shifted by one}
    → ConcatThenSplitIterDataset           row r's packed stream: segment ids, positions
    → one row from each stream per batch   batch_size // shard_count rows

**Every row of the global batch is a stream of its own.** Row ``r`` packs the
documents ``k ≡ r (mod batch_size)`` of the shuffled, repeated document order,
and step ``s`` of the run reads the ``s``-th piece of every row's stream. A
process reads only its rows, ``[i·b, (i+1)·b)`` with ``b = batch_size //
shard_count``, so the global batch of every step is the same whatever the
number of processes: a run on 2 hosts × 4 devices sees the same data as one on
1 host × 8, and a checkpoint resumes on either. (Documents dealt to processes
and packed per process would not: the rows would depend on the process count.)

Packing needs no hand-written code. Each document ``d = [eod, t₁ … tₙ]``
becomes ``inputs = d`` and ``targets = [t₁ … tₙ, eod]`` — the token after a
document is always the next document's leading ``eod``. Grain's
concat-then-split packs both features the same way (same lengths, same split
points) into rows of ``seq_len``, so a row's ``inputs`` over successive steps
are its stream of tokens exactly, overlap by no token and lose no transition:
``targets[s][r, -1]`` is ``inputs[s + 1][r, 0]``.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import math
import os
import pathlib
import re
from typing import Iterator, Sequence

from array_record.python import array_record_module
import grain
import jax
import numpy as np
import tqdm

from recurrent_lm.data import _files
from recurrent_lm.data import corpus as _corpus
from recurrent_lm.data import tokenizer as _tokenizer

_FORMAT = 1
_ROWS_FORMAT = 2  # the layout of lm_dataset's batches and iterator states
_MANIFEST = "manifest.json"
# Text bytes per shard when num_shards is not given (a shard holds about as many token bytes).
_SHARD_TEXT_BYTES = 256 << 20
_ENCODE_CHUNK = 64  # documents per encode call (and per progress-bar update)
# Per-document reads ahead: one long document already feeds many rows.
# Each row's stream reads in the thread that asks: a process has many rows, and
# threads per row cost more than they save (measured: 511 batches/s of 32 × 512
# without, 180 with a batch-level prefetch thread; 424 for the former per-process
# packing with 4 read threads). The train step runs asynchronously meanwhile.
_ROW_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_TOKENIZER_SEED = 0
_TOKENIZER_MAX_SENTENCES = 2_000_000


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """What ``prepare_dataset`` made, ready for ``lm_dataset`` and evaluation.

  Attributes:
    tokenizer: the tokenizer of the shards.
    tokenizer_path: its ``.model`` file.
    shards: split → its ArrayRecord files, in corpus order.
    num_tokens: split → tokens in its shards, the leading ``eod`` of every document included.
    num_bytes: split → UTF-8 bytes of the split's text (for bits per byte).
    corpus_dir: the prepared corpus (``prepare_corpus``).
    num_documents: split → documents.
  """
  tokenizer: _tokenizer.Tokenizer
  tokenizer_path: str
  shards: dict[str, list[str]]
  num_tokens: dict[str, int]
  num_bytes: dict[str, int]
  corpus_dir: str
  num_documents: dict[str, int]


def prepare_dataset(data_dir: str | os.PathLike | None = None, corpus: str = "default",
                    vocab_size: int = 16384, *, num_shards: int | None = None) -> PreparedData:
  """Corpus → tokenizer → token shards, each stage built once and then reused.

  Args:
    data_dir: the cache root; see ``resolve_data_dir``.
    corpus: ``"default"`` or a directory of text; see ``prepare_corpus``.
    vocab_size: pieces of the BPE tokenizer (Languini uses 16384).
    num_shards: ArrayRecord files per split (at most one per document);
      None: one per 256 MiB of text, or whatever the cache holds. A cache
      made with another ``num_shards`` is rebuilt when one is given.

  Returns:
    The tokenizer (``<data_dir>/tokenizers/<corpus>-bpe<V>.model``), the shard
    paths and the token and byte counts per split. Each stage writes its
    outputs atomically and a manifest last, and is rebuilt when the stage
    before it changed (a corpus directory whose files changed, a retrained tokenizer).

  With several processes on one file system, call it on one process first
  and let the others follow after a barrier: they then only read the cache.
  Concurrent builds of the same stage would each take back the other's
  manifest while rebuilding.

  Token ids are below ``vocab_size`` by construction; ``lm_dataset`` and
  ``token_stream`` check them on read when given ``vocab_size``.
  """
  if not isinstance(vocab_size, int) or vocab_size < 1:
    raise ValueError(f"vocab_size={vocab_size!r}; expected a positive int")
  if num_shards is not None and (not isinstance(num_shards, int) or num_shards < 1):
    raise ValueError(f"num_shards={num_shards!r}; expected None or a positive int")
  data_dir = _corpus.resolve_data_dir(data_dir)
  corpus_dir = _corpus.prepare_corpus(corpus, data_dir)
  stem = f"{corpus_dir.name}-bpe{vocab_size}"
  corpus_hash = _corpus.corpus_fingerprint(corpus_dir)

  tokenizer_prefix = data_dir / "tokenizers" / stem
  tokenizer = _cached_tokenizer(tokenizer_prefix, corpus_dir, vocab_size, corpus_hash)
  model_hash = _files.sha256_file(pathlib.Path(tokenizer.model_path))

  tokens_dir = data_dir / "tokens" / stem
  key = {"format": _FORMAT, "corpus": corpus_hash, "tokenizer": model_hash}
  manifest = _files.read_json(tokens_dir / _MANIFEST)
  if not _tokens_complete(tokens_dir, manifest, key, num_shards):
    manifest = _write_tokens(tokens_dir, corpus_dir, tokenizer, key, num_shards)
  splits = manifest["splits"]
  return PreparedData(
      tokenizer=tokenizer,
      tokenizer_path=tokenizer.model_path,
      shards={s: [str(tokens_dir / f) for f in splits[s]["shards"]] for s in _corpus.SPLITS},
      num_tokens={s: splits[s]["tokens"] for s in _corpus.SPLITS},
      num_bytes={s: splits[s]["bytes"] for s in _corpus.SPLITS},
      corpus_dir=str(corpus_dir),
      num_documents={s: splits[s]["documents"] for s in _corpus.SPLITS},
  )


def lm_dataset(paths: Sequence[str | os.PathLike], *, seq_len: int, batch_size: int,
               seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
               shard_index: int | None = None, shard_count: int | None = None,
               vocab_size: int | None = None) -> grain.IterDataset:
  """Packed language-model batches from token shards, the same for any number of processes.

  Args:
    paths: ArrayRecord shards made by ``prepare_dataset`` (one split's).
    seq_len: tokens per row, ``L``.
    batch_size: rows per step over all processes, ``B``; this process gets
      ``b = B // shard_count`` of them.
    seed: the document order; every epoch is a different permutation.
    shuffle: False keeps the file order (every epoch the same).
    num_epochs: passes over the documents; None repeats forever.
    shard_index, shard_count: this process reads rows ``[shard_index·b,
      (shard_index + 1)·b)`` of every global batch; None: both from
      ``jax.process_index()`` / ``jax.process_count()``.
    vocab_size: if given, every document read is checked to hold ids in
      ``[0, vocab_size)`` (one ``min``/``max`` per document).

  Returns:
    A grain ``IterDataset`` whose elements are dicts of numpy arrays ``[b, L]``
    int32, row ``j`` from global row ``r = shard_index·b + j``:

    - ``inputs``: row ``r``'s packed stream of documents ``k ≡ r (mod B)`` of
      the shuffled order (see the module docstring);
    - ``targets``: the token after each input;
    - ``segment_ids``: 1, 2, … for the document pieces of a row, 0 on padding;
    - ``positions``: the position in the piece, 0 where a piece starts.

    A document split across rows goes on in the same row of the next batch
    as a new segment (position 0 again). With a finite ``num_epochs`` a row's
    stream ends with one row padded by grain's concat-then-split, and rows
    whose stream has ended are all padding until every stream has: padding is
    id 0 (``Tokenizer.pad_id``), segment 0, position 0 — mask the loss with
    ``segment_ids > 0``. Nothing is dropped. The iterator of ``iter(ds)``
    checkpoints exactly (``get_state`` / ``set_state``, or
    ``grain.checkpoint.CheckpointSave`` in orbax).
  """
  paths = _check_paths(paths)
  for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}; expected a positive int")
  if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
    raise ValueError(f"num_epochs={num_epochs!r}; expected None or a positive int")
  shard_index, shard_count = _process_shard(shard_index, shard_count)
  if batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by shard_count={shard_count}; "
                     "expected a multiple, so every process gets the same number of rows")
  per_process = batch_size // shard_count

  documents = _documents(paths, vocab_size)
  if shuffle:
    documents = documents.shuffle(seed=_shuffle_seed(seed))
  documents = documents.repeat(num_epochs).map(_inputs_and_targets)
  first = shard_index * per_process
  streams = [grain.experimental.ConcatThenSplitIterDataset(
      documents[r::batch_size].to_iter_dataset(_ROW_READ_OPTIONS),
      length_struct={"inputs": seq_len, "targets": seq_len}).map(_example)
             for r in range(first, first + per_process)]
  return _RowStreams(streams, seq_len=seq_len, first_row=first, batch_size=batch_size)


def token_stream(paths: Sequence[str | os.PathLike], *,
                 vocab_size: int | None = None) -> Iterator[np.ndarray]:
  """Every document's ids (``[1 + n]`` int32, its leading ``eod`` first), in file order."""
  documents = _documents(_check_paths(paths), vocab_size)
  for i in range(len(documents)):
    yield documents[i]


# ----------------------------------------------------------------------------
# Building the shards


def _cached_tokenizer(prefix: pathlib.Path, corpus_dir: pathlib.Path, vocab_size: int,
                      corpus_hash: str) -> _tokenizer.Tokenizer:
  model = prefix.with_name(prefix.name + ".model")
  stamp = prefix.with_name(prefix.name + ".json")
  key = {"format": _FORMAT, "corpus": corpus_hash, "vocab_size": vocab_size,
         "seed": _TOKENIZER_SEED, "max_sentences": _TOKENIZER_MAX_SENTENCES}
  recorded = _files.read_json(stamp)
  if (isinstance(recorded, dict) and model.is_file()
      and recorded == {**key, "model_sha256": _files.sha256_file(model)}):
    return _tokenizer.Tokenizer(model)
  stamp.unlink(missing_ok=True)
  tokenizer = _tokenizer.train_tokenizer(corpus_dir, vocab_size, prefix, seed=_TOKENIZER_SEED,
                                         max_sentences=_TOKENIZER_MAX_SENTENCES)
  _files.write_json(stamp, {**key, "model_sha256": _files.sha256_file(model)})
  return tokenizer


def _shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


_SHARD_NAME = re.compile(r"(train|validation|test)-\d{5}-of-\d{5}\.array_record")


def _tokens_complete(tokens_dir: pathlib.Path, manifest, key: dict,
                     num_shards: int | None) -> bool:
  if not isinstance(manifest, dict) or manifest.get("key") != key:
    return False
  if num_shards is not None and manifest.get("num_shards") != num_shards:
    return False
  try:
    return all((tokens_dir / name).stat().st_size == size
               for s in _corpus.SPLITS
               for name, size in zip(manifest["splits"][s]["shards"],
                                     manifest["splits"][s]["shard_bytes"]))
  except (OSError, KeyError, TypeError):
    return False


def _write_tokens(tokens_dir: pathlib.Path, corpus_dir: pathlib.Path,
                  tokenizer: _tokenizer.Tokenizer, key: dict, num_shards: int | None) -> dict:
  tokens_dir.mkdir(parents=True, exist_ok=True)
  (tokens_dir / _MANIFEST).unlink(missing_ok=True)
  corpus_splits = _corpus.load_manifest(corpus_dir)["splits"]
  splits = {}
  for split in _corpus.SPLITS:
    n_docs, n_bytes = corpus_splits[split]["documents"], corpus_splits[split]["bytes"]
    count = num_shards or math.ceil(n_bytes / _SHARD_TEXT_BYTES)
    count = max(1, min(count, n_docs))
    names = [_shard_name(split, i, count) for i in range(count)]
    tokens = _write_split(tokens_dir, names, corpus_dir, split, n_docs, n_bytes, tokenizer)
    splits[split] = {"shards": names, "documents": n_docs, "tokens": tokens, "bytes": n_bytes,
                     "shard_bytes": [(tokens_dir / n).stat().st_size for n in names]}
  manifest = {"key": key, "num_shards": num_shards, "vocab_size": tokenizer.vocab_size,
              "eod_id": tokenizer.eod_id, "splits": splits}
  _files.write_json(tokens_dir / _MANIFEST, manifest)
  # Shards of an earlier build with another shard count are ours and now unlisted.
  current = {n for s in splits.values() for n in s["shards"]}
  for path in tokens_dir.iterdir():
    if _SHARD_NAME.fullmatch(path.name) and path.name not in current:
      path.unlink()
  return manifest


def _write_split(tokens_dir: pathlib.Path, names: list[str], corpus_dir: pathlib.Path,
                 split: str, n_docs: int, n_bytes: int,
                 tokenizer: _tokenizer.Tokenizer) -> int:
  """Writes the split's documents, in order, in contiguous runs over the shards."""
  texts = _corpus.read_documents(corpus_dir, split)
  tokens, doc = 0, 0
  eod = np.array([tokenizer.eod_id], "<i4")
  with tqdm.tqdm(total=n_bytes, unit="B", unit_scale=True, desc=f"tokenizing {split}",
                 leave=False) as bar:
    for shard, name in enumerate(names):
      end = (shard + 1) * n_docs // len(names)  # documents [doc, end) go to this shard
      final = tokens_dir / name
      tmp = _files.temp_path(final)
      writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
      try:
        while doc < end:
          chunk = [next(texts) for _ in range(min(_ENCODE_CHUNK, end - doc))]
          for ids in tokenizer.encode_batch(chunk):
            record = np.concatenate([eod, np.asarray(ids, "<i4")])
            writer.write(record.tobytes())
            tokens += record.size
          doc += len(chunk)
          bar.update(sum(len(t.encode("utf-8")) for t in chunk))
        writer.close()
        os.replace(tmp, final)
      finally:
        if writer.is_open():
          writer.close()
        tmp.unlink(missing_ok=True)
  return tokens


# ----------------------------------------------------------------------------
# Reading


def _check_paths(paths) -> list[str]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [str(p) for p in paths]
  if not paths:
    raise ValueError("paths=[]: no shard paths; expected one or more .array_record files")
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"shard {path} does not exist; expected an .array_record file "
                       "made by prepare_dataset")
  return paths


def _process_shard(shard_index, shard_count) -> tuple[int, int]:
  if (shard_index is None) != (shard_count is None):
    raise ValueError(f"shard_index={shard_index!r}, shard_count={shard_count!r}; "
                     "expected both or neither")
  if shard_index is None:
    return jax.process_index(), jax.process_count()
  if not isinstance(shard_count, int) or shard_count < 1:
    raise ValueError(f"shard_count={shard_count!r}; expected a positive int")
  if not isinstance(shard_index, int) or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index!r}; expected an int in [0, {shard_count})")
  return shard_index, shard_count


def _shuffle_seed(seed: int) -> int:
  # Grain shuffles epoch e with seed + e, so seeds s and s + 1 would give the
  # same permutations one epoch apart; hashing the seed spreads them out.
  digest = hashlib.sha256(f"recurrent_lm.data.lm_dataset:{int(seed)}".encode()).digest()
  return int.from_bytes(digest[:4], "big")


@dataclasses.dataclass(frozen=True)
class _Records:
  """Where global record ``i`` of a list of shards lives, for error messages."""
  paths: tuple[str, ...]
  starts: tuple[int, ...]  # global index of each shard's first record

  def locate(self, index: int) -> str:
    shard = bisect.bisect_right(self.starts, index) - 1
    return f"record {index - self.starts[shard]} of {self.paths[shard]}"


def _documents(paths: list[str], vocab_size: int | None) -> grain.MapDataset:
  """The documents of the shards, in order, as ``[1 + n]`` int32 arrays."""
  starts, total = [], 0
  for path in paths:
    reader = array_record_module.ArrayRecordReader(path)
    starts.append(total)
    total += reader.num_records()
    reader.close()
  records = _Records(tuple(paths), tuple(starts))
  source = grain.sources.ArrayRecordDataSource(paths)
  return grain.MapDataset.source(source).map_with_index(
      functools.partial(_decode, records=records, vocab_size=vocab_size))


def _decode(index: int, record: bytes, *, records: _Records,
            vocab_size: int | None) -> np.ndarray:
  if len(record) % 4 or not record:
    raise ValueError(f"{records.locate(index)} has {len(record)} bytes; expected a "
                     "non-empty multiple of 4 (int32 token ids)")
  ids = np.frombuffer(record, "<i4").astype(np.int32)
  if vocab_size is not None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
      bad = hi if hi >= vocab_size else lo
      raise ValueError(f"{records.locate(index)} holds token id {bad}; expected ids in "
                       f"[0, {vocab_size}) for vocab_size={vocab_size}")
  return ids


def _inputs_and_targets(ids: np.ndarray) -> dict[str, np.ndarray]:
  # The token after a document is the next document's leading eod.
  return {"inputs": ids, "targets": np.append(ids[1:], ids[0])}


def _example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"inputs": row["inputs"], "targets": row["targets"],
          "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]}


_KEYS = ("inputs", "targets", "segment_ids", "positions")


class _RowStreams(grain.IterDataset):
  """Batches whose row ``j`` is the next element of ``streams[j]``, global row ``first_row + j``.

  Grain's ``ZipIterDataset`` stops at the shortest stream; here a stream that
  has ended gives all-padding rows until every stream has, so a finite
  dataset loses nothing and row ``j`` stays stream ``j``.
  """

  def __init__(self, streams: Sequence[grain.IterDataset], *, seq_len: int, first_row: int,
               batch_size: int):
    super().__init__(list(streams))
    self._seq_len, self._first_row, self._batch_size = seq_len, first_row, batch_size

  def __iter__(self) -> grain.DatasetIterator:
    return _RowStreamsIterator([s.__iter__() for s in self._parents], seq_len=self._seq_len,
                               first_row=self._first_row, batch_size=self._batch_size)

  def __str__(self) -> str:
    return (f"_RowStreams(rows [{self._first_row}, {self._first_row + len(self._parents)}) "
            f"of {self._batch_size}, seq_len={self._seq_len})")


class _RowStreamsIterator(grain.DatasetIterator):
  """Its state: ``{"format", "batch_size", "first_row", "ended": [n], "rows": [n]}``.

  ``set_state`` takes any state of the same ``batch_size`` whose rows cover
  this iterator's: its own, or the rows of every process merged by
  ``merge_data_states`` — so a run resumes on another number of processes.
  """

  def __init__(self, streams: list[grain.DatasetIterator], *, seq_len: int, first_row: int,
               batch_size: int):
    super().__init__(streams)
    self._first_row, self._batch_size = first_row, batch_size
    self._ended = [False] * len(streams)
    self._padding = {key: np.zeros(seq_len, np.int32) for key in _KEYS}

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    for j, stream in enumerate(self._parents):
      row = None
      if not self._ended[j]:
        try:
          row = next(stream)
        except StopIteration:
          self._ended[j] = True
      rows.append(self._padding if row is None else row)
    if all(self._ended):
      raise StopIteration
    return {key: np.stack([row[key] for row in rows]) for key in _KEYS}

  def get_state(self) -> dict:
    return {"format": _ROWS_FORMAT, "batch_size": self._batch_size, "first_row": self._first_row,
            "ended": list(self._ended), "rows": [stream.get_state() for stream in self._parents]}

  def set_state(self, state: dict) -> None:
    _check_data_state(state)
    if state["batch_size"] != self._batch_size:
      raise ValueError(f"the data iterator state is of batch_size={state['batch_size']}; "
                       f"expected batch_size={self._batch_size}")
    start = self._first_row - state["first_row"]
    stop = start + len(self._parents)
    if start < 0 or stop > len(state["rows"]):
      held = (state["first_row"], state["first_row"] + len(state["rows"]))
      raise ValueError(f"the data iterator state holds rows [{held[0]}, {held[1]}); expected "
                       f"rows [{self._first_row}, {self._first_row + len(self._parents)}) of "
                       "the global batch")
    self._ended = [bool(e) for e in state["ended"][start:stop]]
    for stream, row_state in zip(self._parents, state["rows"][start:stop]):
      stream.set_state(row_state)


def _check_data_state(state) -> None:
  version = state.get("format") if isinstance(state, dict) else None
  if version != _ROWS_FORMAT:
    raise DataStateError(
        f"the data position (format={version!r}) was written by another layout of "
        f"lm_dataset; expected format={_ROWS_FORMAT} (one packed stream per global row). "
        "Resume the run with the release that wrote it, or start a new workdir")


class DataStateError(ValueError):
  """A stored data position that this release's ``lm_dataset`` cannot continue."""


def merge_data_states(states: Sequence[dict]) -> dict:
  """The states of the processes' ``lm_dataset`` iterators → one state of the global batch.

  Args:
    states: one ``get_state()`` per process, in any order; their rows must
      tile ``[0, batch_size)`` (processes reading the same rows count once).

  Returns:
    A state of every row, which ``set_state`` of an iterator over any share
    of the same ``batch_size`` takes (its rows are sliced out).
  """
  if not states:
    raise ValueError("states=[]: no data iterator states; expected one per process")
  for state in states:
    _check_data_state(state)
  # Processes that read the same rows (the sequence split over them) hold the same state.
  states = sorted({state["first_row"]: state for state in states}.values(),
                  key=lambda state: state["first_row"])
  batch_size, row = states[0]["batch_size"], 0
  for state in states:
    if state["batch_size"] != batch_size or state["first_row"] != row:
      break
    row += len(state["rows"])
  if row != batch_size:
    held = [(s["first_row"], s["first_row"] + len(s["rows"]), s["batch_size"]) for s in states]
    raise ValueError(f"the data iterator states hold rows {held} as (first, end, batch_size); "
                     f"expected them to tile [0, {batch_size})")
  return {"format": _ROWS_FORMAT, "batch_size": batch_size, "first_row": 0,
          "ended": [e for state in states for e in state["ended"]],
          "rows": [r for state in states for r in state["rows"]]}
