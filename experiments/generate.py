r"""Generates text from a trained run: ``python -m experiments.generate --workdir=… --prompt=…``.

Restores the newest readable checkpoint of ``--workdir`` with the run's saved
config and tokenizer (``inference.load_run``), reads the prompt
(``--prompt``, or the whole of ``--prompt_file``) as the start of a document,
and streams the continuation to stdout as it is decoded, until the end of the
document or ``--max_new_tokens``. Sampling is greedy at ``--temperature=0``;
``--top_k`` / ``--top_p`` filter the draws; ``--jrt_repeats=2`` reads the
prompt twice (JRT-Prompt). Timing goes to stderr.

    python -m experiments.generate --workdir=runs/demo/qlstm \
        --prompt="It was a dark and stormy night" --max_new_tokens=200 --temperature=0.8
"""

import sys
import time

from absl import app
from absl import flags
import jax

from experiments import _cli
from recurrent_lm import inference

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a train.py run.", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "The text to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A file whose text is the prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; else sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: smallest set with mass >= p.")
_SEED = flags.DEFINE_integer("seed", 0, "RNG seed of the draws.")
_JRT_REPEATS = flags.DEFINE_integer("jrt_repeats", 1, "JRT-Prompt: read the prompt this often.")


def _prompt() -> str:
  if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
    raise ValueError("give exactly one of --prompt and --prompt_file")
  if _PROMPT_FILE.value is None:
    return _PROMPT.value
  try:
    with open(_PROMPT_FILE.value, encoding="utf-8") as f:
      return f.read()
  except OSError as error:
    raise FileNotFoundError(f"--prompt_file={_PROMPT_FILE.value} cannot be read "
                            f"({error.strerror}); expected a UTF-8 text file") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  try:
    prompt = _prompt()
    if not prompt:
      raise ValueError("the prompt is empty; expected some text to continue")
    sampling = inference.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    if _MAX_NEW_TOKENS.value < 1:
      raise ValueError(f"--max_new_tokens={_MAX_NEW_TOKENS.value}; expected a positive int")
    run = inference.load_run(_WORKDIR.value)
    print(f"{_WORKDIR.value}: step {run.step}", file=sys.stderr, flush=True)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    start = time.perf_counter()
    for piece in inference.stream_text(run, prompt, max_new_tokens=_MAX_NEW_TOKENS.value,
                                       sampling=sampling, key=jax.random.key(_SEED.value),
                                       jrt_repeats=_JRT_REPEATS.value):
      sys.stdout.write(piece)
      sys.stdout.flush()
    sys.stdout.write("\n")
  except (ValueError, FileNotFoundError) as error:
    _cli.fail("generate.py", error, 2)
  print(f"[{time.perf_counter() - start:.2f} s, compiles included]", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
