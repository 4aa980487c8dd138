"""The recall sweep and JRT evaluation: cells, resume, tables, plots; the quick preset's claims (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import recall_lib
from experiments.configs import recall as recall_configs
from recurrent_lm import models
from recurrent_lm.training import tasks


def _tiny(task: str = "mqar"):
  config = recall_configs.get_config("quick" if task == "mqar" else "quick_sd")
  config.vocab_size = 32
  config.mqar.train = ((16, 2, 64), (16, 4, 64))   # JRT-RNN: prefixes of 4 and 8
  config.mqar.validation = ((16, 4, 16),)
  config.mqar.test = ((16, 2, 16), (16, 4, 16))
  config.set_disjointness.update(train=((2, 5), (5, 2)), train_examples=32,
                                 validation=((2, 5),), test=((2, 5), (5, 2)), eval_examples=16)
  config.grid = ("attention:16:0", "jrt:16:2") if task == "mqar" else ("gla:16:2",)
  config.lrs = (1e-3, 3e-3) if task == "mqar" else (3e-3,)
  config.steps, config.batch_size, config.eval_every = 4, 8, 2
  return config


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  return workdir, recall_lib.sweep(_tiny(), workdir)


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_the_sweep_writes_one_row_per_model_and_its_figures(swept):
  workdir, table = swept
  assert [row["model"] for row in table] == ["attention-d16", "jrt-d16-feature_dim2"]
  for name in ("results.csv", "results.json", "accuracy_vs_state.png", "accuracy_vs_kv.png",
               "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "results.json")) as f:
    stored = json.load(f)
  assert len(stored["cells"]) == 4             # 2 models × 2 learning rates
  for row in table:
    cells = [c for c in stored["cells"] if c["model"] == row["model"]]
    assert row["val_accuracy"] == max(c["val_accuracy"] for c in cells)   # best lr kept
    assert set(row) >= {"acc_num_kv_pairs=2", "acc_num_kv_pairs=4", "state_bytes", "lr"}
    config = recall_lib.model_config(recall_lib.Model.parse(
        {"attention-d16": "attention:16:0"}.get(row["model"], row["model"].split("-")[0] + ":16:2")),
        32, 2, recall_lib.max_len(_tiny()))
    assert row["state_bytes"] == models.state_bytes(config)


def test_state_grows_with_the_knob():
  small, large = (models.state_bytes(recall_lib.model_config(recall_lib.Model("based", 16, f),
                                                             32, 2, 64)) for f in (2, 4))
  assert large > small
  small, large = (models.state_bytes(recall_lib.model_config(recall_lib.Model("gla", 16, h),
                                                             32, 2, 64)) for h in (4, 1))
  assert large > small


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_a_rerun_skips_finished_cells(swept, monkeypatch):
  workdir, table = swept
  def no_training(*args, **kwargs):
    raise AssertionError("a finished cell was trained again")
  monkeypatch.setattr(tasks, "fit", no_training)
  assert recall_lib.sweep(_tiny(), workdir) == table


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_a_workdir_of_another_sweep_is_refused(swept):
  workdir, _ = swept
  other = _tiny()
  other.vocab_size = 64
  with pytest.raises(ValueError, match="holds a sweep of a different task config"):
    recall_lib.sweep(other, workdir)
  longer = _tiny()
  longer.steps = 8             # finished cells trained 4 steps: not the same sweep
  with pytest.raises(ValueError, match="holds a sweep of a different task config"):
    recall_lib.sweep(longer, workdir)


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_another_tasks_settings_do_not_make_a_sweep_different(swept, monkeypatch):
  workdir, table = swept
  monkeypatch.setattr(tasks, "fit", lambda *a, **k: pytest.fail("a finished cell was retrained"))
  config = _tiny()
  config.set_disjointness.train_examples = 7     # not the MQAR sweep's concern
  assert recall_lib.sweep(config, workdir) == table


def test_bad_grid_entries_are_named():
  with pytest.raises(ValueError, match=r"grid entry 'mamba3:64:4'; expected arch:d_model:knob"):
    recall_lib.Model.parse("mamba3:64:4")


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_jrt_eval_reads_the_cells_back_and_reports_deltas(swept):
  workdir, table = swept
  rows = recall_lib.jrt_table(workdir, repeats=2)
  assert [r["model"] for r in rows] == [r["model"] for r in table]
  for row, swept_row in zip(rows, table):
    # The restored parameters give the sweep's own test accuracy when read once.
    assert row["accuracy"] == pytest.approx(swept_row["test_accuracy"])
    assert row["delta"] == pytest.approx(row["jrt_accuracy"] - row["accuracy"])
  assert os.path.exists(os.path.join(workdir, "jrt_eval.csv"))
  assert "JRT-RNN" in recall_lib.format_jrt_table(rows)


def test_set_disjointness_sweep_reports_accuracy_by_set_order(tmp_path):
  table = recall_lib.sweep(_tiny("set_disjointness"), str(tmp_path))
  for row in table:
    assert {"acc_set_order=0", "acc_set_order=1"} <= set(row)
  assert os.path.getsize(tmp_path / "accuracy_by_order.png") > 0


def test_jrt_eval_names_a_directory_that_is_not_a_sweep(tmp_path):
  run = subprocess.run([sys.executable, "-m", "experiments.jrt_eval", f"--workdir={tmp_path}"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                           os.path.dirname(os.path.abspath(__file__)))))
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1] == (
      f"jrt_eval.py: error: --workdir={tmp_path} has no config.json; expected a recall_sweep "
      "work directory")


def test_icll_sweep_scores_dfa_acceptance(tmp_path):
  config = recall_configs.get_config("quick_icll")
  config.icll.update(num_states=(4, 5), num_strings=(3, 4), string_length=(1, 4),
                     num_dfas=(20, 4, 4), train_examples=32)
  config.grid, config.lrs = ("qlstm:16:4",), (3e-3,)
  config.steps, config.batch_size, config.eval_every = 2, 8, 2
  (row,) = recall_lib.sweep(config, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    test = json.load(f)["cells"][0]["test"]
  # Acceptance counts any letter the DFA allows, so it is at least the exact-token accuracy.
  assert test["accuracy"] >= test["token_accuracy"]
  assert row["test_accuracy"] == test["accuracy"]
  assert any(k.startswith("acc_num_states=") for k in row)
  assert os.path.getsize(tmp_path / "accuracy_vs_states.png") > 0


# ---------------------------------------------------------------------------
# The quick presets' results (about 15 minutes each on a 2-core CPU): `make test-slow`.


def _by_arch(table):
  archs = {}
  for row in table:
    archs.setdefault(row["arch"], []).append(row)
  return {arch: sorted(rows, key=lambda r: r["state_bytes"]) for arch, rows in archs.items()}


@pytest.mark.slow
def test_quick_mqar_attention_recalls_and_recurrent_recall_grows_with_state(tmp_path):
  config = recall_configs.get_config("quick")
  table = recall_lib.sweep(config, str(tmp_path))
  largest = f"acc_num_kv_pairs={max(kv for _, kv, _ in config.mqar.test)}"
  archs = _by_arch(table)
  (attention,) = archs.pop("attention")
  assert attention[largest] >= 0.95, attention
  archs.pop("jrt", None)   # one size, for jrt_eval
  for arch, rows in archs.items():
    assert len(rows) == 2, arch
    small, large = rows
    assert large["test_accuracy"] > small["test_accuracy"], (arch, small, large)
  # JRT-Prompt: the recurrent models gain on average from reading the pairs twice.
  jrt = [row for row in recall_lib.jrt_table(str(tmp_path)) if row["arch"] not in ("attention",)]
  assert np.mean([row["delta"] for row in jrt]) > 0, jrt


@pytest.mark.slow
def test_quick_set_disjointness_recurrent_models_prefer_the_short_set_first(tmp_path):
  table = recall_lib.sweep(recall_configs.get_config("quick_sd"), str(tmp_path))
  recurrent = [row for row in table if row["arch"] != "attention"]
  short_first = np.mean([row["acc_set_order=0"] for row in recurrent])
  long_first = np.mean([row["acc_set_order=1"] for row in recurrent])
  assert short_first > long_first, table
