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


def dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, floor=1e-4):
  """Mamba's step-size bias: ``softplus⁻¹(Δ)`` for ``Δ`` log-uniform in
  ``[dt_min, dt_max]``, floored at ``floor``, so ``softplus(bias)`` starts at Δ."""
  log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
  dt = jnp.maximum(jnp.exp(log_dt), floor)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
