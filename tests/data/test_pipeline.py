"""Token shards and the grain pipeline: packing, shuffling, rows per process, checkpoints."""

from __future__ import annotations

import itertools
import os
import pathlib

from array_record.python import array_record_module
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from recurrent_lm import data
from recurrent_lm.data import corpus as corpus_lib
from tests.data._texts import write_corpus

VOCAB = 500
KEYS = ("inputs", "positions", "segment_ids", "targets")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("texts")
  write_corpus(root, num_txt=40)
  return root


@pytest.fixture(scope="module")
def prepared(cache, source) -> data.PreparedData:
  return data.prepare_dataset(cache, str(source), VOCAB, num_shards=2)


def _documents(prepared, split="train") -> list[np.ndarray]:
  return list(data.token_stream(prepared.shards[split]))


def _batches(ds, limit=None) -> list[dict[str, np.ndarray]]:
  return list(itertools.islice(ds, limit))


def _rows(batches, key) -> np.ndarray:
  return np.concatenate([b[key] for b in batches])


def _split_at_eod(stream: np.ndarray, eod: int) -> list[tuple[int, ...]]:
  starts = np.flatnonzero(stream == eod)
  return [tuple(p) for p in np.split(stream, starts[1:])]


# ----------------------------------------------------------------------------
# prepare_dataset


def test_shards_hold_every_document_after_an_eod(prepared):
  tok = prepared.tokenizer
  for split in data.SPLITS:
    docs = _documents(prepared, split)
    texts = list(data.read_documents(prepared.corpus_dir, split))
    assert len(docs) == len(texts) == prepared.num_documents[split]
    for doc, text in zip(docs, texts):
      assert doc.dtype == np.int32 and doc[0] == tok.eod_id
      assert doc[1:].tolist() == tok.encode(text)
    assert sum(d.size for d in docs) == prepared.num_tokens[split]
    assert prepared.num_bytes[split] == sum(len(t.encode()) for t in texts)
    assert sum(tok.byte_lengths[d].sum() for d in docs) == prepared.num_bytes[split]


def test_layout_of_the_cache(prepared, cache, source):
  corpus_name = pathlib.Path(prepared.corpus_dir).name
  stem = f"{corpus_name}-bpe{VOCAB}"
  assert prepared.tokenizer_path == str(cache / "tokenizers" / f"{stem}.model")
  assert prepared.shards["train"] == [
      str(cache / "tokens" / stem / f"train-0000{i}-of-00002.array_record") for i in range(2)]
  assert prepared.tokenizer.vocab_size == VOCAB


def test_a_cached_dataset_is_not_rebuilt(prepared, cache, source):
  files = [pathlib.Path(prepared.tokenizer_path)] + [
      pathlib.Path(p) for s in data.SPLITS for p in prepared.shards[s]]
  before = [f.stat().st_mtime_ns for f in files]
  again = data.prepare_dataset(cache, str(source), VOCAB)
  assert [f.stat().st_mtime_ns for f in files] == before
  assert again.shards == prepared.shards and again.num_tokens == prepared.num_tokens


def test_an_interrupted_token_build_is_rebuilt(tmp_path, source):
  first = data.prepare_dataset(tmp_path, str(source), VOCAB)
  shard = pathlib.Path(first.shards["test"][0])
  complete = shard.read_bytes()
  (shard.parent / "manifest.json").unlink()
  shard.write_bytes(complete[: len(complete) // 2])
  model_mtime = pathlib.Path(first.tokenizer_path).stat().st_mtime_ns
  again = data.prepare_dataset(tmp_path, str(source), VOCAB)
  assert shard.read_bytes() == complete
  assert again.num_tokens == first.num_tokens
  assert pathlib.Path(again.tokenizer_path).stat().st_mtime_ns == model_mtime
  assert not [p for p in shard.parent.iterdir() if p.name.startswith(".")]


def test_a_tokenizer_without_its_stamp_is_retrained_to_the_same_model(tmp_path, source):
  first = data.prepare_dataset(tmp_path, str(source), VOCAB)
  model = pathlib.Path(first.tokenizer_path)
  complete = model.read_bytes()
  model.with_suffix(".json").unlink()  # killed between the model and its stamp
  os.utime(model, ns=(1, 1))
  shard = pathlib.Path(first.shards["train"][0])
  shard_mtime = shard.stat().st_mtime_ns
  again = data.prepare_dataset(tmp_path, str(source), VOCAB)
  assert model.stat().st_mtime_ns != 1 and model.read_bytes() == complete
  assert model.with_suffix(".json").is_file()
  # The same model: the shards stand.
  assert shard.stat().st_mtime_ns == shard_mtime and again.shards == first.shards


def test_another_shard_count_rebuilds_and_drops_the_old_shards(tmp_path, source):
  two = data.prepare_dataset(tmp_path, str(source), VOCAB, num_shards=2)
  docs = [d.tolist() for d in data.token_stream(two.shards["train"])]
  one = data.prepare_dataset(tmp_path, str(source), VOCAB, num_shards=1)
  assert [len(one.shards[s]) for s in data.SPLITS] == [1, 1, 1]
  assert [d.tolist() for d in data.token_stream(one.shards["train"])] == docs
  assert one.num_tokens == two.num_tokens
  tokens_dir = pathlib.Path(one.shards["train"][0]).parent
  assert sorted(p.name for p in tokens_dir.iterdir()) == sorted(
      ["manifest.json"] + [pathlib.Path(p).name for s in data.SPLITS for p in one.shards[s]])


def test_a_changed_corpus_retrains_and_retokenizes(tmp_path):
  source = tmp_path / "texts"
  source.mkdir()
  write_corpus(source, num_txt=20, seed=1)
  first = data.prepare_dataset(tmp_path / "cache", str(source), 400)
  for path in source.rglob("*.txt"):
    path.write_text(path.read_text(encoding="utf-8") + " zorqa", encoding="utf-8")
    os.utime(path, ns=(1, 1))
  again = data.prepare_dataset(tmp_path / "cache", str(source), 400)
  assert again.num_bytes != first.num_bytes
  docs = list(corpus_lib.iter_documents(again.corpus_dir, "train"))
  assert all(t.endswith(" zorqa") for i, t in docs if i.endswith(".txt"))
  texts = [t for _, t in docs]
  assert [again.tokenizer.decode(d) for d in _documents(again)] == texts


# ----------------------------------------------------------------------------
# Packing


def _row_streams(batches, key) -> np.ndarray:
  """``[B, steps · L]``: each global row's stream over the batches."""
  return np.concatenate([b[key] for b in batches], axis=1)


def test_each_row_packs_its_own_documents_exactly(prepared):
  docs = _documents(prepared)
  rows = 3
  batches = _batches(data.lm_dataset(prepared.shards["train"], seq_len=37, batch_size=rows,
                                     shuffle=False, num_epochs=1, shard_index=0, shard_count=1))
  inputs, targets, segments = (_row_streams(batches, k)
                               for k in ("inputs", "targets", "segment_ids"))
  for r in range(rows):
    stream = np.concatenate(docs[r::rows])   # row r: documents k ≡ r (mod B)
    real = segments[r] > 0
    np.testing.assert_array_equal(inputs[r][real], stream)
    # targets: the next token; after the row's last document comes an eod.
    np.testing.assert_array_equal(targets[r][real],
                                  np.append(stream[1:], prepared.tokenizer.eod_id))
    # Padding is one tail: everything after the row's last real token.
    assert not real[real.sum():].any()
    assert (inputs[r][~real] == 0).all() and (targets[r][~real] == 0).all()


def test_targets_are_inputs_shifted_by_one_along_each_row(prepared):
  batches = _batches(data.lm_dataset(prepared.shards["train"], seq_len=16, batch_size=4,
                                     shard_index=0, shard_count=1), 30)
  inputs = np.stack([b["inputs"] for b in batches])     # [steps, B, L]
  targets = np.stack([b["targets"] for b in batches])
  np.testing.assert_array_equal(targets[:, :, :-1], inputs[:, :, 1:])
  # The last target of a row is the first input of the same row one step later.
  np.testing.assert_array_equal(targets[:-1, :, -1], inputs[1:, :, 0])


def test_every_batch_has_the_same_shape_and_dtype(prepared):
  ds = data.lm_dataset(prepared.shards["validation"], seq_len=24, batch_size=5,
                       num_epochs=1, shard_index=0, shard_count=1)
  for batch in ds:
    assert sorted(batch) == list(KEYS)
    for key in KEYS:
      assert batch[key].shape == (5, 24) and batch[key].dtype == np.int32


def test_segment_ids_and_positions_follow_the_document_starts(prepared):
  eod = prepared.tokenizer.eod_id
  batches = _batches(data.lm_dataset(prepared.shards["train"], seq_len=29, batch_size=2,
                                     num_epochs=1, shard_index=0, shard_count=1))
  inputs, segments, positions = (_rows(batches, k) for k in ("inputs", "segment_ids",
                                                             "positions"))
  for row_inputs, row_segments, row_positions in zip(inputs, segments, positions):
    real = row_segments > 0
    starts = (row_inputs == eod) & real
    starts[0] = real[0]  # a row starts a segment, the piece of a document or a new one
    expected_segments = np.where(real, np.cumsum(starts), 0)
    np.testing.assert_array_equal(row_segments, expected_segments)
    expected_positions = np.zeros_like(row_positions)
    for t in range(1, row_positions.size):
      expected_positions[t] = 0 if starts[t] or not real[t] else expected_positions[t - 1] + 1
    np.testing.assert_array_equal(row_positions, expected_positions)


def test_a_document_longer_than_a_row_continues_in_the_next_row(prepared):
  longest = max(_documents(prepared), key=len)
  seq_len = len(longest) // 3
  (path,) = _single_document_shard(prepared, longest)
  rows = _rows(_batches(data.lm_dataset([path], seq_len=seq_len, batch_size=1, num_epochs=1,
                                        shard_index=0, shard_count=1)), "inputs")
  np.testing.assert_array_equal(rows.reshape(-1)[: len(longest)], longest)
  assert rows.shape[0] == -(-len(longest) // seq_len)


def _single_document_shard(prepared, tokens) -> list[str]:
  path = pathlib.Path(prepared.shards["train"][0]).parent.parent / "one-doc.array_record"
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  writer.write(np.asarray(tokens, "<i4").tobytes())
  writer.close()
  return [str(path)]


# ----------------------------------------------------------------------------
# Shuffling and process shards


def _document_order(prepared, ds) -> list[tuple[int, ...]]:
  """The documents in the order they were dealt: the k-th went to row k mod B."""
  batches = _batches(ds)
  inputs, segments = _row_streams(batches, "inputs"), _row_streams(batches, "segment_ids")
  per_row = [_split_at_eod(row[seg > 0], prepared.tokenizer.eod_id)
             for row, seg in zip(inputs, segments)]
  total = sum(map(len, per_row))
  return [per_row[k % len(per_row)][k // len(per_row)] for k in range(total)]


def _epoch(prepared, **kwargs):
  kwargs = {"seq_len": 64, "batch_size": 2, "num_epochs": 1, "shard_index": 0,
            "shard_count": 1, **kwargs}
  return data.lm_dataset(prepared.shards["train"], **kwargs)


def test_shuffling_is_deterministic_for_a_seed_and_differs_between_seeds(prepared):
  docs = sorted(tuple(d) for d in _documents(prepared))
  first = _document_order(prepared, _epoch(prepared, seed=3))
  assert sorted(first) == docs
  assert _document_order(prepared, _epoch(prepared, seed=3)) == first
  assert _document_order(prepared, _epoch(prepared, seed=4)) != first
  assert _document_order(prepared, _epoch(prepared, shuffle=False)) == [
      tuple(d) for d in _documents(prepared)]


def test_each_epoch_is_a_new_permutation(prepared):
  n = len(_documents(prepared))
  order = _document_order(prepared, _epoch(prepared, seed=0, num_epochs=3))
  epochs = [order[i * n:(i + 1) * n] for i in range(3)]
  assert len(order) == 3 * n
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


@pytest.mark.parametrize("num_epochs", [None, 1])
def test_the_global_batch_is_the_same_for_any_process_count(prepared, num_epochs):
  kwargs = dict(seq_len=24, batch_size=8, seed=3, num_epochs=num_epochs)
  one = _batches(data.lm_dataset(prepared.shards["train"], shard_index=0, shard_count=1,
                                 **kwargs), 40)
  for count in (2, 4, 8):
    shares = [_batches(data.lm_dataset(prepared.shards["train"], shard_index=i,
                                       shard_count=count, **kwargs), 40) for i in range(count)]
    assert all(len(share) == len(one) for share in shares)
    for step, batch in enumerate(one):
      for key in KEYS:
        joined = np.concatenate([share[step][key] for share in shares])
        np.testing.assert_array_equal(joined, batch[key], err_msg=f"{count} processes, {key}")


def test_each_process_gets_its_share_of_the_batch(prepared):
  ds = data.lm_dataset(prepared.shards["train"], seq_len=8, batch_size=6, shard_index=1,
                       shard_count=3)
  assert next(iter(ds))["inputs"].shape == (2, 8)


def test_by_default_the_process_is_the_jax_process(prepared):
  ds = data.lm_dataset(prepared.shards["train"], seq_len=8, batch_size=2, seed=5)
  explicit = data.lm_dataset(prepared.shards["train"], seq_len=8, batch_size=2, seed=5,
                             shard_index=0, shard_count=1)
  for a, b in zip(_batches(ds, 5), _batches(explicit, 5)):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


# ----------------------------------------------------------------------------
# Checkpoints


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in KEYS:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("skip", [0, 1, 7, 23])
def test_get_state_set_state_resumes_with_the_next_batch(prepared, skip):
  ds = data.lm_dataset(prepared.shards["train"], seq_len=50, batch_size=3, seed=1,
                       num_epochs=2, shard_index=0, shard_count=1)
  it = iter(ds)
  _batches(it, skip)
  state = it.get_state()
  expected = _batches(it, 15)
  fresh = iter(ds)
  fresh.set_state(state)
  _assert_same_batches(_batches(fresh, 15), expected)


def test_set_state_rewinds_an_iterator_that_went_further(prepared):
  ds = data.lm_dataset(prepared.shards["train"], seq_len=50, batch_size=3, seed=1,
                       shard_index=0, shard_count=1)
  it = iter(ds)
  _batches(it, 4)
  state = it.get_state()
  expected = _batches(it, 6)
  _batches(it, 10)
  it.set_state(state)
  _assert_same_batches(_batches(it, 6), expected)


def test_orbax_checkpoint_manager_round_trip(prepared, tmp_path):
  ds = data.lm_dataset(prepared.shards["train"], seq_len=40, batch_size=2, seed=2,
                       shard_index=0, shard_count=1)
  it = iter(ds)
  _batches(it, 5)
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(5, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = _batches(it, 8)

  restored = iter(ds)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    assert manager.latest_step() == 5
    out = manager.restore(5, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params),
        data=grain.checkpoint.CheckpointRestore(restored)))
  np.testing.assert_array_equal(out["params"]["w"], params["w"])
  _assert_same_batches(_batches(restored, 8), expected)


def test_a_position_saved_by_some_processes_resumes_on_any_other_count(prepared):
  kwargs = dict(seq_len=20, batch_size=4, seed=7)
  shares = [iter(data.lm_dataset(prepared.shards["train"], shard_index=i, shard_count=2,
                                 **kwargs)) for i in range(2)]
  for share in shares:
    _batches(share, 9)
  merged = data.merge_data_states([share.get_state() for share in reversed(shares)])
  expected = [np.concatenate(parts) for parts in zip(
      *[[b["inputs"] for b in _batches(share, 6)] for share in shares])]
  for count in (1, 4):
    resumed = [iter(data.lm_dataset(prepared.shards["train"], shard_index=i,
                                    shard_count=count, **kwargs)) for i in range(count)]
    for it in resumed:
      it.set_state(merged)
    got = [np.concatenate(parts) for parts in zip(
        *[[b["inputs"] for b in _batches(it, 6)] for it in resumed])]
    for g, e in zip(got, expected, strict=True):
      np.testing.assert_array_equal(g, e)


def test_states_that_do_not_tile_the_batch_or_are_of_another_layout_are_refused(prepared):
  kwargs = dict(seq_len=20, batch_size=4)
  first = iter(data.lm_dataset(prepared.shards["train"], shard_index=0, shard_count=2, **kwargs))
  with pytest.raises(ValueError, match=r"expected them to tile \[0, 4\)"):
    data.merge_data_states([first.get_state()])
  whole = iter(data.lm_dataset(prepared.shards["train"], shard_index=0, shard_count=1, **kwargs))
  with pytest.raises(ValueError, match=r"holds rows \[0, 2\); expected rows \[0, 4\)"):
    whole.set_state(first.get_state())
  other = iter(data.lm_dataset(prepared.shards["train"], seq_len=20, batch_size=2,
                               shard_index=0, shard_count=1))
  with pytest.raises(ValueError, match="batch_size=4; expected batch_size=2"):
    other.set_state(whole.get_state())
  # A position of the former layout (documents dealt to processes) has no format.
  with pytest.raises(data.DataStateError, match="format=None.*expected format=2"):
    whole.set_state({"parent": {"next_index": 3}})


# ----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kwargs, named", [
    ({"seq_len": 0}, "seq_len=0"),
    ({"seq_len": -3}, "seq_len=-3"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"batch_size": 5, "shard_index": 0, "shard_count": 2}, "batch_size=5"),
    ({"shard_index": 2, "shard_count": 2}, "shard_index=2"),
    ({"shard_index": 0}, "shard_count=None"),
    ({"num_epochs": 0}, "num_epochs=0"),
])
def test_bad_arguments_are_named(prepared, kwargs, named):
  kwargs = {"seq_len": 8, "batch_size": 4, "shard_index": 0, "shard_count": 1, **kwargs}
  if named == "shard_count=None":
    kwargs.pop("shard_count")  # only one of the two given
  with pytest.raises(ValueError, match=named):
    data.lm_dataset(prepared.shards["train"], **kwargs)


def test_no_shard_paths_is_an_error():
  with pytest.raises(ValueError, match="no shard paths"):
    data.lm_dataset([], seq_len=8, batch_size=2, shard_index=0, shard_count=1)


def test_a_missing_shard_is_named(tmp_path):
  missing = tmp_path / "gone.array_record"
  with pytest.raises(ValueError, match="gone.array_record"):
    data.lm_dataset([missing], seq_len=8, batch_size=2, shard_index=0, shard_count=1)


def test_more_rows_than_documents_repeat_them_or_pad(prepared):
  doc = [prepared.tokenizer.eod_id, 5, 6]
  (path,) = _single_document_shard(prepared, doc)
  # Forever: every row's stream is the one document over and over.
  batch = next(iter(data.lm_dataset([path], seq_len=6, batch_size=4, shard_index=1,
                                    shard_count=2)))
  np.testing.assert_array_equal(batch["inputs"], np.tile(doc * 2, (2, 1)))
  # One epoch: row 0 gets the document, row 1 nothing (all padding), then the end.
  (batch,) = _batches(data.lm_dataset([path], seq_len=6, batch_size=2, num_epochs=1,
                                      shard_index=0, shard_count=1))
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 0, 0, 0], [0] * 6])


def test_token_ids_outside_the_vocabulary_are_caught_on_read(prepared):
  (path,) = _single_document_shard(prepared, [prepared.tokenizer.eod_id, 5, VOCAB + 7, 6])
  ds = data.lm_dataset([path], seq_len=8, batch_size=1, shard_index=0, shard_count=1,
                       vocab_size=VOCAB)
  with pytest.raises(ValueError, match=f"token id {VOCAB + 7}.*vocab_size={VOCAB}"):
    next(iter(ds))
  with pytest.raises(ValueError, match=f"record 0 of {path}"):
    list(data.token_stream([path], vocab_size=VOCAB))
  # Without a vocabulary size nothing is checked.
  assert list(data.token_stream([path]))[0].tolist() == [prepared.tokenizer.eod_id, 5,
                                                         VOCAB + 7, 6]
