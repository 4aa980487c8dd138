"""Evaluation from checkpoints beyond perplexity: zero-shot passkey, MQAR and ICLL."""

import json
import subprocess
import sys

import numpy as np
import pytest

from experiments import evaluate_lib
from recurrent_lm import inference
from recurrent_lm.data import synthetic
from tests.training.conftest import ENV, REPO

SETTINGS = evaluate_lib.TaskSettings(lengths=(200,), num_examples=4, batch_size=4)


def test_passkey_exact_match_is_what_greedy_decoding_emits(trained_run):
  """Teacher-forced exact match (one pass) against decoding each prompt token by token."""
  result = evaluate_lib.evaluate_task(str(trained_run), "passkey", SETTINGS)
  assert result["examples"] == 4 and result["step"] == 30
  assert set(result["by_length"]) == {200}
  run = inference.load_run(str(trained_run))
  (source,), _, _ = evaluate_lib.task_sources("passkey", run.tokenizer, (200,), SETTINGS)
  emitted = []
  for example in source.examples:
    mask = example["loss_mask"] > 0
    prompt = example["inputs"][:np.argmax(mask) + 1]         # up to the question's end
    answer = example["targets"][mask]
    decoded = inference.generate(run.model, run.params, [prompt], max_new_tokens=answer.size)[0]
    emitted.append(decoded == answer.tolist())
  assert result["example_accuracy"] == pytest.approx(np.mean(emitted))
  stored = json.loads((trained_run / "eval_passkey_step30.json").read_text())
  assert stored["example_accuracy"] == result["example_accuracy"] and "200" in stored["by_length"]


def test_mqar_reads_task_ids_past_the_special_tokens_and_scores_the_queries(trained_run):
  settings = evaluate_lib.TaskSettings(lengths=(64,), num_examples=4, batch_size=4)
  result = evaluate_lib.evaluate_task(str(trained_run), "mqar", settings)
  run = inference.load_run(str(trained_run))
  sources, offset, classes = evaluate_lib.task_sources("mqar", run.tokenizer, (64,), settings)
  assert offset == 3 and classes == 508 and [s.source.config.num_kv_pairs
                                             for s in sources] == [4, 8, 16]
  right = scored = 0
  for source in sources:        # the same figure, computed here in numpy
    batch = synthetic.batches_of(source.examples)
    logits, _ = run.model.apply({"params": run.params}, batch["inputs"] + offset,
                                segment_ids=batch["segment_ids"])
    predictions = np.asarray(logits)[..., offset:offset + classes].argmax(-1)
    mask = batch["loss_mask"] > 0
    right += int((predictions == batch["targets"])[mask].sum())
    scored += int(mask.sum())
  assert result["scored"] == scored == 4 * (4 + 8 + 16)
  assert result["accuracy"] == pytest.approx(right / scored)
  assert set(result["by_num_kv_pairs"]) == {4, 8, 16}


def test_icll_scores_acceptance_on_held_out_dfas(trained_run):
  result = evaluate_lib.evaluate_task(str(trained_run), "icll", evaluate_lib.TaskSettings(
      lengths=(96,), num_examples=3, batch_size=3, jrt_repeats=2))
  assert result["examples"] == 3 and result["jrt_repeats"] == 2
  assert 0 <= result["accuracy"] <= 1 and 0 <= result["token_accuracy"] <= 1
  assert sum(g["examples"] for g in result["by_num_states"].values()) == 3


def test_task_settings_that_cannot_work_are_one_line(trained_run):
  with pytest.raises(ValueError, match=r"lengths=\(12,\): no MQAR setting fits"):
    evaluate_lib.evaluate_task(str(trained_run), "mqar", evaluate_lib.TaskSettings((12,)))
  with pytest.raises(ValueError, match=r"ICLL needs a length of at least 38"):
    evaluate_lib.evaluate_task(str(trained_run), "icll", evaluate_lib.TaskSettings((30,)))
  with pytest.raises(ValueError, match=r"jrt_repeats=0; expected a positive int"):
    evaluate_lib.TaskSettings(jrt_repeats=0)


def test_evaluate_script_scores_several_tasks_and_names_bad_flags(trained_run):
  def evaluate(*flags):
    return subprocess.run([sys.executable, "-m", "experiments.evaluate",
                           f"--workdir={trained_run}", *flags], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
  result = evaluate("--tasks=perplexity,mqar", "--max_tokens=2000", "--task_lengths=64",
                    "--task_examples=2")
  assert result.returncode == 0, result.stderr[-2000:]
  metrics = json.loads(result.stdout)
  assert set(metrics) == {"perplexity", "mqar"} and metrics["mqar"]["examples"] == 6
  assert 1900 < metrics["perplexity"]["tokens"] <= 2000   # eod targets are not scored
  for flags, message in [(("--tasks=recall",), "--tasks=recall; expected some of perplexity"),
                         (("--tasks=mqar", "--task_lengths=6x"), "--task_lengths=6x; expected")]:
    result = evaluate(*flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("evaluate.py: error: ") and message in lines[0], lines
