"""Short depthwise causal convolution over time, with a carried input state.

    y_t = Σ_{i=0}^{W−1} weight_i ⊙ x_{t−(W−1)+i}  (+ bias)

Positions before the start of the call read the state: the previous ``W−1``
inputs, oldest first. ``W`` is small (3–4 in H3, Mamba, BaseConv), so the op
is ``W`` shifted multiply-adds rather than a general convolution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from recurrent_lm.ops import _checks


def _taps_fwd(xs, weight, same):
  width, time = weight.shape[0], xs.shape[1] - weight.shape[0] + 1
  y = 0.0
  for i in range(width):
    tap = xs[:, i:i + time] * weight[i]
    y = y + (tap if same is None else jnp.where(same[i][..., None], tap, 0.0))
  return y, (xs, weight, same)


def _taps_bwd(residuals, d_y):
  """By hand: XLA's autodiff of the taps reduces ``d_weight`` over sliced
  3-D views, ~10× slower on CPU than the flattened 2-D reductions here."""
  xs, weight, same = residuals
  width, dim = weight.shape
  time = xs.shape[1] - width + 1
  d_xs, d_weight = 0.0, []
  for i in range(width):
    d_tap = d_y if same is None else jnp.where(same[i][..., None], d_y, 0.0)
    d_xs = d_xs + jnp.pad(d_tap * weight[i], ((0, 0), (i, width - 1 - i), (0, 0)))
    d_weight.append((xs[:, i:i + time] * d_tap).reshape(-1, dim).sum(0))
  return d_xs, jnp.stack(d_weight), None


@jax.custom_vjp
def _taps(xs, weight, same):
  """``y_t = Σ_i weight_i ⊙ xs_{t+i}`` (masked by ``same[i]``).

  xs: ``[B, W−1+T, D]``; weight: ``[W, D]``; same: None or bool ``[W, B, T]``.
  """
  return _taps_fwd(xs, weight, same)[0]


_taps.defvjp(_taps_fwd, _taps_bwd)


def causal_conv1d(x, weight, *, bias=None, state=None, segment_ids=None):
  """Depthwise causal convolution of ``x`` with a ``W``-tap filter per channel.

  With ``xs = concat(state, x)`` along time (``W−1 + T`` steps),

      y_t = Σ_{i=0}^{W−1} weight_i ⊙ xs_{t+i}  (+ bias).

  With ``segment_ids``, ``xs_{t+i}`` contributes only if it belongs to the
  segment of position ``t``; the state's entries count as belonging to the
  segment of position 0, so a carried state flows into the first segment of
  the row. The state carries no ids, so a document that begins exactly at a
  call's first position must be given ``state=None``. Products are summed in
  float32 (or wider).

  Args:
    x: ``[B, T, D]`` inputs.
    weight: ``[W, D]`` filter taps, ``weight[W−1]`` applied to the current input.
    bias: ``[D]`` added to every output; none if None.
    state: ``[B, W−1, D]`` the ``W−1`` inputs before ``x``, oldest first;
      zeros if None.
    segment_ids: ``[B, T]`` integer document ids of a packed row.

  Returns:
    ``(y, state)``: ``y`` ``[B, T, D]`` in the promoted dtype of ``x`` and
    ``weight``, and the last ``W−1`` entries of ``xs`` ``[B, W−1, D]`` in
    ``x``'s dtype. With ``segment_ids``, state entries outside the segment of
    the last position are zeroed, so a finished document never reaches the
    next call.
  """
  _checks.check_floating("x", x)
  _checks.check_floating("weight", weight)
  if x.ndim != 3:
    raise ValueError(f"x has shape {_checks.shape_str(x.shape)}; expected [B, T, D]")
  batch, time, dim = x.shape
  if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] != dim:
    raise ValueError(
        f"weight has shape {_checks.shape_str(weight.shape)}; expected [W, {dim}] with W ≥ 1")
  width = weight.shape[0]
  if bias is not None:
    _checks.check_floating("bias", bias)
    _checks.check_shape("bias", bias, (dim,))
  if state is None:
    state = jnp.zeros((batch, width - 1, dim), x.dtype)
  else:
    _checks.check_floating("state", state)
    _checks.check_shape("state", state, (batch, width - 1, dim))
  _checks.check_segment_ids(segment_ids, batch, time)

  out_dtype = jnp.result_type(x.dtype, weight.dtype)
  acc = jnp.promote_types(out_dtype, jnp.float32)
  xs = jnp.concatenate([state.astype(x.dtype), x], axis=1)
  if segment_ids is not None:
    xs_seg = jnp.concatenate(
        [jnp.broadcast_to(segment_ids[:, :1], (batch, width - 1)), segment_ids], axis=1)

  same = None
  if segment_ids is not None:
    same = jnp.stack([xs_seg[:, i:i + time] == segment_ids for i in range(width)])
  y = _taps(xs.astype(acc), weight.astype(acc), same)
  if bias is not None:
    y += bias.astype(acc)

  new_state = xs[:, time:]
  if segment_ids is not None:
    alive = xs_seg[:, time:] == segment_ids[:, -1:]
    new_state = jnp.where(alive[..., None], new_state, 0)
  return y.astype(out_dtype), new_state
