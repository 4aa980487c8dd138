"""experiments/kernel_bench.py on CPU: the kernels run in interpret mode at a
tiny shape, so the run checks the script (rows, errors, JSON, targets), not speed."""

import json

from absl import flags
from absl.testing import flagsaver

from experiments import kernel_bench
from experiments import op_bench


def _row(op, impl, seq_len, fwd_bwd_ms):
  row = op_bench.empty_row(op, impl)
  row.update(seq_len=seq_len, fwd_ms=fwd_bwd_ms / 3, fwd_bwd_ms=fwd_bwd_ms)
  return row


def test_a_tiny_interpreted_run_checks_and_times_each_kernel_and_writes_json(tmp_path, capsys):
  out = tmp_path / "kb.json"
  with flagsaver.flagsaver():
    flags.FLAGS(["kernel_bench", "--seq_lens=19", "--batch=1", "--heads=1", "--head_dim=16",
                 "--chunk_size=16", "--repeats=1", "--warmup=0", "--dtype=float32",
                 "--max_error=1e-4", "--matmul_size=64", "--kernel_ops=linear_scan,mlstm",
                 f"--json_out={out}"])
    kernel_bench.main(["kernel_bench"])
  table = capsys.readouterr().out
  rows = json.loads(out.read_text())["rows"]
  impls = [(r["op"], r["impl"]) for r in rows]
  assert impls == [("linear_scan", "pallas"), ("linear_scan", "chunked"),
                   ("mlstm", "pallas"), ("mlstm", "chunked"),
                   ("dot_product_attention", "cudnn"), ("dot_product_attention", "xla"),
                   ("linear_attention_scalar", "fla.chunk_simple_gla"),
                   ("linear_attention_vector", "fla.chunk_gla")]
  for row in rows[:4] + rows[5:6]:
    assert row["error"] is None and row["fwd_bwd_ms"] > 0, row
  for row in rows[:4:2]:
    assert 0 <= row["rel_error"] <= 1e-4, row
  assert "cuDNN" in rows[4]["error"]            # no cuDNN on this CPU: recorded, not raised
  assert rows[6]["error"] and rows[7]["error"]  # no fla / CUDA torch here
  assert "WRONG" not in table and "matmul peak" in table


def test_targets_are_judged_from_the_rows():
  rows = [_row("linear_attention_scalar", "pallas", 8192, 10.0),
          _row("linear_attention_scalar", "chunked", 8192, 25.0),
          _row("linear_attention_scalar", "fla.chunk_simple_gla", 8192, 12.0),
          _row("linear_attention_scalar", "pallas", 32768, 40.0),
          _row("dot_product_attention", "cudnn", 32768, 400.0)]
  lines = kernel_bench.target_lines(rows)
  assert lines[0].startswith("T=8192: pallas 2.50x") and lines[0].endswith("MISSED")
  assert lines[1].startswith("T=8192: pallas 1.20x") and lines[1].endswith("met")
  assert lines[2].startswith("T=32768: pallas 10.00x") and lines[2].endswith("met")
  assert kernel_bench.target_lines(rows[:1]) == []
