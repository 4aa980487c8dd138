r"""Throughput, peak memory and decode latency against sequence length.

    python -m experiments.throughput --out=runs/throughput_cpu
    python -m experiments.throughput --out=runs/throughput_gpu \
        --lengths=1024,4096,16384,65536,131072 --memory_limit_gib=70

Every ``<family>_cpu_small`` preset of ``--presets`` (4 layers of width 128)
next to the reference Transformer ``gpt_cpu_small`` (always included), at
every length of ``--lengths``, in every mode of ``--modes``:

- ``train``: the full train step (forward, backward, AdamW) on
  ``batch_size × T`` random tokens, tokens/s;
- ``prefill``: the forward pass over ``T`` tokens returning logits and state, tokens/s;
- ``decode``: after a ``T``-token context, ``--decode_tokens`` single-token
  steps carrying the state; the median latency per token (the GPT's KV cache
  is sized to the context, so its latency grows with T; a recurrent state's does not).

Each cell is compiled first and XLA's peak memory read from the compiled
function; a cell over ``--memory_limit_gib`` is skipped, and so are the
longer lengths of a (preset, mode) once one of its calls took over
``--time_limit_s``. Written into ``--out``: ``throughput.csv`` (rewritten
after every measurement; a rerun reuses its rows of the same device and
settings, so an interrupted sweep resumes), ``throughput.png``,
``decode_latency.png``, ``memory.png`` and ``crossovers.json`` (the lengths
where each recurrent model's training and prefill tokens/s overtake the GPT's,
and the decode latency at the longest vs the shortest context).

``--modes=long_decode`` (not among the default modes; it may be given with
them) decodes ``--long_decode_tokens`` tokens of ``--long_decode_preset``
after a 16-token prompt and samples, every ``--long_decode_every`` tokens,
the seconds, the process's resident memory, the device's ``bytes_in_use``
(blank where the device reports none) and the state's bytes into
``long_decode.csv``; the RSS growth is the last sample minus the first::

    python -m experiments.throughput --modes=long_decode --out=runs/long_decode

Bad input ends the program with one line on stderr and exit status 2.
"""

import os

from absl import app
from absl import flags

from experiments import _cli
from experiments import throughput_lib as lib

_PRESETS = flags.DEFINE_list(
    "presets", ["gpt", "qlstm", "based", "mamba2", "gla", "mlstm"],
    "Families of <family>_cpu_small presets; gpt (the reference) is always included.")
_LENGTHS = flags.DEFINE_list(
    "lengths", ["256", "512", "1024", "2048", "4096", "8192", "16384", "32768"],
    "Sequence lengths T (tokens per row; the context length of decode).")
_MODES = flags.DEFINE_list(
    "modes", list(lib.MODES),
    "Some of train, prefill, decode, and long_decode (memory over one long generation).")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Rows per step.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps of train and prefill; the median.")
_DECODE_TOKENS = flags.DEFINE_integer(
    "decode_tokens", 64, "Timed single-token decode steps per context; the median.")
_MEMORY_LIMIT = flags.DEFINE_float(
    "memory_limit_gib", 16.0, "Cells whose compiled peak memory is over this are skipped.")
_TIME_LIMIT = flags.DEFINE_float(
    "time_limit_s", 30.0, "Longer lengths of a (preset, mode) are skipped once one of its "
    "calls took longer than this.")
_LONG_TOKENS = flags.DEFINE_integer(
    "long_decode_tokens", 100_000, "long_decode: tokens decoded after the prompt.")
_LONG_EVERY = flags.DEFINE_integer(
    "long_decode_every", 10_000, "long_decode: tokens between memory samples.")
_LONG_PRESET = flags.DEFINE_string(
    "long_decode_preset", lib.LONG_DECODE_PRESET, "long_decode: the model preset decoded.")
_OUT = flags.DEFINE_string("out", None, "Output directory (created; its CSV is resumed).",
                           required=True)


def _print(line: str) -> None:
  print(line, flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  try:
    lengths = [int(t) for t in _LENGTHS.value]
  except ValueError:
    _cli.fail("throughput.py", ValueError(f"lengths={_LENGTHS.value}; expected ints"), 2)
  settings = lib.Settings(
      batch_size=_BATCH.value, vocab_size=_VOCAB.value, warmup=_WARMUP.value,
      repeats=_REPEATS.value, decode_tokens=_DECODE_TOKENS.value,
      memory_limit_gib=_MEMORY_LIMIT.value, time_limit_s=_TIME_LIMIT.value)
  try:
    modes, long_decode = lib.split_modes(_MODES.value)
    if modes:
      lib.check_settings(lib.families_with_reference(_PRESETS.value), lengths, modes,
                         settings)
      lib.read_rows(os.path.join(_OUT.value, lib.CSV_NAME))
    if long_decode:
      lib.check_long_decode(_LONG_PRESET.value, _LONG_TOKENS.value, _LONG_EVERY.value,
                            _BATCH.value, _VOCAB.value)
  except ValueError as error:
    _cli.fail("throughput.py", error, 2)
  if modes:
    lib.run(_PRESETS.value, lengths, modes, settings, _OUT.value, print_fn=_print)
  if long_decode:
    lib.long_decode(_LONG_PRESET.value, _LONG_TOKENS.value, _LONG_EVERY.value, _OUT.value,
                    batch_size=_BATCH.value, vocab_size=_VOCAB.value, print_fn=_print)


if __name__ == "__main__":
  app.run(main)
