"""``experiments.demo`` end to end at a tiny budget: prepare → train → evaluate → table, PNG.

The real scripts run in subprocesses on a generated corpus (no network);
``make demo`` runs the same code on the default corpus for 180 s a model.
"""

import json
import subprocess
import sys

import pytest

from tests.training.conftest import ENV, REPO, VOCAB, write_corpus


@pytest.mark.slow   # a minute; `make test-slow` (the suite's time budget)
def test_demo_trains_evaluates_and_compares_both_models(tmp_path):
  corpus = write_corpus(tmp_path / "corpus")
  out = tmp_path / "demo"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.demo", "--budget_s=2", f"--workdir={out}",
       f"--corpus={corpus}", f"--data_dir={tmp_path / 'cache'}", f"--vocab_size={VOCAB}"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  table = result.stdout[result.stdout.rindex("\nmodel ") + 1:]
  assert table.splitlines()[2].startswith("qLSTM") and table.splitlines()[3].startswith("GPT")
  results = json.loads((out / "results.json").read_text())
  for family in ("qlstm", "gpt"):
    summary, evaluation = results[family]["summary"], results[family]["eval"]
    assert summary["steps"] >= 1 and summary["tokens_seen"] == summary["steps"] * 16 * 256
    assert 1.0 < evaluation["byte_perplexity"] < evaluation["token_perplexity"] < 2 * VOCAB
    assert (out / family / "config.json").exists()
  assert results["qlstm"]["eval"]["mode"] == "carry"
  assert results["gpt"]["eval"]["mode"] == "window"
  png = (out / "loss_curves.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 10_000
  # A second demo into the same directory is refused: nothing is overwritten.
  again = subprocess.run(
      [sys.executable, "-m", "experiments.demo", "--budget_s=2", f"--workdir={out}"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and "is not empty" in again.stderr
