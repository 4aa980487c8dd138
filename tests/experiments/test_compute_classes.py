"""Compute classes: Languini's budget arithmetic, power-law fits and crossings,
the throughput CSV, resumable runs and the report, on a generated corpus."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from experiments import compute_classes_lib as lib
from experiments.configs import compute_classes as sweep_configs
from tests.training.conftest import ENV, REPO, VOCAB, write_corpus


def tiny_sweep(corpus_dir, data_dir):
  """Two architectures at the test size, two classes of a fraction of a second."""
  sweep = sweep_configs.get_config("cpu")
  sweep.models = ["gpt_cpu_tiny", "qlstm_cpu_tiny"]
  sweep.class_hours = [1.0, 3.0]
  sweep.hour_seconds = 0.1
  sweep.data.update(corpus=str(corpus_dir), data_dir=str(data_dir), vocab_size=VOCAB,
                    seq_len=32, batch_size=4)
  sweep.eval.update(max_tokens=1024, batch_size=4)
  sweep.throughput.update(warmup=1, repeats=2)
  return sweep


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("classes")
  return write_corpus(root / "corpus", num_docs=30), root / "cache"


def test_family_strips_the_size():
  assert lib.family("gpt_small") == "gpt"
  assert lib.family("mamba2_cpu_small") == "mamba2"
  assert lib.family("qlstm_cpu_tiny") == "qlstm"
  assert lib.family("based_360m") == "based"
  with pytest.raises(ValueError, match="no known size suffix"):
    lib.family("gpt")


def test_class_budget_follows_languini():
  # Languini: 55,416 tokens/s on the reference card for 6 h at batch 128 × 512
  # is 18,265 steps (the published throughput is rounded to whole tokens/s).
  tokens, steps = lib.class_budget(55_416, 6, 3600, 128, 512)
  assert abs(steps - 18_265) <= 1
  assert steps == int(55_416 * 6 * 3600 // (128 * 512)) and tokens == steps * 128 * 512
  assert lib.class_budget(1.0, 1.0, 1.0, 4, 32) == (128, 1)   # at least one step


def test_power_law_fit_recovers_exact_laws_and_their_crossing():
  rng = np.random.default_rng(0)
  hours = np.sort(rng.uniform(1, 100, 5))
  a1, b1, a2, b2 = rng.uniform(2, 10), -rng.uniform(0.05, 0.2), rng.uniform(10, 20), \
      -rng.uniform(0.3, 0.5)
  fit1 = lib.fit_power_law(hours, a1 * hours ** b1)
  fit2 = lib.fit_power_law(hours, a2 * hours ** b2)
  for fit, (a, b) in ((fit1, (a1, b1)), (fit2, (a2, b2))):
    assert fit["a"] == pytest.approx(a, rel=1e-9) and fit["b"] == pytest.approx(b, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0) and fit["points"] == 5
  cross = lib.crossing(fit1, fit2)
  assert cross == pytest.approx(math.exp(math.log(a2 / a1) / (b1 - b2)), rel=1e-9)
  assert a1 * cross ** b1 == pytest.approx(a2 * cross ** b2, rel=1e-9)
  assert lib.crossing(fit1, dict(fit1, a=2 * fit1["a"])) is None   # parallel
  noisy = lib.fit_power_law(hours, a1 * hours ** b1 * np.exp(rng.normal(0, 0.05, 5)))
  assert 0 < noisy["r2"] < 1
  with pytest.raises(ValueError, match="at least 2 distinct"):
    lib.fit_power_law([3.0, 3.0], [1.0, 2.0])


def _result(family, preset, hours, ppl):
  return {"family": family, "preset": preset, "class_hours": hours, "byte_perplexity": ppl}


def test_scaling_takes_each_familys_best_preset_and_places_the_crossing():
  results = [
      # The reference: 8 · h^-0.1; the steeper family: 16 · h^-0.3 crosses at h = 2^(1/0.2) = 32.
      *[_result("gpt", "gpt_small", h, 8 * h ** -0.1) for h in (1, 2, 4)],
      *[_result("qlstm", "qlstm_small", h, 16 * h ** -0.3) for h in (1, 2, 4)],
      *[_result("qlstm", "qlstm_medium", h, 20 * h ** -0.3) for h in (1, 2, 4)],  # never best
      # Already better everywhere and steeper: the fits crossed before the smallest class.
      *[_result("based", "based_cpu_small", h, 6 * h ** -0.2) for h in (1, 2, 4)],
  ]
  laws = lib.scaling(results, "gpt")
  assert laws["fits"]["qlstm"]["a"] == pytest.approx(16) and \
      laws["fits"]["qlstm"]["b"] == pytest.approx(-0.3)
  qlstm = laws["crossings"]["qlstm"]
  assert qlstm["hours"] == pytest.approx(32.0) and qlstm["kind"] == "extrapolated"
  assert not qlstm["ahead_at_largest"]
  based = laws["crossings"]["based"]
  assert based["kind"] == "before" and based["ahead_at_largest"]
  assert "gpt" not in laws["crossings"]
  # The same laws measured at 8, 32 and 128 h: the crossing (32 h) is within.
  wide = [_result(f, f"{f}_small", h, a * h ** b) for f, a, b in (("gpt", 8, -0.1),
                                                                  ("qlstm", 16, -0.3))
          for h in (8, 32, 128)]
  assert lib.scaling(wide, "gpt")["crossings"]["qlstm"]["kind"] == "within"


def test_run_config_fits_the_schedule_to_the_step_count(corpus):
  sweep = tiny_sweep(*corpus)
  config = lib.run_config(sweep, "qlstm_cpu_tiny", 57)
  assert config.train.steps == 57 and config.train.time_budget_s == 0
  assert config.optimizer.warmup_steps == 5 and config.optimizer.peak_lr == 3e-3
  assert config.data.vocab_size == VOCAB == config.model.vocab_size
  assert config.data.corpus == str(corpus[0]) and config.eval.max_tokens == 1024
  assert lib.run_config(sweep, "qlstm_cpu_tiny", 100_000).optimizer.warmup_steps == 200


@pytest.mark.parametrize("field,value,message", [
    ("models", ["gpt_cpu_tiny", "lstm_big"], "unknown preset 'lstm_big'"),
    ("class_hours", [6.0, 6.0], "distinct positive"),
    ("class_hours", [0.0, 6.0], "distinct positive"),
    ("hour_seconds", 0.0, "hour_seconds=0.0"),
    ("reference", "mamba", "reference='mamba'"),
])
def test_bad_sweeps_are_refused_with_one_line(corpus, field, value, message):
  sweep = tiny_sweep(*corpus)
  sweep[field] = value
  with pytest.raises(ValueError, match=message):
    lib.check_sweep(sweep)


def test_a_workdir_of_another_sweep_or_of_something_else_is_refused(corpus, tmp_path):
  sweep = tiny_sweep(*corpus)
  lib.check_workdir(sweep, str(tmp_path / "a"))
  sweep.models = ["qlstm_cpu_tiny"]          # more or fewer models: the same sweep
  sweep.class_hours = [8.0]
  lib.check_workdir(sweep, str(tmp_path / "a"))
  sweep.data.seq_len = 64
  with pytest.raises(ValueError, match="different data"):
    lib.check_workdir(sweep, str(tmp_path / "a"))
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="is not empty"):
    lib.check_workdir(sweep, str(tmp_path / "b"))
  assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_throughput_is_measured_once_per_device_and_read_back(corpus, tmp_path, monkeypatch):
  sweep = tiny_sweep(*corpus)
  path = str(tmp_path / "throughput.csv")
  row = lib.throughput_row(sweep, "qlstm_cpu_tiny", path, device="cpu x1")
  assert row["tokens_per_s"] == pytest.approx(4 * 32 / row["seconds_per_step"])
  assert row["params"] > 0 and row["flops_per_token"] > 6 * row["params"] * 0.5

  def no_measuring(*args, **kwargs):
    raise AssertionError("measured again")
  monkeypatch.setattr(lib.training, "step_seconds", no_measuring)
  again = lib.throughput_row(sweep, "qlstm_cpu_tiny", path, device="cpu x1")
  assert again["tokens_per_s"] == pytest.approx(row["tokens_per_s"])
  with pytest.raises(AssertionError, match="measured again"):   # another device: measured
    lib.throughput_row(sweep, "qlstm_cpu_tiny", path, device="other x8")
  assert len(lib.read_csv(path)) == 1


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_sweep_trains_every_class_reports_and_resumes(corpus, tmp_path, monkeypatch):
  sweep = tiny_sweep(*corpus)
  workdir = tmp_path / "sweep"
  laws = lib.run(sweep, str(workdir), str(workdir / "throughput.csv"))

  results = lib.read_csv(str(workdir / "results.csv"))
  assert len(results) == 4
  for family in ("gpt", "qlstm"):
    rows = sorted((r for r in results if r["family"] == family),
                  key=lambda r: float(r["class_hours"]))
    steps = [int(r["steps"]) for r in rows]
    # Three times the hours, three times the steps (to within the floor of the division).
    assert 3 * steps[0] <= steps[1] <= 3 * steps[0] + 2
    for r in rows:
      assert int(r["tokens"]) == int(r["steps"]) * 4 * 32
      assert 1.0 < float(r["byte_perplexity"]) < float(r["token_perplexity"]) < 2 * VOCAB
      config = json.loads((workdir / "runs" / r["preset"] / f"{float(r['class_hours']):g}h"
                           / "config.json").read_text())
      assert config["train"]["steps"] == int(r["steps"])
    # More compute, lower perplexity, for each architecture.
    ppl = [float(r["byte_perplexity"]) for r in rows]
    assert ppl[1] < ppl[0], ppl
  assert set(laws["fits"]) == {"gpt", "qlstm"} and set(laws["crossings"]) == {"qlstm"}
  assert laws["fits"]["qlstm"]["b"] < 0
  report = (workdir / "report.md").read_text()
  assert "| qlstm | qlstm_cpu_tiny | 3 |" in report and "scaling.png" in report
  png = (workdir / "scaling.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 10_000
  fits = lib.read_csv(str(workdir / "fits.csv"))
  assert {f["family"] for f in fits} == {"gpt", "qlstm"}

  # A second run trains and measures nothing: every cell is read back.
  def no_training(*args, **kwargs):
    raise AssertionError("trained again")
  monkeypatch.setattr(lib.training, "train", no_training)
  monkeypatch.setattr(lib.training, "step_seconds", no_training)
  again = lib.run(sweep, str(workdir), str(workdir / "throughput.csv"))
  assert again["fits"] == laws["fits"]


def test_script_refuses_a_bad_sweep_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.compute_classes", f"--workdir={tmp_path / 'w'}",
       "--config.hour_seconds=-1"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].endswith(
      "hour_seconds=-1.0; expected seconds > 0 per class hour")
  assert not (tmp_path / "w").exists()
