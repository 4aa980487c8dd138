"""Resharding on restore: a checkpoint written on one mesh restores on another.

A run trained on 8 simulated devices laid out (data=2, fsdp=2, tensor=2)
restores in a one-device process (its mesh no longer fits: every array is
gathered whole), and a one-device run restores onto that 8-device mesh (every
array split by the rules). The restored parameters equal the written ones
exactly, and ``evaluate`` scores the 8-device run on one device.
"""

import subprocess
import sys

import jax
import numpy as np

from experiments import evaluate_lib
from recurrent_lm import training
from recurrent_lm.training import optimizer as optimizer_lib
from tests.training.conftest import ENV, REPO, smoke_config

EIGHT = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
MESH = dict(data=2, fsdp=2, tensor=2)


def _flat(params) -> dict[str, np.ndarray]:
  return {optimizer_lib.param_path(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


_TRAIN_ON_EIGHT = """
import sys, numpy as np, jax
from recurrent_lm import training
from tests.training.test_reshard import _flat
from tests.training.conftest import smoke_config
corpus, workdir = (sys.argv[1], sys.argv[2]), sys.argv[3]
config = smoke_config(corpus, steps=4, checkpoint_every=4, log_every=2)
config.mesh.update(data=2, fsdp=2, tensor=2)
training.train(config, workdir)
_, state = training.restore_state(workdir)
embed = state.params["embedding"]
assert embed.sharding.shard_shape(embed.shape) != embed.shape, embed.sharding
np.savez(workdir + "/params.npz", **_flat(state.params))
print("OK", len(jax.devices()))
"""

_RESTORE_ON_EIGHT = """
import sys, numpy as np, jax
from recurrent_lm import training
from tests.training.test_reshard import _flat
workdir = sys.argv[1]
mesh = training.make_mesh(data=2, fsdp=2, tensor=2)
_, state = training.restore_state(workdir, mesh)
want = np.load(workdir + "/params.npz")
got = _flat(state.params)
assert sorted(got) == sorted(want.files)
for name, value in got.items():
  np.testing.assert_array_equal(value, want[name], err_msg=name)
split = [name for name, leaf in zip(got, jax.tree_util.tree_leaves(state.params))
         if leaf.sharding.shard_shape(leaf.shape) != leaf.shape]
assert split and all(leaf.sharding.mesh.shape == mesh.shape
                     for leaf in jax.tree_util.tree_leaves(state.params))
print("OK", len(split), "of", len(got), "arrays split")
"""


def _python(script, *args):
  result = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=EIGHT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]
  return result.stdout


def test_a_run_written_on_eight_devices_restores_and_evaluates_on_one(corpus, tmp_path, capsys):
  workdir = tmp_path / "eight"
  _python(_TRAIN_ON_EIGHT, *corpus, workdir)
  assert len(jax.devices()) == 1
  config, state = training.restore_state(str(workdir))
  assert dict(config.mesh) == MESH | {"sequence": 1}
  assert "the run's mesh does not fit here" in capsys.readouterr().out
  want = np.load(workdir / "params.npz")
  for name, value in _flat(state.params).items():
    np.testing.assert_array_equal(value, want[name], err_msg=name)
  metrics = evaluate_lib.evaluate(str(workdir), "validation", max_tokens=2_000, progress=False)
  assert metrics["step"] == 4 and 1 < metrics["token_perplexity"] < 512


def test_a_run_written_on_one_device_restores_split_over_eight(corpus, tmp_path):
  workdir = tmp_path / "one"
  training.train(smoke_config(corpus, steps=4, checkpoint_every=4, log_every=2), str(workdir))
  _, state = training.restore_state(str(workdir))
  np.savez(workdir / "params.npz", **_flat(state.params))
  out = _python(_RESTORE_ON_EIGHT, workdir)
  print(out)
