r"""Builds (or finds in the cache) a corpus, its tokenizer and its token shards.

    python -m experiments.prepare_data                          # the default corpus, 16k BPE
    python -m experiments.prepare_data --corpus ~/texts --vocab_size 8192

The cache root is ``--data_dir``, else ``$RECURRENT_LM_DATA``, else
``~/.cache/recurrent_lm``. Prints one row per split: documents, tokens (each
document's leading end-of-document id included), UTF-8 bytes of the text, and
bytes per token.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app
from absl import flags

from recurrent_lm import data

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Cache root; default $RECURRENT_LM_DATA or ~/.cache/recurrent_lm.")
_CORPUS = flags.DEFINE_string(
    "corpus", "default", "'default' or a directory of .txt / .jsonl documents.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 16384, "Pieces of the BPE tokenizer.")


def format_table(prepared: data.PreparedData) -> str:
  """One row per split: documents, tokens, bytes, bytes per token."""
  lines = [f"{'split':<12}{'documents':>11}{'tokens':>14}{'bytes':>15}{'bytes/token':>13}"]
  for split in data.SPLITS:
    tokens, n_bytes = prepared.num_tokens[split], prepared.num_bytes[split]
    lines.append(f"{split:<12}{prepared.num_documents[split]:>11,}{tokens:>14,}"
                 f"{n_bytes:>15,}{n_bytes / tokens:>13.3f}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    prepared = data.prepare_dataset(_DATA_DIR.value, _CORPUS.value, _VOCAB_SIZE.value)
  except ValueError as e:  # bad input: its one line says what and why, no traceback
    sys.exit(f"prepare_data: {e}")
  print(f"corpus     {prepared.corpus_dir}")
  print(f"tokenizer  {prepared.tokenizer_path} (vocab {prepared.tokenizer.vocab_size}, "
        f"eod {prepared.tokenizer.eod_id}, pad {prepared.tokenizer.pad_id})")
  print(f"shards     {prepared.shards['train'][0].rsplit('/', 1)[0]}")
  print(format_table(prepared))


if __name__ == "__main__":
  app.run(main)
