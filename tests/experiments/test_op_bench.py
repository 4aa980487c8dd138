"""experiments/op_bench.py at a tiny shape: complete rows for every op and
implementation, the FLOP formulas, the table, and JSON that never overwrites."""

import functools
import importlib
import json

from absl import flags
from absl.testing import flagsaver
import pytest

from experiments import op_bench

# `recurrent_lm.ops.linear_attention` the attribute is the function; the module
# holding the registry has to be imported by name.
_LA_REGISTRY = importlib.import_module("recurrent_lm.ops.linear_attention").REGISTRY

TINY = op_bench.BenchShape(batch=1, seq_len=64, heads=2, head_dim=16, chunk_size=16)
_PEAK = 50.0  # a stand-in matmul peak in GFLOP/s; only its use is checked


def _row(op, impl, fwd_bwd_ms, **fields):
  row = op_bench.empty_row(op, impl)
  fwd_ms = None if fwd_bwd_ms is None else fwd_bwd_ms / 3
  row.update({"resolved_impl": impl, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, **fields})
  return row


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_a_tiny_run_of_every_op_and_impl_gives_complete_rows():
  # One run for every check: with `pytest -n 2` a shared fixture would be
  # computed once per worker.
  pairs = op_bench.plan(list(op_bench.OPS))
  rows = op_bench.run_benchmark(pairs, TINY, repeats=1, warmup=1, peak_gflops=_PEAK)

  assert [(r["op"], r["impl"]) for r in rows] == pairs
  assert {r["op"] for r in rows} == set(op_bench.OPS)
  recurrent = {r["op"]: r["fwd_bwd_ms"] for r in rows if r["impl"] == "recurrent"}
  for row in rows:
    assert tuple(row) == op_bench.ROW_KEYS
    assert row["error"] is None, (row["op"], row["impl"], row["error"])
    for key in ("fwd_ms", "fwd_bwd_ms", "compile_fwd_s", "compile_fwd_bwd_s", "wall_s",
                "flops_fwd", "gflops_fwd", "gflops_fwd_bwd"):
      assert row[key] > 0, (key, row)
    assert row["flops_fwd_bwd"] == 3 * row["flops_fwd"]
    assert row["pct_peak_fwd_bwd"] == pytest.approx(100 * row["gflops_fwd_bwd"] / _PEAK)
    if row["op"] in recurrent:
      assert row["speedup_fwd_bwd"] == pytest.approx(recurrent[row["op"]] / row["fwd_bwd_ms"])
    else:
      assert row["speedup_fwd_bwd"] is None
  assert len(op_bench.format_table(rows).splitlines()) == 2 + len(rows)


def test_default_impls_are_the_registry_and_auto_without_the_interpreted_kernel_on_cpu():
  assert "pallas" in _LA_REGISTRY.names
  assert op_bench.default_impls("linear_attention_scalar") == tuple(
      name for name in _LA_REGISTRY.names if name != "pallas") + ("auto",)
  assert op_bench.default_impls("causal_conv1d") == ("default",)


def test_speedups_are_relative_to_the_same_ops_recurrent_row():
  rows = op_bench.add_speedups([
      _row("linear_scan", "recurrent", 8.0), _row("linear_scan", "chunked", 2.0),
      _row("linear_scan", "associative", None, error="failed"),
      _row("causal_conv1d", "default", 1.0)])
  assert [r["speedup_fwd_bwd"] for r in rows] == [1.0, 4.0, None, None]
  assert rows[1]["speedup_fwd"] == pytest.approx(4.0)


def test_chunked_linear_attention_flops_by_hand():
  # Per head T·(2C·K + 2C·V + 4·K·V) = 64·(2·16·16 + 2·16·16 + 4·16·16) = 64·2048.
  assert op_bench.flop_count("linear_attention_scalar", "chunked", TINY) == 2 * 64 * 2048
  # normalize: V = 17 → 64·(512 + 544 + 1088) per head.
  assert op_bench.flop_count("linear_attention_normalized", "chunked", TINY) == 2 * 64 * 2144
  assert op_bench.flop_count("linear_attention_none", "recurrent", TINY) == 2 * 64 * 4 * 256
  assert op_bench.flop_count("linear_attention_none", "parallel", TINY) == 2 * 2 * 64**2 * 32


def test_chunked_flops_count_the_padded_length():
  shape = op_bench.BenchShape(batch=1, seq_len=65, heads=1, head_dim=16, chunk_size=16)
  assert op_bench.flop_count("linear_attention_none", "chunked", shape) == 80 * 2048


def test_auto_is_counted_as_the_impl_it_resolves_to():
  resolved = op_bench.resolve_impl("linear_attention_vector", "auto", TINY)
  assert resolved in _LA_REGISTRY.names
  assert op_bench.flop_count("linear_attention_vector", "auto", TINY) == op_bench.flop_count(
      "linear_attention_vector", resolved, TINY)


def test_other_flop_formulas():
  width = 2 * 16
  assert op_bench.flop_count("linear_scan", "chunked", TINY) == 2 * 64 * width
  assert op_bench.flop_count("causal_conv1d", "default", TINY) == 8 * 64 * width
  assert op_bench.flop_count("softmax_attention", "default", TINY) == 4 * 64**2 * 16 * 2
  # The 256 window is longer than T = 64: every earlier key is visible.
  assert op_bench.flop_count("softmax_attention_window", "default", TINY) == 4 * 64**2 * 16 * 2
  long = op_bench.BenchShape(batch=1, seq_len=1024, heads=2, head_dim=16)
  assert op_bench.flop_count("softmax_attention_window", "default", long) == 4 * 1024 * 256 * 16 * 2


def test_table_has_a_line_for_every_row():
  rows = op_bench.add_speedups([
      _row("linear_scan", "recurrent", 8.0, gflops_fwd_bwd=1.5),
      _row("linear_scan", "auto", 2.0, resolved_impl="chunked"),
      _row("causal_conv1d", "default", None, error="MemoryError: " + "x" * 200)])
  lines = op_bench.format_table(rows).splitlines()
  assert "fwd+bwd ms" in lines[0] and "vs recurrent" in lines[0]
  assert [line.split()[:2] for line in lines[2:]] == [
      ["linear_scan", "recurrent"], ["linear_scan", "auto→chunked"],
      ["causal_conv1d", "default"]]
  assert "4.00×" in lines[3]
  assert "MemoryError: xxx" in lines[4] and len(lines[4]) < 200


def test_an_unsupported_call_is_recorded_not_raised():
  registry = importlib.import_module("recurrent_lm.ops.linear_attention").REGISTRY
  registry.register("never", lambda *a, **k: None, supports=lambda **call: False)
  try:
    shape = op_bench.BenchShape(batch=1, seq_len=16, heads=1, head_dim=4)
    row = op_bench.bench_op("linear_attention_none", "never", shape, repeats=1)
  finally:
    registry._impls.pop("never")
  assert "does not support" in row["error"]
  assert row["fwd_ms"] is None and row["gflops_fwd_bwd"] is None
  assert row["error"][:40] in op_bench.format_table([row])


def test_skip_recurrent_above_records_the_skip():
  rows = op_bench.run_benchmark([("linear_scan", "recurrent")], TINY,
                                skip_recurrent_above=32)
  assert rows[0]["error"].startswith("skipped: seq_len=64")
  assert rows[0]["fwd_ms"] is None


def test_plan_rejects_an_impl_no_op_has():
  with pytest.raises(ValueError, match="'fused'"):
    op_bench.plan(["linear_scan"], ["fused"])
  assert op_bench.plan(["linear_scan", "causal_conv1d"], ["chunked"]) == [
      ("linear_scan", "chunked")]


def test_matmul_peak_reports_both_figures():
  matmul = op_bench.measure_matmul_peak(64, (8, 16), repeats=1)
  assert matmul["peak_gflops"] == matmul["dense"]["gflops"] > 0
  assert matmul["batched"]["flops"] == 2 * 8 * 16**3
  assert "64×64×64" in op_bench.format_matmul(matmul)


def test_existing_json_is_not_overwritten(tmp_path):
  path = tmp_path / "new_dir" / "bench.json"
  first = op_bench.write_json(path, {"run": 1})
  second = op_bench.write_json(path, {"run": 2})
  third = op_bench.write_json(path, {"run": 3})
  assert first == path
  assert second == path.with_name("bench-1.json")
  assert third == path.with_name("bench-2.json")
  assert json.loads(path.read_text()) == {"run": 1}
  assert json.loads(second.read_text()) == {"run": 2}


def test_main_writes_beside_an_existing_json(tmp_path, monkeypatch, capsys):
  path = tmp_path / "op_bench.json"
  path.write_text("keep me")
  monkeypatch.setattr(op_bench, "measure_matmul_peak",
                      functools.partial(op_bench.measure_matmul_peak, 32, (4, 8)))
  with flagsaver.flagsaver():
    flags.FLAGS(["op_bench", "--seq_len=16", "--heads=1", "--head_dim=8", "--repeats=1",
                 "--ops=causal_conv1d", f"--json_out={path}"])
    op_bench.main(["op_bench"])
  captured = capsys.readouterr()
  assert path.read_text() == "keep me"
  written = path.with_name("op_bench-1.json")
  assert "exists; writing to" in captured.err
  assert f"wrote {written}" in captured.out
  result = json.loads(written.read_text())
  assert result["complete"] and result["flags"]["seq_len"] == 16
  assert result["machine"]["backend"] and result["matmul"]["peak_gflops"] > 0
  assert [(r["op"], r["impl"]) for r in result["rows"]] == [("causal_conv1d", "default")]
