"""The training loop: data → jitted step on a mesh → metrics, checkpoints.

``train(config, workdir)`` runs (or resumes) one run. The work directory holds
everything about it::

    <workdir>/config.json        the resolved config (``evaluate.py`` rebuilds the model from it),
                                 with ``config_version``, the layout of this file
    <workdir>/tokenizer.model    the run's sentencepiece tokenizer (``generate.py`` reads it)
    <workdir>/checkpoints/<N>/   orbax: train state + grain iterator position
    <workdir>/metrics.jsonl      one JSON line per logged step
    <workdir>/tensorboard/       the same scalars for TensorBoard
    <workdir>/summary.json       figures of the finished run

Guarantees:

* **Exact resume.** Re-running the same command continues from the newest
  readable checkpoint with the same parameters, optimizer state and data
  position, so the loss trajectory equals an uninterrupted run's (bitwise on
  CPU) and no batch is skipped or repeated. ``metrics.jsonl`` is cut back to
  the checkpoint so it holds one trajectory.
* **Nothing overwritten.** A work directory holding a run of a different
  config is refused before anything is written.
* **Stops loudly.** A non-finite loss stops the run with an error naming the
  step; checkpoints are only written after the losses before them were
  checked, so the newest one is good. SIGTERM/SIGINT save a checkpoint first.

With ``train.time_budget_s > 0`` and ``train.steps == 0`` the number of steps
is set Languini-style: the step is timed on random tokens after warm-up and
``steps = budget / seconds per step``; the result is written into the stored
config, so a resumed run keeps the same schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import ml_collections
import numpy as np
import tensorboardX
import tqdm

import recurrent_lm
from recurrent_lm import data as data_lib
from recurrent_lm import models
from recurrent_lm.training import checkpoint as checkpoint_lib
from recurrent_lm.training import optimizer as optimizer_lib
from recurrent_lm.training import sharding
from recurrent_lm.training import step as step_lib
from recurrent_lm.training import throughput

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
# The layout of config.json; a stored config without the field is version 1.
# Raise it when a change makes stored configs unreadable to older code (or
# the reverse), so that either side says so in one line.
CONFIG_VERSION = 1
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

# Fields that may differ when a run is resumed: how often it logs and keeps
# checkpoints, where the (identical) data cache lives, how it is evaluated.
_RESUMABLE_CHANGES = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                      "data.data_dir", "eval")
# Fields added after runs were stored; a stored run without one ran as if it
# had this value, so resuming it with that value is no change.
_ADDED_FIELDS = {"train.mlm_weight": 0.25, "train.mlm_prob": 0.15, "train.init_from": "",
                 "optimizer.trainable": ""}


# ---------------------------------------------------------------------------
# Config and work directory.


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _plain(config) -> dict:
  """A config as plain JSON data (tuples become lists), for comparing and storing."""
  config = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  return json.loads(json.dumps(config))


def model_config(config) -> "models.ModelConfig | models.HMTConfig":
  """The model config of a run config's ``model`` section (HMT's when it has a ``backbone``)."""
  return models.config_from_dict(_plain(config)["model"])


def check_config(config) -> None:
  """Raises ``ValueError`` with one line naming the first bad field."""
  for name, value in (("data.seq_len", config.data.seq_len),
                      ("data.batch_size", config.data.batch_size),
                      ("data.vocab_size", config.data.vocab_size),
                      ("train.log_every", config.train.log_every),
                      ("train.checkpoint_every", config.train.checkpoint_every),
                      ("train.keep_checkpoints", config.train.keep_checkpoints),
                      ("train.accum_steps", config.train.accum_steps)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name}={value!r}; expected a positive int")
  model = model_config(config)
  if model.vocab_size != config.data.vocab_size:
    raise ValueError(f"model.vocab_size={model.vocab_size} != data.vocab_size="
                     f"{config.data.vocab_size}; expected them equal")
  if config.train.steps < 0 or config.train.time_budget_s < 0:
    raise ValueError(f"train.steps={config.train.steps}, train.time_budget_s="
                     f"{config.train.time_budget_s}; expected non-negative values")
  if config.train.steps == 0 and config.train.time_budget_s == 0:
    raise ValueError("train.steps=0 and train.time_budget_s=0; expected one of them set")
  if not 0 <= config.train.mlm_weight or not 0 < config.train.mlm_prob < 1:
    raise ValueError(f"train.mlm_weight={config.train.mlm_weight}, train.mlm_prob="
                     f"{config.train.mlm_prob}; expected mlm_weight >= 0 and 0 < mlm_prob < 1")
  if config.data.batch_size % config.train.accum_steps:
    raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by "
                     f"train.accum_steps={config.train.accum_steps}")
  if (isinstance(model, models.ModelConfig) and model.positions == "learned"
      and config.data.seq_len > model.max_len):
    raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_len="
                     f"{model.max_len}, the rows of the learned position table")
  # Dimension errors of the mixers (heads not dividing the width, …) surface
  # when the model is traced; do it now, before the work directory is touched.
  params = jax.eval_shape(models.build(model).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 1), jnp.int32))["params"]
  if config.optimizer.trainable:
    optimizer_lib.make_optimizer(config.optimizer, 1)   # a bad pattern is one clear line
    labels = jax.tree_util.tree_leaves(
        optimizer_lib.trainable_labels(config.optimizer.trainable)(nn.meta.unbox(params)))
    if "train" not in labels:
      raise ValueError(f"optimizer.trainable={config.optimizer.trainable!r} matches no "
                       "parameter; expected a pattern of parameter paths, e.g. 'lora'")
  if config.train.init_from and not os.path.isdir(os.path.join(config.train.init_from,
                                                               "checkpoints")):
    raise ValueError(f"train.init_from={config.train.init_from!r} holds no checkpoints; "
                     "expected the work directory of a training run")


def _differences(stored: dict, new: dict) -> list[str]:
  flat_stored, flat_new = _flatten(stored), _flatten(new)
  diffs = []
  for name in sorted(set(flat_stored) | set(flat_new)):
    if any(name == f or name.startswith(f + ".") for f in _RESUMABLE_CHANGES):
      continue
    if name == "train.steps" and new["train"]["time_budget_s"] > 0 and new["train"]["steps"] == 0:
      continue   # resolved from the budget when the run started
    stored_value = flat_stored.get(name, _ADDED_FIELDS.get(name, "<absent>"))
    if stored_value != flat_new.get(name, "<absent>"):
      diffs.append(f"{name}: {stored_value!r} -> "
                   f"{flat_new.get(name, '<absent>')!r}")
  return diffs


def _read_stored(path: str) -> dict:
  """A stored ``config.json`` as plain data, without its ``config_version``.

  Raises:
    ValueError: the file is not JSON, or is of another ``config_version``.
  """
  try:
    with open(path) as f:
      stored = json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON ({error}); expected the config train.py "
                     "wrote") from None
  version = stored.pop("config_version", 1)
  if version != CONFIG_VERSION:
    raise ValueError(f"{path} has config_version={version!r}; this recurrent_lm "
                     f"{recurrent_lm.__version__} reads config_version={CONFIG_VERSION} (the run "
                     "was written by another release: use that release)")
  return stored


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config stored in ``workdir`` (checked to be of this ``CONFIG_VERSION``)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; expected a work directory of train.py")
  return ml_collections.ConfigDict(_read_stored(path))


def write_json_atomic(path: str, payload) -> None:
  directory = os.path.dirname(path)
  with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(f.name, path)


def _keep_tokenizer(source: str, target: str) -> None:
  """Copies the run's tokenizer into its work directory (atomically), so the
  run can be read without the data cache; a resumed run must find the same."""
  with open(source, "rb") as f:
    model = f.read()
  if os.path.exists(target):
    with open(target, "rb") as f:
      if f.read() != model:
        raise ValueError(f"{target} differs from the data cache's tokenizer {source} (the "
                         "cache was rebuilt since the run started); expected the same "
                         "tokenizer to resume: use a new --workdir")
    return
  with tempfile.NamedTemporaryFile("wb", dir=os.path.dirname(target), delete=False,
                                   suffix=".tmp") as f:
    f.write(model)
  os.replace(f.name, target)


def _truncate_metrics(path: str, last_step: int) -> None:
  """Keeps the lines of ``path`` up to ``last_step`` (the restored checkpoint)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False,
                                   suffix=".tmp") as f:
    f.writelines(lines)
  os.replace(f.name, path)


# ---------------------------------------------------------------------------
# Pieces of the loop.


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks after every step."""

  def __init__(self):
    self.signum = None

  @contextlib.contextmanager
  def installed(self):
    previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum


def _prepare_data(config) -> data_lib.PreparedData:
  """The corpus, tokenizer and shards; built by process 0 while the others wait."""
  def prepare():
    return data_lib.prepare_dataset(config.data.data_dir or None, config.data.corpus,
                                    config.data.vocab_size)
  if jax.process_count() == 1:
    return prepare()
  if jax.process_index() == 0:
    prepared = prepare()
  multihost_utils.sync_global_devices("recurrent_lm: data prepared")
  return prepared if jax.process_index() == 0 else prepare()


class _BatchFeed:
  """This process's part of every global ``[B, L]`` batch, and its assembly into ``jax.Array``s.

  The process reads the rows its devices hold (``sharding.process_block``)
  from ``lm_dataset`` — the same rows of the same global batch whatever the
  number of processes — and keeps the columns they hold.
  """

  def __init__(self, config, batch_sharding):
    self.shape = (config.data.batch_size, config.data.seq_len)
    self.sharding = batch_sharding
    self.vocab_size = config.data.vocab_size
    self.rows, self.cols = sharding.process_block(batch_sharding, self.shape)
    self.rows_per_process = self.rows.stop - self.rows.start

  def dataset(self, paths, seed: int):
    return data_lib.lm_dataset(paths, seq_len=self.shape[1], batch_size=self.shape[0], seed=seed,
                               shard_index=self.rows.start // self.rows_per_process,
                               shard_count=self.shape[0] // self.rows_per_process)

  def __call__(self, batch: dict[str, np.ndarray], step: int) -> dict[str, jax.Array]:
    """Host rows → global ``jax.Array``s, checking token ids on the way in."""
    for name in ("inputs", "targets"):
      low, high = int(batch[name].min()), int(batch[name].max())
      if low < 0 or high >= self.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} in {name} of batch {step} is outside "
                         f"[0, {self.vocab_size}); the token shards do not match the "
                         "tokenizer/model vocabulary")
    return {name: jax.make_array_from_process_local_data(
        self.sharding, np.asarray(value[:, self.cols]), self.shape)
            for name, value in batch.items() if name in ("inputs", "targets", "segment_ids")}

  def random(self) -> dict[str, jax.Array]:
    """A batch of random tokens (for timing)."""
    rng = np.random.default_rng(0)
    shape = (self.rows_per_process, self.shape[1])
    batch = {"inputs": rng.integers(0, self.vocab_size, shape, np.int32),
             "targets": rng.integers(0, self.vocab_size, shape, np.int32),
             "segment_ids": np.ones(shape, np.int32)}
    return self(batch, 0)


class _Logger:
  """Writes interval metrics to ``metrics.jsonl``, TensorBoard and the progress bar."""

  def __init__(self, workdir: str, start_step: int, total_steps: int, flops_per_token: float,
               peak_flops: float, enabled: bool = True):
    self._path = os.path.join(workdir, METRICS_FILE) if enabled else None
    self._writer = tensorboardX.SummaryWriter(
        os.path.join(workdir, "tensorboard"), purge_step=start_step + 1) if enabled else None
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                          dynamic_ncols=True, mininterval=1.0, disable=not enabled)
    self._flops_per_token = flops_per_token
    self._peak = peak_flops
    self._time = time.perf_counter()
    self.tokens_per_s: list[float] = []

  def restart_clock(self):
    self._time = time.perf_counter()

  def log(self, rows: list[tuple[int, dict[str, float]]], learning_rate: float) -> None:
    """``rows`` are ``(step, metrics)`` of the steps since the last call, finite."""
    now = time.perf_counter()
    elapsed, self._time = now - self._time, now
    nll = sum(m["nll_sum"] for _, m in rows)
    tokens = sum(m["tokens"] for _, m in rows)
    tokens_read = sum(m["input_tokens"] for _, m in rows)
    num_bytes = sum(m.get("bytes", 0.0) for _, m in rows)
    step, last = rows[-1]
    tokens_per_s = tokens_read / max(elapsed, 1e-9)
    self.tokens_per_s.append(tokens_per_s)
    record = {
        "step": step, "loss": nll / tokens, "perplexity": math.exp(min(nll / tokens, 700)),
        "tokens_per_s": tokens_per_s,
        "mfu": self._flops_per_token * tokens_per_s / self._peak,
        "grad_norm": last["grad_norm"], "learning_rate": learning_rate,
    }
    if "mlm_nll_sum" in last:
      record["mlm_loss"] = (sum(m["mlm_nll_sum"] for _, m in rows)
                            / max(sum(m["mlm_tokens"] for _, m in rows), 1.0))
    for name in ("load_balance_loss", "dropped_fraction"):   # mixtures of experts
      if name in last:
        record[name] = sum(m[name] for _, m in rows) / len(rows)
    if num_bytes:
      record["bits_per_byte"] = nll / num_bytes / math.log(2)
      record["byte_perplexity"] = math.exp(nll / num_bytes)
    if self._path is None:
      return
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name != "step":
        self._writer.add_scalar(f"train/{name}", value, step)
    self._bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                          mfu=f"{100 * record['mfu']:.1f}%", refresh=False)
    self._bar.update(step - self._bar.n)

  def close(self):
    self._bar.close()
    if self._writer is not None:
      self._writer.close()


# ---------------------------------------------------------------------------
# The loop.


def _build(config, model, mesh, steps: int, byte_lengths=None):
  """``(optimizer, init_fn, step_fn, state_sharding)`` of a run on ``mesh``.

  ``init_fn()`` makes a fresh ``TrainState`` laid out by the sharding rules;
  ``step_fn(state, batch)`` is the jitted train step (the state is donated).
  """
  optimizer = optimizer_lib.make_optimizer(config.optimizer, steps)

  def init():
    return step_lib.init_state(model, optimizer, (1, 1), config.train.seed)
  boxed = jax.eval_shape(init)
  state_sharding = sharding.boxed_shardings(boxed, mesh)
  init_fn = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=state_sharding)
  train_step = step_lib.make_train_step(
      model, optimizer, accum_steps=config.train.accum_steps,
      byte_lengths=None if byte_lengths is None else jnp.asarray(byte_lengths),
      # .get: runs stored before these fields existed restore too.
      mlm_weight=config.train.get("mlm_weight", _ADDED_FIELDS["train.mlm_weight"]),
      mlm_prob=config.train.get("mlm_prob", _ADDED_FIELDS["train.mlm_prob"]))

  def on_mesh(state, batch):
    # Traced with the mesh in context, so the recurrences see a split `sequence`
    # axis and run sequence-parallel (ops.sequence_parallel).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return train_step(state, batch)
  step_fn = jax.jit(
      on_mesh, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
  return optimizer, init_fn, step_fn, state_sharding


def _abstract(init_fn, state_sharding):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(init_fn), state_sharding)


def restore_mesh(config, devices=None) -> Mesh:
  """The mesh a run restores onto here: its own axes (``config.mesh``) when they
  fit the devices, else every device on the ``data`` axis (printed)."""
  try:
    return sharding.make_mesh(**config.mesh.to_dict(), devices=devices)
  except ValueError as error:
    mesh = sharding.make_mesh(devices=devices)
    print(f"the run's mesh does not fit here ({error}); restoring onto "
          f"{dict(mesh.shape)}", flush=True)
    return mesh


def restore_state(workdir: str, mesh: Mesh | None = None):
  """``(config, TrainState)`` of the newest readable checkpoint of a run.

  The model and optimizer are rebuilt from ``<workdir>/config.json`` alone.
  The arrays are resharded onto ``mesh`` by the rules, whatever mesh or
  device count wrote them (orbax reads each shard's slice of the stored
  arrays); ``mesh`` None is :func:`restore_mesh`.
  """
  config = load_config(workdir)
  model = models.build(model_config(config))
  mesh = restore_mesh(config) if mesh is None else mesh
  _, init_fn, _, state_sharding = _build(config, model, mesh, config.train.steps)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                             keep=config.train.keep_checkpoints)
  try:
    state = checkpointer.restore_latest(_abstract(init_fn, state_sharding))
  finally:
    checkpointer.close()
  if state is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no readable checkpoint")
  return config, state


def _initialise_from(state, source: str, state_sharding):
  """``state`` with every parameter that ``source``'s newest checkpoint also
  has (same path, same shape) copied from it; the others keep their fresh
  values. How a Liger model starts from its Transformer's weights."""
  _, source_state = restore_state(source)
  source_params = {optimizer_lib.param_path(path): leaf for path, leaf
                   in jax.tree_util.tree_flatten_with_path(source_state.params)[0]}
  copied, fresh = 0, []

  def pick(path, leaf):
    nonlocal copied
    name = optimizer_lib.param_path(path)
    if name not in source_params:
      fresh.append(name)
      return leaf
    if source_params[name].shape != leaf.shape:
      raise ValueError(f"parameter {name} has shape {list(source_params[name].shape)} in "
                       f"{source}; expected {list(leaf.shape)}")
    copied += 1
    return source_params[name].astype(leaf.dtype)
  params = jax.tree_util.tree_map_with_path(pick, state.params)
  if not copied:
    raise ValueError(f"no parameter of {source} matches the model; expected a run of a "
                     "model with the same parameter names")
  print(f"initialised {copied} parameter arrays from {source}; "
        f"{len(fresh)} fresh: {', '.join(fresh[:6])}{' …' if len(fresh) > 6 else ''}",
        flush=True)
  return state.replace(params=jax.device_put(params, state_sharding.params))


def step_seconds(config: ml_collections.ConfigDict, *, warmup: int = 1, repeats: int = 5,
                 byte_lengths=None) -> float:
  """Seconds of one training step of ``config``, Languini's way: the full step
  (forward, backward, optimizer update) on random tokens of the run's batch
  shape, on the run's mesh, median of ``repeats`` after compiling and
  ``warmup`` untimed steps. Every process gets the same figure (process 0's)."""
  check_config(config)
  mesh = sharding.make_mesh(**config.mesh.to_dict())
  if byte_lengths is None:   # what a token's bytes are does not change the step's cost
    byte_lengths = np.ones(config.data.vocab_size, np.int32)
  # The schedule's length does not change the step's cost either.
  _, init_fn, step_fn, _ = _build(config, models.build(model_config(config)), mesh, 1000,
                                  byte_lengths)
  seconds = throughput.step_seconds(step_fn, init_fn(),
                                    _BatchFeed(config, sharding.batch_sharding(mesh)).random(),
                                    warmup=1 + warmup, repeats=repeats)
  if jax.process_count() > 1:   # every process must run the same schedule
    seconds = float(multihost_utils.broadcast_one_to_all(np.float64(seconds)))
  return seconds


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run of ``config`` in ``workdir``; returns its summary.

  Raises:
    ValueError: a bad config, or ``workdir`` holds a run of another config.
    FloatingPointError: the loss became non-finite (the message names the step).
    SystemExit: on SIGTERM/SIGINT, after saving a checkpoint.
  """
  check_config(config)
  workdir = os.path.abspath(workdir)
  config_path = os.path.join(workdir, CONFIG_FILE)
  stored = None
  if os.path.exists(config_path):
    stored = _read_stored(config_path)
    diffs = _differences(stored, _plain(config))
    if diffs:
      raise ValueError(f"workdir {workdir} holds a run of a different config "
                       f"({'; '.join(diffs[:3])}); use a new --workdir")
  elif os.path.isdir(workdir) and os.listdir(workdir):
    raise ValueError(f"workdir {workdir} is not empty and holds no {CONFIG_FILE}; "
                     "expected a new or empty directory, or one of a previous run")

  prepared = _prepare_data(config)
  if prepared.tokenizer.vocab_size != config.data.vocab_size:
    raise ValueError(f"the tokenizer has {prepared.tokenizer.vocab_size} tokens; "
                     f"expected data.vocab_size={config.data.vocab_size}")
  model_cfg = model_config(config)
  model = models.build(model_cfg)
  mesh = sharding.make_mesh(**config.mesh.to_dict())
  feed = _BatchFeed(config, sharding.batch_sharding(mesh))

  def build(steps):
    return _build(config, model, mesh, steps, prepared.tokenizer.byte_lengths)

  steps = stored["train"]["steps"] if stored else config.train.steps
  if not steps:
    seconds = step_seconds(config, byte_lengths=prepared.tokenizer.byte_lengths)
    steps = max(1, int(config.train.time_budget_s / seconds))
    print(f"{seconds * 1e3:.1f} ms per step on random tokens: {steps} steps fit in "
          f"{config.train.time_budget_s:.0f} s", flush=True)
  optimizer, init_fn, step_fn, state_sharding = build(steps)
  resolved = _plain(config)
  resolved["train"]["steps"] = steps
  lead = jax.process_index() == 0    # one process writes the run's files
  if stored is None and lead:
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(config_path, {"config_version": CONFIG_VERSION, **resolved})
  if lead:
    _keep_tokenizer(prepared.tokenizer_path, os.path.join(workdir, TOKENIZER_FILE))

  train_iter = iter(feed.dataset(prepared.shards["train"], config.data.seed))
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                             keep=config.train.keep_checkpoints)
  state = checkpointer.restore_latest(_abstract(init_fn, state_sharding), train_iter)
  if state is None:
    state = init_fn()
    if config.train.init_from:
      state = _initialise_from(state, config.train.init_from, state_sharding)
  start = int(state.step)
  if lead:
    _truncate_metrics(os.path.join(workdir, METRICS_FILE), start)
  if start:
    print(f"resuming from the checkpoint at step {start}", flush=True)

  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  flops_per_token = throughput.flops_per_token(model_cfg, state.params, config.data.seq_len)
  peak = throughput.matmul_peak_flops()
  schedule = optimizer_lib.learning_rate(config.optimizer, steps)
  logger = _Logger(workdir, start, steps, flops_per_token, peak, enabled=lead)
  stop = _StopSignal()
  pending: list[tuple[int, Any]] = []     # device metrics not yet fetched
  checked: list[tuple[int, dict]] = []    # fetched and finite, not yet logged
  last_saved = start if checkpointer.steps() else None
  tokens_seen = start * config.data.batch_size * config.data.seq_len
  train_seconds = 0.0
  compiled = None
  try:
    with stop.installed():
      for step in range(start, steps):
        batch = feed(next(train_iter), step)
        if compiled is None:   # compile outside the timed intervals
          compiled = step_fn.lower(state, batch).compile()
          logger.restart_clock()
          interval_start = time.perf_counter()
        state, metrics = compiled(state, batch)
        pending.append((step + 1, metrics))
        done = step + 1
        stopping = stop.signum is not None   # read once: a signal may land mid-iteration
        save = done % config.train.checkpoint_every == 0 or done == steps or stopping
        log = done % config.train.log_every == 0 or done == steps or stopping
        if save or log:   # every loss before a checkpoint is checked first
          rows = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
          pending = []
          for s, m in rows:
            if not math.isfinite(m["loss"]):
              kept = (f"the newest checkpoint, step {last_saved}, predates it"
                      if last_saved else "no checkpoint was saved before it")
              raise FloatingPointError(f"loss is {m['loss']} at step {s}; stopped ({kept})")
          checked += rows
        if log:
          train_seconds += time.perf_counter() - interval_start
          logger.log(checked, float(schedule(done - 1)))
          checked = []
          tokens_seen = done * config.data.batch_size * config.data.seq_len
          interval_start = time.perf_counter()
        if save:
          checkpointer.save(done, state, train_iter)
          last_saved = done
        if stopping:
          checkpointer.wait()
          print(f"stopped by signal {stop.signum} after step {done}; checkpoint saved",
                flush=True)
          raise SystemExit(128 + stop.signum)
  finally:
    logger.close()
    checkpointer.close()

  summary = {
      "params": num_params, "steps": steps, "tokens_seen": tokens_seen,
      "tokens_per_s": statistics.median(logger.tokens_per_s) if logger.tokens_per_s else None,
      "train_seconds": train_seconds, "flops_per_token": flops_per_token,
      "peak_flops": peak, "final_loss": None,
  }
  if summary["tokens_per_s"]:
    summary["mfu"] = flops_per_token * summary["tokens_per_s"] / peak
  metrics_path = os.path.join(workdir, METRICS_FILE)
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      lines = [json.loads(line) for line in f if line.strip()]
    if lines:
      summary["final_loss"] = lines[-1]["loss"]
  if lead:
    write_json_atomic(os.path.join(workdir, SUMMARY_FILE), summary)
  return summary
