"""Every architecture's train step on a mesh of all four axes equals one device.

The mesh ``data=2, fsdp=2, tensor=2, sequence=2`` (16 simulated CPU devices)
runs data parallelism, FSDP, tensor parallelism and sequence parallelism in
one step: the batch's rows split four ways, parameters along ``embed`` and
heads/MLP width/experts/vocabulary, the batch's columns in two. For each
architecture three steps from the same initial state and batch give, against
one device (the first step's learning rate is 0 in warm-up, so steps 2 and 3
check that the updates were applied alike):

- the loss of every step within 1e-5 (relative): the reductions sum in
  another order, nothing else may differ (measured worst 4.3e-7 at step 1);
- the gradient norm of every step within 2e-4 (relative). Most architectures
  agree to 5e-7; GLA's differs by up to 7.8e-5 even under pure data
  parallelism (``data=8``, nothing of the model split), with every leaf of
  its gradient off by 1e-6 to 9e-6: summation order in float32, not the
  layout.

Parameters are not compared entry by entry: Adam divides each gradient entry
by its own magnitude, so an entry whose gradient is near zero may flip sign
and move by 2·lr under a mere change of summation order.

and some parameter is really split over ``fsdp`` and some over ``tensor``.
"""

import json
import subprocess
import sys

import pytest

from tests.training.conftest import ENV, REPO

# One preset per family (models/presets.py). `make test` steps the first group:
# attention and the three sequence-parallel recurrences (linear_scan in the
# qLSTM, vector-decay linear_attention in GLA, mLSTM) and a state-space model,
# about 2 CPU-minutes; `make test-slow` the rest too (about 8 more).
_GROUPS = {
    "core": ["gpt_cpu_tiny", "qlstm_cpu_tiny", "gla_cpu_small", "mlstm_cpu_small",
             "mamba2_cpu_small"],
    "attention_and_state_space": ["based_cpu_small", "jrt_cpu_small", "mamba_cpu_small",
                                  "h3_cpu_small", "liger_cpu_small", "xlstm_cpu_small"],
    "memory_and_routing": ["titans_mal_cpu_small", "titans_mag_cpu_small",
                           "titans_mac_cpu_small", "moneta_cpu_small", "yaad_cpu_small",
                           "memora_cpu_small", "moe_cpu_small", "rmoe_cpu_small",
                           "ngram_cpu_small", "hmt_cpu_small"],
}
_SLOW = pytest.mark.slow


_SCRIPT = r"""
import json, sys
import jax, numpy as np
from recurrent_lm import models, training
from recurrent_lm.training import loop
from experiments.configs import common
from tests.training.test_train import OPTIMIZER

B, L, V = 8, 64, 512
rng = np.random.default_rng(0)
segments = np.where(np.arange(L) < 27, 1, 2)      # a document boundary inside the second shard
batch = {"inputs": rng.integers(0, V, (B, L), np.int32),
         "targets": rng.integers(0, V, (B, L), np.int32),
         "segment_ids": np.tile(segments, (B, 1)).astype(np.int32)}
LAYOUTS = {"one device": dict(data=1), "mesh": dict(data=2, fsdp=2, tensor=2, sequence=2)}

def run(config, model, axes):
  devices = jax.devices()[:int(np.prod(list(axes.values())))]
  mesh = training.make_mesh(**{**dict(data=1, fsdp=1, tensor=1, sequence=1), **axes},
                            devices=devices)
  _, init_fn, step_fn, _ = loop._build(config, model, mesh, 100)
  state = init_fn()
  split = {axis: any(axis in str(leaf.sharding.spec)
                     for leaf in jax.tree_util.tree_leaves(state.params)) for axis in axes}
  placed = {k: jax.device_put(v, training.batch_sharding(mesh)) for k, v in batch.items()}
  losses, norms = [], []
  for _ in range(3):
    state, metrics = step_fn(state, placed)
    losses.append(float(metrics["loss"]))
    norms.append(float(metrics["grad_norm"]))
  return losses, norms, split

for name in sys.argv[1:]:
  config = common.run_config(name, vocab_size=V, seq_len=L, batch_size=B)
  config.optimizer.update(OPTIMIZER)
  model = models.build(training.model_config(config))
  (loss0, norm0, _), (loss, norm, split) = (run(config, model, axes) for axes in LAYOUTS.values())
  print(json.dumps({"name": name, "loss": loss, "loss_ref": loss0, "grad_norm": norm,
                    "grad_norm_ref": norm0, "split": split}), flush=True)
"""


@pytest.mark.parametrize("group", [
    pytest.param(group, marks=() if group == "core" else _SLOW) for group in _GROUPS])
def test_every_architecture_steps_on_a_mesh_of_all_four_axes_as_on_one_device(group):
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=16"}
  result = subprocess.run([sys.executable, "-c", _SCRIPT, *_GROUPS[group]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [row["name"] for row in rows] == _GROUPS[group]
  for row in rows:
    print(row)
    assert row["loss"] == pytest.approx(row["loss_ref"], rel=1e-5), row
    assert row["grad_norm"] == pytest.approx(row["grad_norm_ref"], rel=2e-4), row
    assert row["loss"][2] < row["loss"][0], row     # the updates were applied
    assert row["split"]["fsdp"] and row["split"]["tensor"], row
