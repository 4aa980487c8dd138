"""File helpers shared by the data stages: atomic writes, hashes, progress lines.

Every output of the data stages is written to a hidden temporary file beside
its final path and renamed into place once complete, so an interrupted run
never leaves a file that looks finished. Each stage writes its manifest last;
a directory without a valid manifest is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import sys
import uuid
from typing import IO, Any, Iterator

# Our temporary files carry this marker, so no other file is ever mistaken for one.
TEMP_MARKER = ".tmp-rlm-"


def temp_path(final: pathlib.Path) -> pathlib.Path:
  """A fresh hidden path beside ``final``, unique to this call."""
  return final.with_name(f".{final.name}{TEMP_MARKER}{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_write(final: pathlib.Path, mode: str = "w") -> Iterator[IO[Any]]:
  """Opens a temporary file that replaces ``final`` only if the block succeeds."""
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_path(final)
  kwargs = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
  try:
    with open(tmp, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, final)
  finally:
    tmp.unlink(missing_ok=True)


def write_json(final: pathlib.Path, value: Any) -> None:
  with atomic_write(final) as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def read_json(path: pathlib.Path) -> Any | None:
  """The JSON value in ``path``, or None if it is missing or unreadable."""
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None


def sha256_file(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def sha256_text(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def log(message: str) -> None:
  """One progress line on stderr (the data stages are slow enough to say so)."""
  print(f"recurrent_lm.data: {message}", file=sys.stderr, flush=True)
