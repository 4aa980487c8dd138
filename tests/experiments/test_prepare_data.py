"""`python -m experiments.prepare_data` on a small corpus: it builds, and prints the table.

Run as a subprocess from the repository root, as a user would — which also keeps
its absl flags out of this process, where other experiment modules define theirs.
"""

import pathlib
import subprocess
import sys

from recurrent_lm import data
from tests.data._texts import write_corpus

_REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(*args):
  return subprocess.run([sys.executable, "-m", "experiments.prepare_data", *args],
                        cwd=_REPO, capture_output=True, text=True, timeout=300, check=False)


def test_prepare_data_builds_the_dataset_and_prints_a_row_per_split(tmp_path):
  source = tmp_path / "texts"
  source.mkdir()
  write_corpus(source)
  result = _run(f"--data_dir={tmp_path / 'cache'}", f"--corpus={source}", "--vocab_size=400")
  assert result.returncode == 0, result.stderr

  prepared = data.prepare_dataset(tmp_path / "cache", str(source), 400)  # now from the cache
  lines = result.stdout.splitlines()
  assert f"tokenizer  {prepared.tokenizer_path} (vocab 400, eod 2, pad 0)" in lines
  header = lines.index(next(l for l in lines if l.startswith("split")))
  assert header == len(lines) - 4
  for line, split in zip(lines[header + 1:], data.SPLITS):
    name, documents, tokens, n_bytes, per_token = line.split()
    assert name == split
    assert int(documents.replace(",", "")) == prepared.num_documents[split]
    assert int(tokens.replace(",", "")) == prepared.num_tokens[split]
    assert int(n_bytes.replace(",", "")) == prepared.num_bytes[split]
    assert float(per_token) == round(prepared.num_bytes[split] / prepared.num_tokens[split], 3)


def test_prepare_data_reports_bad_input_in_one_line(tmp_path):
  result = _run(f"--data_dir={tmp_path / 'cache'}", f"--corpus={tmp_path / 'nowhere'}")
  assert result.returncode == 1
  assert result.stderr.startswith(
      f"prepare_data: corpus source '{tmp_path / 'nowhere'}' is not an existing directory")
  assert len(result.stderr.strip().splitlines()) == 1
