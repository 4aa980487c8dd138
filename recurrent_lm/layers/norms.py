"""Normalisation layers; statistics are computed in float32 whatever the input dtype.

* :class:`RMSNorm`:   ``y = x / √(mean(x²) + ε) ⊙ scale``
* :class:`LayerNorm`: ``y = (x − mean(x)) / √(var(x) + ε) ⊙ scale + bias``
* :class:`GatedRMSNorm`: RMSNorm over groups of channels with a SiLU gate, the
  output norm of Mamba-2 (gate, then norm) and GLA (norm, then gate).

All normalise over the last axis; ``scale`` starts at ones and ``bias`` at zeros.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm.layers import _common


def _rms_normalize(x, eps: float):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def _scale_param(module: nn.Module, name: str, size: int, axis_name: str | None, init):
  return module.param(name, nn.with_logical_partitioning(init, (axis_name,)),
                      (size,), module.param_dtype)


class RMSNorm(nn.Module):
  """``y = x / √(mean(x², axis=−1) + ε) ⊙ scale``; ``x`` ``[..., C]``, ``scale`` ``[C]``.

  Attributes:
    eps: added to the mean square.
    axis_name: logical axis name of ``scale``.
    dtype: output dtype.
    param_dtype: dtype of ``scale``.
  """
  eps: float = 1e-6
  axis_name: str | None = "embed"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = _scale_param(self, "scale", x.shape[-1], self.axis_name, nn.initializers.ones)
    return (_rms_normalize(x, self.eps) * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """``y = (x − mean(x)) / √(var(x) + ε) ⊙ scale + bias`` over the last axis.

  ``x`` ``[..., C]``; ``scale`` and ``bias`` ``[C]``. ε = 1e-5 as in PyTorch
  and Languini.

  Attributes:
    eps: added to the variance.
    use_bias: learn ``bias``.
    axis_name: logical axis name of ``scale`` and ``bias``.
    dtype: output dtype.
    param_dtype: dtype of the parameters.
  """
  eps: float = 1e-5
  use_bias: bool = True
  axis_name: str | None = "embed"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    size = x.shape[-1]
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * _scale_param(self, "scale", size, self.axis_name, nn.initializers.ones)
    if self.use_bias:
      y = y + _scale_param(self, "bias", size, self.axis_name, nn.initializers.zeros)
    return y.astype(self.dtype)


class GatedRMSNorm(nn.Module):
  """RMSNorm over groups of channels, gated by ``SiLU(gate)``.

  With ``norm_g`` dividing each of ``num_groups`` equal groups of consecutive
  channels by that group's own root mean square::

      norm_before_gate=False (Mamba-2):  y = norm_g(x ⊙ SiLU(gate)) ⊙ scale
      norm_before_gate=True  (GLA):      y = norm_g(x) ⊙ scale ⊙ SiLU(gate)

  Normalising per group keeps the norm local to a head group, so it does not
  couple heads that tensor parallelism places on different devices.

  Attributes:
    num_groups: number of channel groups normalised separately; divides C.
    norm_before_gate: the order of gate and norm, see above.
    eps: added to the mean square.
    axis_name: logical axis name of ``scale``.
    dtype: output dtype.
    param_dtype: dtype of ``scale``.
  """
  num_groups: int = 1
  norm_before_gate: bool = False
  eps: float = 1e-5
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, gate):
    """Normalises and gates ``x``.

    Args:
      x: ``[..., C]``.
      gate: ``[..., C]``, the pre-activation of the SiLU gate.

    Returns:
      ``[..., C]`` in ``dtype``.
    """
    if gate.shape != x.shape:
      raise ValueError(
          f"gate has shape {_common.shape_str(gate.shape)}; expected the shape of x, "
          f"{_common.shape_str(x.shape)}")
    size = x.shape[-1]
    _common.check_divisible("channels", size, "num_groups", self.num_groups)
    scale = _scale_param(self, "scale", size, self.axis_name, nn.initializers.ones)
    x = x.astype(jnp.float32)
    silu_gate = jax.nn.silu(gate.astype(jnp.float32))
    if not self.norm_before_gate:
      x = x * silu_gate
    grouped = x.reshape(*x.shape[:-1], self.num_groups, size // self.num_groups)
    y = _rms_normalize(grouped, self.eps).reshape(x.shape) * scale
    if self.norm_before_gate:
      y = y * silu_gate
    return y.astype(self.dtype)
