"""Helpers shared by the layers: projections with logical axes, input checks."""

from __future__ import annotations

from typing import Sequence

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def shape_str(shape: Sequence[object]) -> str:
  return "[" + ", ".join(str(d) for d in shape) + "]"


def dense(features: int | Sequence[int], axes: Sequence[str | None], *,
          name: str, dtype, param_dtype, axis: int | Sequence[int] = -1,
          use_bias: bool = False,
          kernel_init=nn.initializers.lecun_normal(),
          bias_init=nn.initializers.zeros) -> nn.DenseGeneral:
  """A projection whose kernel and bias carry logical axis names.

  Args:
    features: the output dims, e.g. ``(heads, head_dim)``.
    axes: logical names of every kernel axis: the contracted input axes, then
      the output axes, e.g. ``("embed", "heads", "head_dim")``.
    name: the parameter scope.
    dtype: compute dtype of the matmul.
    param_dtype: dtype of the kernel and bias.
    axis: the input axes contracted.
    use_bias: add a bias over the output axes.
    kernel_init: initialiser of the kernel; flax calls it on the
      ``[fan_in, fan_out]`` flattening, so fan-based initialisers see the true fans.
    bias_init: initialiser of the bias.
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  axes = tuple(axes)
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=use_bias, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(bias_init, axes[-len(features):]),
      name=name)


def check_input(x, d_model: int) -> None:
  """Raises unless ``x`` is a floating ``[B, T, d_model]`` array with T ≥ 1."""
  if x.ndim != 3 or x.shape[-1] != d_model or x.shape[1] < 1:
    raise ValueError(
        f"x has shape {shape_str(x.shape)}; expected [B, T, {d_model}] with T >= 1")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x has dtype {x.dtype}; expected a floating dtype")


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
  if divisor < 1 or value % divisor:
    raise ValueError(
        f"{name}={value} is not divisible by {divisor_name}={divisor}; expected a multiple")


def attention_head_dims(d_model: int, num_heads: int, head_dim: int | None,
                        num_kv_heads: int | None) -> tuple[int, int]:
  """``(head_dim, num_kv_heads)`` of (grouped-query) attention after defaults:
  ``d_model // num_heads`` and ``num_heads``; raises unless they divide."""
  if head_dim is None:
    check_divisible("d_model", d_model, "num_heads", num_heads)
    head_dim = d_model // num_heads
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  check_divisible("num_heads", num_heads, "num_kv_heads", num_kv_heads)
  return head_dim, num_kv_heads


def attention_qkv(x, *, num_heads: int, num_kv_heads: int, head_dim: int, dtype, param_dtype,
                  use_bias: bool = False, lora_rank: int = 0, lora_alpha: float = 8.0):
  """The q/k/v projections of (grouped-query) attention, in a compact method.

  ``q`` ``[B, T, H, d]``; ``k``, ``v`` ``[B, T, H_kv, d]``; scopes ``q_proj``,
  ``k_proj``, ``v_proj`` (plus ``*_lora`` deltas when ``lora_rank > 0``), so
  every layer built on them loads the same pretrained weights.
  """
  proj = dict(dtype=dtype, param_dtype=param_dtype, use_bias=use_bias, lora_rank=lora_rank,
              lora_alpha=lora_alpha)
  q = lora_dense((num_heads, head_dim), ("embed", "heads", "head_dim"), name="q_proj",
                 **proj)(x)
  k = lora_dense((num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="k_proj",
                 **proj)(x)
  v = lora_dense((num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="v_proj",
                 **proj)(x)
  return q, k, v


def dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, floor=1e-4):
  """Mamba's step-size bias: ``softplus⁻¹(Δ)`` for ``Δ`` log-uniform in
  ``[dt_min, dt_max]``, floored at ``floor``, so ``softplus(bias)`` starts at Δ."""
  log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
  dt = jnp.maximum(jnp.exp(log_dt), floor)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


# PyTorch's kaiming_uniform(a=√5), the default of nn.Linear and of peft's LoRA A:
# uniform in ±1/√fan_in, i.e. variance 1/(3·fan_in).
lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRA(nn.Module):
  """The low-rank delta of a projection (LoRA, Hu et al. 2021)::

      Δ(x) = (x A) B · alpha / rank,    A [*in, rank],  B [rank, *out]

  ``A`` starts random (:data:`lora_a_init`) and ``B`` at zero, so ``Δ = 0``
  at initialisation: the adapted projection equals the frozen one exactly,
  and at first only ``B`` receives a gradient.

  Attributes:
    features: the output dims of the adapted projection, e.g. ``(heads, head_dim)``.
    axes: logical names of the adapted kernel's axes (contracted input axes,
      then output axes), as for :func:`dense`; ``A`` is named
      ``(*in, None)`` and ``B`` ``(None, *out)``.
    rank: r ≥ 1.
    alpha: the delta is scaled by ``alpha / rank`` (peft's default alpha is 8).
    axis: the input axes contracted, as for :func:`dense`.
    dtype: compute dtype.
    param_dtype: dtype of ``A`` and ``B``.
  """
  features: Sequence[int]
  axes: Sequence[str | None]
  rank: int
  alpha: float = 8.0
  axis: int | Sequence[int] = -1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRA rank={self.rank!r}; expected a positive int")
    features = tuple(self.features)
    axes = tuple(self.axes)
    in_axes, out_axes = axes[:-len(features)], axes[-len(features):]
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.rank, in_axes + (None,), axis=self.axis, name="a",
              kernel_init=lora_a_init, **proj)(x)
    delta = dense(features, (None,) + out_axes, name="b",
                  kernel_init=nn.initializers.zeros, **proj)(h)
    return delta * jnp.asarray(self.alpha / self.rank, delta.dtype)


def lora_dense(features: int | Sequence[int], axes: Sequence[str | None], *,
               name: str, lora_rank: int = 0, lora_alpha: float = 8.0, dtype,
               param_dtype, axis: int | Sequence[int] = -1, use_bias: bool = False,
               kernel_init=nn.initializers.lecun_normal()):
  """:func:`dense` plus, when ``lora_rank > 0``, a :class:`LoRA` delta.

  Call inside a compact method; returns a function ``x ↦ y``. The base
  projection's parameters are exactly those of :func:`dense` (scope ``name``),
  so pretrained weights load unchanged; the delta lives in the sibling scope
  ``f"{name}_lora"`` (``a/kernel``, ``b/kernel``), which a training mask
  selects with the regex ``lora``.
  """
  base = dense(features, axes, name=name, dtype=dtype, param_dtype=param_dtype, axis=axis,
               use_bias=use_bias, kernel_init=kernel_init)
  if lora_rank == 0:
    return base
  features = (features,) if isinstance(features, int) else tuple(features)
  lora = LoRA(features, tuple(axes), lora_rank, lora_alpha, axis=axis, dtype=dtype,
              param_dtype=param_dtype, name=f"{name}_lora")
  return lambda x: base(x) + lora(x)


def rotate(x, positions, theta: float):
  """Rotary embedding of ``x`` ``[B, T, H, d]`` at ``positions`` ``[T]`` (float32 angles)."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, None] * inv_freq        # [T, d/2]
  cos = jnp.cos(angle)[None, :, None, :]
  sin = jnp.sin(angle)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
