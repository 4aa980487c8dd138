"""Sharding as data: one table maps logical axis names onto mesh axes.

Parameters and activations carry logical names (``batch, length, embed,
heads, kv_heads, head_dim, expert, mlp, vocab, layers``); :data:`RULES` maps them onto
the mesh axes ``data, fsdp, tensor, sequence``. A single device is the mesh of
size 1 — the same code path.

    logical      mesh axes
    batch        (data, fsdp)     data parallel; FSDP shards the batch too
    length       sequence
    embed        fsdp             parameters sharded along the model width
    heads        tensor           Megatron-style tensor parallelism
    kv_heads     tensor
    expert       tensor           expert parallelism (an expert's hidden width then stays whole)
    mlp          tensor
    vocab        tensor
    head_dim, layers              replicated
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("expert", "tensor"),     # experts shard before their hidden width
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, sequence: int = 1,
              devices=None) -> Mesh:
  """A mesh over ``devices`` (all devices when None); ``-1`` takes what is left.

  Raises:
    ValueError: when the axis sizes do not multiply to the number of devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "sequence": sequence}
  for name, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"mesh.{name}={size!r}; expected a positive int or -1")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh axes {free} are all -1; expected at most one")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if len(devices) % fixed:
      raise ValueError(f"{len(devices)} devices do not divide into mesh axes {sizes}")
    sizes[free[0]] = len(devices) // fixed
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(
        f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices; "
        f"there are {len(devices)}")
  shape = tuple(sizes[name] for name in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_shardings(logical_specs, mesh: Mesh):
  """``NamedSharding`` for every leaf of a tree of logical ``PartitionSpec``s."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, RULES)


def boxed_shardings(boxed, mesh: Mesh):
  """``NamedSharding`` for every array of a tree with logical-axis boxes.

  A box around an empty node (optax's ``MaskedNode``: the optimizer state of
  a frozen parameter) is unwrapped first, so the node stays empty instead of
  becoming a leaf the unboxed tree does not have.
  """
  is_box = lambda x: isinstance(x, nn.Partitioned)
  boxed = jax.tree_util.tree_map(
      lambda x: x.value if is_box(x) and not jax.tree_util.tree_leaves(x.value) else x,
      boxed, is_leaf=is_box)
  return logical_shardings(nn.get_partition_spec(boxed), mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of ``[batch, length]`` arrays: rows over ``data × fsdp``."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), RULES))


def process_block(batch: NamedSharding, shape: tuple[int, int]) -> tuple[slice, slice]:
  """The rows and columns of a global ``[B, L]`` batch that this process's devices hold.

  They must form one block (a mesh whose devices are grouped by process, as
  ``jax.make_mesh`` and ``make_mesh`` build them). With the rows split over
  processes each reads ``B / P`` rows; with ``sequence`` split over processes,
  a slice of every row's columns.
  """
  held = np.zeros(shape, bool)
  for index in batch.addressable_devices_indices_map(shape).values():
    held[index] = True
  rows, cols = np.flatnonzero(held.any(1)), np.flatnonzero(held.any(0))
  block = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
  if held.sum() != held[block].size:
    raise ValueError(f"process {jax.process_index()}'s devices hold a scattered part of the "
                     f"{shape} batch under {batch.spec}; expected one block (a mesh with "
                     "each process's devices together)")
  return block


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
