"""experiments/throughput.py: crossovers, the resumable CSV, the limits, tiny sweeps
and the long decode's memory samples.

The script's flags would collide with other experiment scripts' in one pytest
process, so it runs in a subprocess; its logic is tested through
``experiments.throughput_lib``, which defines no flags.
"""

import csv
import json
import math
import os
import subprocess
import sys
import types

import pytest

from experiments import throughput_lib as lib
from recurrent_lm import models
from tests.training.conftest import ENV, REPO

_TINY = ["--presets=qlstm", "--decode_tokens=2", "--repeats=1", "--warmup=1", "--vocab_size=64"]


def _run(out, *flags):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.throughput", f"--out={out}", *_TINY, *flags],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _rows(out):
  with open(os.path.join(out, "throughput.csv"), newline="") as f:
    return list(csv.DictReader(f))


def _row(rows, preset, mode, seq_len):
  return next(r for r in rows if (r["preset"], r["mode"], r["seq_len"]) ==
              (f"{preset}_cpu_small", mode, str(seq_len)))


# ---------------------------------------------------------------------------
# Crossovers.


def test_crossover_interpolates_log_ratio_against_log_length():
  # ratio 1/2 at 256 and 2 at 1024: log-linear midway, at sqrt(256 * 1024) = 512.
  result = lib.crossover({256: 100.0, 1024: 50.0}, {256: 50.0, 1024: 100.0})
  assert result["bound"] == "="
  assert result["length"] == pytest.approx(512.0, rel=1e-12)


def test_crossover_uses_the_first_pair_of_lengths_where_the_ratio_crosses_one():
  reference = {128: 10.0, 256: 10.0, 512: 10.0, 1024: 10.0}
  other = {128: 2.0, 256: 5.0, 512: 20.0, 1024: 5.0}   # crosses up, then down again
  result = lib.crossover(reference, other)
  r1, r2 = math.log(0.5), math.log(2.0)
  expected = math.exp(math.log(256) - r1 * (math.log(512) - math.log(256)) / (r2 - r1))
  assert result["length"] == pytest.approx(expected, rel=1e-12)
  assert result["text"] == f"{expected:,.0f}"


def test_crossover_is_at_most_the_shortest_length_when_already_faster_there():
  result = lib.crossover({256: 100.0, 512: 50.0}, {256: 100.0, 512: 80.0})
  assert (result["bound"], result["length"], result["text"]) == ("<=", 256, "<= 256")


def test_crossover_is_beyond_the_longest_length_when_never_faster():
  result = lib.crossover({256: 100.0, 512: 90.0}, {256: 10.0, 512: 20.0})
  assert (result["bound"], result["length"], result["text"]) == (">", 512, "> 512")


def test_crossover_names_the_lengths_the_gpt_was_not_measured_at():
  result = lib.crossover({256: 100.0, 512: 90.0}, {256: 10.0, 512: 20.0, 1024: 30.0})
  assert result["text"] == "> 512 (gpt not measured at 1024)"
  assert result["reference_missing"] == [1024]
  assert lib.crossover({}, {256: 1.0})["length"] is None


def test_crossovers_read_the_measured_rows_only():
  rows = [{"preset": p, "mode": "train", "seq_len": str(t), "tokens_per_s": str(v),
           "status": status}
          for p, t, v, status in (("gpt_cpu_small", 256, 100.0, "ok"),
                                  ("gpt_cpu_small", 1024, 50.0, "ok"),
                                  ("gpt_cpu_small", 4096, 0.0, "skipped: needs 20 GiB"),
                                  ("qlstm_cpu_small", 256, 50.0, "ok"),
                                  ("qlstm_cpu_small", 1024, 100.0, "ok"),
                                  ("qlstm_cpu_small", 4096, 90.0, "ok"))]
  crosses = lib.crossovers(rows, ["gpt_cpu_small", "qlstm_cpu_small"])
  assert crosses["train"]["qlstm_cpu_small"]["length"] == pytest.approx(512.0)
  assert crosses["train"]["qlstm_cpu_small"]["reference_missing"] == [4096]
  assert crosses["prefill"]["qlstm_cpu_small"]["text"] == "no common length"


# ---------------------------------------------------------------------------
# Memory, the CSV and settings.


def test_peak_bytes_is_arguments_plus_outputs_minus_aliases_plus_temporaries():
  stats = types.SimpleNamespace(argument_size_in_bytes=1000, output_size_in_bytes=300,
                                alias_size_in_bytes=200, temp_size_in_bytes=50)
  assert lib.peak_bytes(stats) == 1150


def test_rows_round_trip_through_the_csv_keyed_by_device_preset_mode_and_shape(tmp_path):
  path = str(tmp_path / "throughput.csv")
  row = {"device": "cpu", "preset": "gpt_cpu_small", "mode": "decode", "seq_len": 1024,
         "batch_size": 1, "vocab_size": 4096, "seconds": 0.5, "tokens_per_s": 2.0,
         "peak_bytes": 10, "state_bytes": 20, "status": "ok"}
  lib.write_rows(path, [row, {**row, "device": "TPU v5e"}])
  rows = lib.read_rows(path)
  assert [lib.row_key(r) for r in rows] == [lib.row_key(row),
                                            lib.row_key({**row, "device": "TPU v5e"})]
  assert rows[0]["tokens_per_s"] == "2.0"
  assert os.listdir(tmp_path) == ["throughput.csv"]   # no temporary file left behind


def test_rows_are_reused_when_measured_or_still_over_the_memory_limit():
  needs_2_gib = {"status": "skipped: needs 2.00 GiB > limit 1 GiB", "peak_bytes": str(2 ** 31)}
  assert lib.reusable({"status": "ok", "peak_bytes": "1"}, 16)
  assert lib.reusable(needs_2_gib, 1)
  assert not lib.reusable(needs_2_gib, 4)
  assert not lib.reusable({"status": "skipped: train at T=8 took 40.0 s", "peak_bytes": ""}, 16)
  assert not lib.reusable({"status": "failed: RESOURCE_EXHAUSTED", "peak_bytes": ""}, 16)


def test_settings_name_the_bad_value():
  with pytest.raises(ValueError, match="unknown preset family 'lstm'"):
    lib.check_settings(["gpt", "lstm"], [256], ["train"], lib.Settings())
  with pytest.raises(ValueError, match="modes=.*'generate'"):
    lib.check_settings(["gpt"], [256], ["generate"], lib.Settings())
  with pytest.raises(ValueError, match="lengths="):
    lib.check_settings(["gpt"], [0], ["train"], lib.Settings())


def test_the_reference_gpt_comes_first_and_once():
  assert lib.families_with_reference(["qlstm", "gpt", "qlstm"]) == ["gpt", "qlstm"]
  assert lib.families_with_reference(["mamba2"]) == ["gpt", "mamba2"]


def test_the_script_modes_are_the_sweep_modes_and_long_decode():
  assert lib.split_modes(list(lib.MODES)) == (list(lib.MODES), False)
  assert lib.split_modes(["long_decode", "decode"]) == (["decode"], True)
  assert lib.LONG_DECODE not in lib.MODES      # not part of the default sweep
  with pytest.raises(ValueError, match=r"modes=\['generate'\]; expected .*long_decode"):
    lib.split_modes(["generate"])


def test_a_decode_cell_times_the_library_decode_step():
  settings = lib.Settings(vocab_size=64, warmup=1, decode_tokens=3)
  row = lib.measure("qlstm", "decode", 8, settings, "cpu")
  assert row["status"] == "ok", row
  assert row["tokens_per_s"] == pytest.approx(1 / row["seconds"])
  assert row["peak_bytes"] > row["state_bytes"] > 0
  tight = lib.Settings(vocab_size=64, memory_limit_gib=1e-9)
  skipped = lib.measure("qlstm", "decode", 8, tight, "cpu")
  assert skipped["status"].startswith("skipped: needs") and "seconds" not in skipped


def test_a_train_cell_times_the_full_step_and_reads_its_peak_memory():
  settings = lib.Settings(vocab_size=64, warmup=1, repeats=1)
  row = lib.measure("qlstm", "train", 8, settings, "cpu")
  assert row["status"] == "ok"
  assert row["tokens_per_s"] == pytest.approx(8 / row["seconds"])
  assert row["peak_bytes"] > row["state_bytes"] > 0


# ---------------------------------------------------------------------------
# The script.


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("throughput"))
  return out, _run(out, "--lengths=16,32", "--modes=prefill,decode")


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_a_tiny_sweep_writes_a_measured_row_per_cell_plots_and_crossovers(sweep):
  out, result = sweep
  rows = _rows(out)
  assert len(rows) == 2 * 2 * 2   # gpt added to qlstm, 2 lengths, prefill and decode
  for row in rows:
    assert row["status"] == "ok", row
    assert float(row["tokens_per_s"]) > 0 and int(row["peak_bytes"]) > 0, row
  for name in ("throughput.png", "decode_latency.png", "memory.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  with open(os.path.join(out, "crossovers.json")) as f:
    summary = json.load(f)
  assert summary["crossovers"]["prefill"]["qlstm_cpu_small"]["text"]
  assert summary["decode_latency"]["gpt_cpu_small"]["ratio"] > 0
  assert "matmul peak" in result.stdout and "crossover length" in result.stdout


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_the_kv_cache_grows_with_the_context_and_the_recurrent_state_does_not(sweep):
  rows = _rows(sweep[0])
  gpt = [int(_row(rows, "gpt", "prefill", t)["state_bytes"]) for t in (16, 32)]
  qlstm = [int(_row(rows, "qlstm", "prefill", t)["state_bytes"]) for t in (16, 32)]
  assert gpt[1] > gpt[0] and qlstm[0] == qlstm[1]


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_a_second_run_reuses_every_row_and_measures_nothing(sweep):
  out, _ = sweep
  before = _rows(out)
  result = _run(out, "--lengths=16,32", "--modes=prefill,decode")
  assert "0 measured, 8 reused" in result.stdout, result.stdout
  assert _rows(out) == before


def test_cells_over_the_memory_limit_are_skipped_and_the_outputs_still_written(tmp_path):
  result = _run(tmp_path, "--presets=gpt", "--lengths=16", "--modes=prefill",
                "--memory_limit_gib=1e-6")
  (row,) = _rows(tmp_path)
  assert row["status"].startswith("skipped: needs") and row["tokens_per_s"] == "", row
  assert int(row["peak_bytes"]) > 0
  for name in ("throughput.png", "decode_latency.png", "memory.png", "crossovers.json"):
    assert os.path.exists(tmp_path / name), name
  assert "skipped: needs" in result.stdout


def test_longer_lengths_are_skipped_once_a_step_took_over_the_time_limit(tmp_path):
  _run(tmp_path, "--presets=gpt", "--lengths=16,32", "--modes=prefill", "--time_limit_s=1e-9")
  rows = _rows(tmp_path)
  assert _row(rows, "gpt", "prefill", 16)["status"] == "ok"
  assert _row(rows, "gpt", "prefill", 32)["status"].startswith(
      "skipped: prefill at T=16 took"), rows


def test_an_unknown_family_ends_with_one_line_and_status_2(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.throughput", f"--out={tmp_path}", "--presets=lstm"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert "unknown preset family 'lstm'" in lines[0]


# ---------------------------------------------------------------------------
# Long decode.


def test_long_decode_samples_every_n_tokens_with_a_constant_state(tmp_path):
  lines = []
  rows = lib.long_decode("qlstm_cpu_tiny", 300, 100, str(tmp_path), vocab_size=64,
                         print_fn=lines.append)
  assert [r["tokens"] for r in rows] == [100, 200, 300]
  config = models.presets.get("qlstm_cpu_tiny", vocab_size=64, max_len=lib.PROMPT_LEN + 300)
  assert {r["state_bytes"] for r in rows} == {models.state_bytes(config, 1)}
  assert 0 < rows[0]["seconds"] < rows[1]["seconds"] < rows[2]["seconds"]
  assert all(r["rss_bytes"] > 0 and r["ms_per_token"] > 0 for r in rows)
  with open(tmp_path / lib.LONG_DECODE_CSV, newline="") as f:
    stored = list(csv.DictReader(f))
  assert list(stored[0]) == list(lib.LONG_DECODE_FIELDS)
  assert [int(r["tokens"]) for r in stored] == [100, 200, 300]
  assert [int(r["rss_bytes"]) for r in stored] == [r["rss_bytes"] for r in rows]
  for row, saved in zip(rows, stored):   # blank where the device reports no bytes_in_use
    in_use = row["device_bytes_in_use"]
    assert saved["device_bytes_in_use"] == ("" if in_use is None else str(in_use))
  assert lib.rss_growth_mib(rows) == pytest.approx(
      (rows[-1]["rss_bytes"] - rows[0]["rss_bytes"]) / 2 ** 20)
  assert any(line.startswith("rss growth") and "constant" in line for line in lines), lines


def test_long_decode_samples_the_last_token_when_every_does_not_divide_it():
  rows = lib.long_decode("qlstm_cpu_tiny", 25, 10, None, vocab_size=64, print_fn=lambda _: None)
  assert [r["tokens"] for r in rows] == [10, 20, 25]
  assert lib.rss_growth_mib(rows[:1]) is None


@pytest.mark.parametrize("preset, tokens, every, message", [
    ("qlstm_cpu_tiny", 100, 0, "long_decode_every=0; expected a positive int"),
    ("qlstm_cpu_tiny", 50, 100, "long_decode_tokens=50; expected an int >= long_decode_every=100"),
    ("lstm_cpu_tiny", 100, 10, "unknown long_decode_preset 'lstm_cpu_tiny'"),
])
def test_long_decode_names_the_bad_value_in_one_line(preset, tokens, every, message):
  with pytest.raises(ValueError) as error:
    lib.long_decode(preset, tokens, every, None)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_the_script_runs_long_decode_alone(tmp_path):
  result = _run(tmp_path, "--modes=long_decode", "--long_decode_preset=qlstm_cpu_tiny",
                "--long_decode_tokens=20", "--long_decode_every=10")
  with open(tmp_path / lib.LONG_DECODE_CSV, newline="") as f:
    assert [r["tokens"] for r in csv.DictReader(f)] == ["10", "20"]
  assert not os.path.exists(tmp_path / lib.CSV_NAME)     # no sweep
  assert "rss growth" in result.stdout


def test_bad_long_decode_flags_end_with_one_line_and_status_2(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.throughput", f"--out={tmp_path}",
       "--modes=long_decode", "--long_decode_tokens=5", "--long_decode_every=10"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert "long_decode_tokens=5; expected an int >= long_decode_every=10" in lines[0]
