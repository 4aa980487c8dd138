"""CSV tables the experiment scripts write and read back (resumable sweeps)."""

import csv
import os
import tempfile
from typing import Iterable, Mapping, Sequence


def read_csv(path: str) -> list[dict[str, str]]:
  """The rows of ``path`` as strings; ``[]`` when it does not exist."""
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def write_csv(path: str, rows: Iterable[Mapping], fields: Sequence[str]) -> None:
  """Writes ``rows`` (the ``fields`` of each, blank where missing) to ``path``
  atomically: a crash leaves the previous file whole."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp",
                                   newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows({k: row.get(k, "") for k in fields} for row in rows)
  os.replace(f.name, path)
