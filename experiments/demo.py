r"""``make demo``: a qLSTM and a GPT trained at the same wall-clock budget, compared.

    python -m experiments.demo                    # 180 s of training each
    python -m experiments.demo --budget_s=60

Runs the real pipeline, one script after the other, exactly as a user would:
``prepare_data`` (the default corpus and a 4,096-token sentencepiece model,
cached under the data directory for the next run), then for each model
``experiments.train`` (``configs/demo.py``; the step count is whatever fits
the budget) and ``experiments.evaluate`` on the test split. Prints one table
and writes ``results.json`` and ``loss_curves.png`` into a fresh
``--workdir`` (``runs/demo/<time>`` by default; nothing is overwritten).
"""

import json
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

_BUDGET = flags.DEFINE_float("budget_s", 180.0, "Training seconds per model.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; runs/demo/<time> if unset.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data cache; $RECURRENT_LM_DATA or "
                                "~/.cache/recurrent_lm if unset.")
_CORPUS = flags.DEFINE_string("corpus", "default", "'default' or a directory of .txt/.jsonl.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Tokenizer vocabulary size.")
_FAMILIES = flags.DEFINE_list("families", ["qlstm", "gpt"], "Models to compare.")

_REPO = pathlib.Path(__file__).resolve().parents[1]
_NAMES = {"qlstm": "qLSTM", "gpt": "GPT"}


def _run(*args: str) -> None:
  """Runs ``python -m <args>`` in the repository; its output goes to the terminal."""
  command = [sys.executable, "-m", *args]
  print("\n$ " + " ".join(command[1:]), flush=True)
  status = subprocess.run(command, cwd=_REPO).returncode
  if status:
    raise SystemExit(f"demo: `{' '.join(args)}` failed with status {status}")


def _data_overrides() -> list[str]:
  overrides = [f"--config.data.corpus={_CORPUS.value}", f"--config.data.vocab_size={_VOCAB.value}"]
  if _DATA_DIR.value:
    overrides.append(f"--config.data.data_dir={_DATA_DIR.value}")
  return overrides


def _curve(workdir: pathlib.Path, tokens_per_step: int):
  """``(tokens seen, seconds of training, loss)`` at every logged step."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  tokens, seconds, losses, clock, last_step = [], [], [], 0.0, 0
  for row in rows:
    clock += (row["step"] - last_step) * tokens_per_step / row["tokens_per_s"]
    last_step = row["step"]
    tokens.append(row["step"] * tokens_per_step)
    seconds.append(clock)
    losses.append(row["loss"])
  return tokens, seconds, losses


def _plot(results: dict, path: pathlib.Path) -> None:
  figure, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4))
  for family, result in results.items():
    tokens, seconds, losses = result["curve"]
    by_tokens.plot(tokens, losses, label=_NAMES.get(family, family))
    by_time.plot(seconds, losses, label=_NAMES.get(family, family))
  by_tokens.set(xlabel="training tokens", ylabel="train loss (nats/token)")
  by_time.set(xlabel="training seconds (this CPU)", ylabel="train loss (nats/token)")
  for axes in (by_tokens, by_time):
    axes.grid(alpha=0.3)
    axes.legend()
  figure.suptitle("Same wall-clock budget, default corpus")
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def _table(results: dict) -> str:
  header = (f"{'model':<7} {'params':>10} {'steps':>6} {'tokens seen':>12} {'tokens/s':>9} "
            f"{'MFU':>6} {'test ppl':>9} {'ppl/byte':>9} {'bits/byte':>9}")
  lines = [header, "-" * len(header)]
  for family, r in results.items():
    s, e = r["summary"], r["eval"]
    lines.append(
        f"{_NAMES.get(family, family):<7} {s['params']:>10,} {s['steps']:>6} "
        f"{s['tokens_seen']:>12,} {s['tokens_per_s']:>9,.0f} {100 * s['mfu']:>5.1f}% "
        f"{e['token_perplexity']:>9.1f} {e['byte_perplexity']:>9.3f} {e['bits_per_byte']:>9.3f}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _BUDGET.value > 0:
    raise app.UsageError(f"--budget_s={_BUDGET.value}; expected > 0")
  root = pathlib.Path(_WORKDIR.value or _REPO / "runs" / "demo" / time.strftime("%Y%m%d-%H%M%S"))
  if root.exists() and any(root.iterdir()):
    raise app.UsageError(f"--workdir={root} is not empty; the demo writes into a new directory")
  root.mkdir(parents=True, exist_ok=True)

  prepare = ["experiments.prepare_data", f"--corpus={_CORPUS.value}",
             f"--vocab_size={_VOCAB.value}"]
  _run(*prepare, *([f"--data_dir={_DATA_DIR.value}"] if _DATA_DIR.value else []))
  results = {}
  for family in _FAMILIES.value:
    workdir = root / family
    _run("experiments.train", f"--config=experiments/configs/demo.py:{family}",
         f"--workdir={workdir}", f"--config.train.time_budget_s={_BUDGET.value}",
         *_data_overrides())
    _run("experiments.evaluate", f"--workdir={workdir}", "--split=test")
    summary = json.loads((workdir / "summary.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    evaluation = json.loads((workdir / f"eval_test_step{summary['steps']}.json").read_text())
    tokens_per_step = config["data"]["batch_size"] * config["data"]["seq_len"]
    results[family] = {"summary": summary, "eval": evaluation, "config": config,
                       "curve": _curve(workdir, tokens_per_step)}

  table = _table(results)
  _plot(results, root / "loss_curves.png")
  (root / "results.json").write_text(json.dumps(
      {f: {"summary": r["summary"], "eval": r["eval"]} for f, r in results.items()}, indent=2))
  how = []
  for family, r in results.items():
    data, evaluation = r["config"]["data"], r["eval"]
    how.append(f"{_NAMES.get(family, family)}: "
               + (f"{data['seq_len']}-token windows shifted by {r['config']['eval']['stride']}"
                  if evaluation["mode"] == "window" else "state carried across windows"))
  scored = next(iter(results.values()))["eval"]["tokens"]
  print(f"\n{_BUDGET.value:.0f} s of training each; {scored:,.0f} tokens of the test split of "
        f"the '{_CORPUS.value}' corpus scored ({'; '.join(how)})\n")
  print(table)
  print(f"\nloss curves: {root / 'loss_curves.png'}\nresults:     {root / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
