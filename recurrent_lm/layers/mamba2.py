"""The Mamba-2 block (state-space duality, SSD).

With ``E = expand·D`` inner channels split into ``H = E / P`` heads of width
``P`` (``head_dim``), and ``G`` groups of ``N``-wide (``d_state``) B and C::

    z, x, B, C, dt = W_in x_t                       [E], [E], [G, N], [G, N], [H]
    x, B, C = SiLU(conv_W(x, B, C))                 causal depthwise conv, width W
    Δ_t = softplus(dt_t + dt_bias),   A = −exp(A_log)          one scalar per head
    h_t = exp(Δ_t A) h_{t−1} + Δ_t x_t B_tᵀ         h ∈ R^{P×N} per head
    y_t = h_t C_t + D ⊙ x_t
    out = W_out RMSNorm_G(y ⊙ SiLU(z))

Head ``h`` reads group ``h // (H / G)`` of B and C. The recurrence is
scalar-decay linear attention, run by ``ops.linear_attention`` with
``q = C``, ``k = B``, ``v = Δ·x``, ``log_decay = Δ·A``, ``scale = 1``
(the op's state is ``hᵀ``, ``[N, P]`` per head).

State-collapse mitigations (Stuffed Mamba, Chen et al. 2024, arXiv 2410.07145;
reference hooks in github.com/thunlp/stuffed-mamba). Inference switches that
change no parameter, all off by default — the same params run with or
without them:

* Forget more / remember less (the paper's Method 1), four scalars applied
  before the recurrence, composed as in the reference's
  ``analysis/modeling/mamba2/modeling_mamba2_torch.py`` (``a_mult``,
  ``dt_mult``, ``da_mult``, ``b_mult``)::

      A ← a_scale·A,   Δ_t ← delta_scale·Δ_t,   B_t ← b_scale·B_t
      log α_t = Δ_t A + log(decay_mult)       (α_t = exp(Δ_t A)·decay_mult)
      h_t = α_t h_{t−1} + Δ_t x_t B_tᵀ

  ``a_scale > 1`` raises every decay to a power (α → α^s, forget more);
  ``decay_mult < 1`` multiplies every decay, the one knob that forgets even
  where ``Δ A ≈ 0`` (then ``‖h‖ ≤ max‖Δ x Bᵀ‖ / (1 − decay_mult)``);
  ``delta_scale`` scales the decay exponent and the write together;
  ``b_scale < 1`` writes less.
* State normalisation (Method 2): after every update the state of each head
  is scaled back onto the ball of radius τ (``state_norm_threshold``, one
  value or one per head)::

      h̃_t = α_t h_{t−1} + Δ_t x_t B_tᵀ
      h_t = h̃_t · τ / max(‖h̃_t‖_F, τ),          y_t = h_t C_t + D ⊙ x_t

  Nonlinear in the state, so it runs token by token (``lax.scan``) whenever
  it is on, and pieces with a carried state equal one call exactly.
* Sliding window by state difference (Method 3): the state holds only the
  last r (``state_window``) tokens of the document::

      h_t^{(r)} = Σ_{t−r<i≤t} (Π_{i<s≤t} α_s) Δ_i x_i B_iᵀ
                = h_t − (Π_{t−r<s≤t} α_s) h_{t−r}

  computed as ``ssm_state`` plus a ring buffer of the last r inputs
  ``(B_i, Δ_i x_i, log α_i)`` — r·(G·N + H·P + H) floats instead of r whole
  states. Each step adds the new input and subtracts the input of r steps
  ago decayed by ``Π_{t−r<s≤t} α_s``::

      h_t^{(r)} = α_t h_{t−1}^{(r)} + Δ_t x_t B_tᵀ
                  − (Π_{t−r<s≤t} α_s) Δ_{t−r} x_{t−r} B_{t−r}ᵀ

  A prefill runs both streams as one ``ops.linear_attention`` call over 2H
  heads (``k = B_t`` and ``k = B_{t−r}·Π_{t−r<s≤t} α_s``, the same q and
  decays) and subtracts the halves. It is linear, so it is exact in exact
  arithmetic; in float32 the subtraction loses about ``ε·(T + r)/r`` of the
  state's scale within one call of T tokens when α ≈ 1 (the carried state is
  the windowed one, so the loss does not grow across calls). The state is
  then ``(conv_state, ssm_state, Mamba2Window)``. Exclusive with state
  normalisation, which breaks the linearity the difference relies on.

Initialisation as in Mamba-2: ``Δ`` log-uniform in [1e-3, 0.1] floored at
1e-4 with ``dt_bias = softplus⁻¹(Δ)``; ``A_log = log U[1, 16]``; ``D = 1``.
``A_log``, ``D`` and ``dt_bias`` keep these names: training exempts them
from weight decay.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from recurrent_lm import ops
from recurrent_lm.layers import _common
from recurrent_lm.layers.norms import GatedRMSNorm
from recurrent_lm.ops import _checks

_A_MIN = 1.0
_A_MAX = 16.0


def _a_log_init(key, shape, dtype=jnp.float32):
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, _A_MIN, _A_MAX)).astype(dtype)


class Mamba2Window(NamedTuple):
  """The last ``r`` inputs of the recurrence, in a ring buffer of ``r`` slots.

  The token at absolute position ``p`` lives in slot ``p mod r``; entries of
  an earlier document (or never written) are zero, so subtracting them is a
  no-op.

  Attributes:
    k: ``[B, r, G, N]`` float32, the keys ``B_i`` (after ``b_scale``).
    v: ``[B, r, H, P]`` float32, the values ``Δ_i x_i`` (after ``delta_scale``).
    log_decay: ``[B, r, H]`` float32, ``log α_i``.
    slot: ``[]`` int32, the slot of the next token (tokens so far mod r).
  """
  k: jax.Array
  v: jax.Array
  log_decay: jax.Array
  slot: jax.Array


def _check_scale(name, value, *, upper=None):
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and value > 0 and (upper is None or value <= upper))
  if not ok:
    expected = "a finite float > 0" if upper is None else f"a float in (0, {upper}]"
    raise ValueError(f"{name}={value!r}; expected {expected}")


def _window_log_decay(g, window):
  """``Σ_{j<s≤j+r} g_s`` for ``j = 0 … L − r − 1``, each from block-local sums.

  g: ``[B, L, H]`` log-decays (L ≥ r). A plain cumsum over L would subtract
  two sums of size ~L·|g| and lose the short window's precision; with the
  axis cut into blocks of r, the window ending at e = b·r + o is the prefix
  ``0…o`` of block b plus the suffix after o of block b − 1, both at most
  r·|g|.
  Returns ``[B, L − r, H]``.
  """
  batch, length, heads = g.shape
  blocks = -(-length // window)
  g = jnp.pad(g, ((0, 0), (0, blocks * window - length), (0, 0)))
  g = g.reshape(batch, blocks, window, heads)
  prefix = jnp.cumsum(g, axis=2)
  suffix = prefix[:, :, -1:] - prefix  # Σ after o within the block
  flat = lambda a: a.reshape(batch, blocks * window, heads)
  return flat(prefix)[:, window:length] + flat(suffix)[:, :length - window]


def _normalized_scan(q, k, v, g, s0, threshold, segment_ids):
  """Token by token: ``h̃ = α h + k vᵀ``, ``h = h̃·τ / max(‖h̃‖_F, τ)``, ``o = qᵀh``.

  q, k: ``[B, T, H, N]``; v: ``[B, T, H, P]``; g: ``[B, T, H]`` log-decays;
  s0: ``[B, H, N, P]``; threshold: ``[H]`` τ > 0; segment_ids: ``[B, T]`` or
  None (the decay is 0 where a new document starts).
  Returns ``(o [B, T, H, P], h_T)``, float32.
  """
  reset = (jnp.zeros(g.shape[:2], bool) if segment_ids is None
           else _checks.segment_starts(segment_ids))

  def step(h, inputs):
    q_t, k_t, v_t, g_t, reset_t = inputs
    decay = jnp.where(reset_t[:, None], 0.0, jnp.exp(g_t))  # [B, H]
    h = decay[..., None, None] * h + k_t[..., :, None] * v_t[..., None, :]
    norm = jnp.sqrt(jnp.sum(jnp.square(h), axis=(-2, -1)))
    h = h * (threshold / jnp.maximum(norm, threshold))[..., None, None]
    return h, jnp.einsum("bhn,bhnp->bhp", q_t, h)

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  h, o = lax.scan(step, s0, tuple(map(time_major, (q, k, v, g, reset))))
  return jnp.moveaxis(o, 0, 1), h


class Mamba2(nn.Module):
  """The Mamba-2 token mixer (module docstring for the equations).

  Attributes:
    d_model: model width D.
    d_state: N, width of B and C.
    head_dim: P, channels per head.
    expand: E / D.
    conv_width: W, taps of the causal conv.
    n_groups: G, groups of B and C shared by H / G heads each.
    chunk_size: chunk length of the chunked SSD op.
    norm_eps: ε of the gated output RMSNorm.
    dtype: compute dtype of the projections, the conv and the output.
    param_dtype: dtype of the parameters.
    a_scale: multiplies A (``α → α^a_scale``); 1.0 (off) as trained.
    delta_scale: multiplies Δ after the softplus (the decay exponent and the
      write); 1.0 (off).
    b_scale: multiplies B (the write); 1.0 (off).
    decay_mult: multiplies every decay ``α_t``, in (0, 1]; 1.0 (off).
    state_norm_threshold: τ of the state normalisation, a float or one per
      head; None (off). On, the recurrence runs token by token.
    state_window: r of the sliding-window state; None (off). On, the state
      gains a :class:`Mamba2Window` of the last r inputs.
  """
  d_model: int
  d_state: int = 64
  head_dim: int = 64
  expand: int = 2
  conv_width: int = 4
  n_groups: int = 1
  chunk_size: int = 64
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  # State-collapse mitigations (inference switches; module docstring).
  a_scale: float = 1.0
  delta_scale: float = 1.0
  b_scale: float = 1.0
  decay_mult: float = 1.0
  state_norm_threshold: float | tuple[float, ...] | None = None
  state_window: int | None = None

  def _dims(self) -> tuple[int, int, int]:
    """``(inner width E, heads H, conv channels E + 2GN)``, validated."""
    inner = self.expand * self.d_model
    _common.check_divisible("inner width expand*d_model", inner, "head_dim", self.head_dim)
    heads = inner // self.head_dim
    _common.check_divisible("num_heads", heads, "n_groups", self.n_groups)
    if self.conv_width < 1:
      raise ValueError(f"conv_width={self.conv_width}; expected a positive int")
    self._check_mitigations(heads)
    return inner, heads, inner + 2 * self.n_groups * self.d_state

  def _check_mitigations(self, heads: int) -> None:
    for name in ("a_scale", "delta_scale", "b_scale"):
      _check_scale(name, getattr(self, name))
    _check_scale("decay_mult", self.decay_mult, upper=1.0)
    window, threshold = self.state_window, self.state_norm_threshold
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
      raise ValueError(f"state_window={window!r}; expected a positive int or None")
    if threshold is not None:
      values = threshold if isinstance(threshold, (tuple, list)) else (threshold,)
      if (isinstance(threshold, (tuple, list)) and len(values) != heads) or not all(
          isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
          and t > 0 for t in values):
        raise ValueError(
            f"state_norm_threshold={threshold!r}; expected None, a finite float > 0, "
            f"or a tuple of {heads} of them (one per head)")
      if window is not None:
        raise ValueError(
            f"state_norm_threshold={threshold!r} with state_window={window!r}; expected at "
            "most one of them (the window's state difference needs a linear recurrence)")

  def init_state(self, batch_size: int, dtype=None):
    """``(conv_state, ssm_state)`` of a fresh sequence, zeros; with
    ``state_window`` a third part, an empty :class:`Mamba2Window`.

    Args:
      batch_size: B.
      dtype: dtype of ``conv_state`` ``[B, W − 1, E + 2GN]`` (the last conv
        inputs); ``self.dtype`` if None. ``ssm_state`` ``[B, H, N, P]`` and
        the window are float32.
    """
    _, heads, conv_dim = self._dims()
    conv_state = jnp.zeros((batch_size, self.conv_width - 1, conv_dim),
                           self.dtype if dtype is None else dtype)
    ssm_state = jnp.zeros((batch_size, heads, self.d_state, self.head_dim), jnp.float32)
    if self.state_window is None:
      return conv_state, ssm_state
    r = self.state_window
    window = Mamba2Window(
        k=jnp.zeros((batch_size, r, self.n_groups, self.d_state), jnp.float32),
        v=jnp.zeros((batch_size, r, heads, self.head_dim), jnp.float32),
        log_decay=jnp.zeros((batch_size, r, heads), jnp.float32),
        slot=jnp.zeros((), jnp.int32))
    return conv_state, ssm_state, window

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs the block over ``x``.

    Args:
      x: ``[B, T, D]``.
      state: as from ``init_state`` — ``(conv_state, ssm_state)``, or
        ``(conv_state, ssm_state, window)`` with ``state_window`` — or None
        at a sequence start.
      segment_ids: ``[B, T]`` document ids; the conv window, the SSM state
        (and the window's buffer) reset where the id changes.

    Returns:
      ``(y, state)``: ``y`` ``[B, T, D]`` in ``dtype``; the state as given.
    """
    _common.check_input(x, self.d_model)
    inner, heads, conv_dim = self._dims()
    batch, time, _ = x.shape
    groups, d_state, head_dim = self.n_groups, self.d_state, self.head_dim
    if state is None:
      state = self.init_state(batch)
    parts = 2 if self.state_window is None else 3
    if not isinstance(state, (tuple, list)) or len(state) != parts:
      expected = ("(conv_state, ssm_state)" if parts == 2 else
                  f"(conv_state, ssm_state, Mamba2Window) for state_window={self.state_window}")
      got = f"{len(state)} parts" if isinstance(state, (tuple, list)) else type(state).__name__
      raise ValueError(f"state has {got}; expected {expected}")
    conv_state, ssm_state = state[:2]
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    z = _common.dense(inner, ("embed", "mlp"), name="z_proj", **proj)(x)
    xbc = _common.dense(conv_dim, ("embed", "mlp"), name="xbc_proj", **proj)(x)
    dt = _common.dense(heads, ("embed", "heads"), name="dt_proj", **proj)(x)

    # PyTorch's Conv1d default: U(±1/√fan_in) with fan_in = W for a depthwise conv.
    conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    conv_weight = self.param(
        "conv_weight", nn.with_logical_partitioning(conv_init, ("conv", "mlp")),
        (self.conv_width, conv_dim), self.param_dtype)
    conv_bias = self.param(
        "conv_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        (conv_dim,), self.param_dtype)
    xbc, new_conv_state = ops.causal_conv1d(
        xbc, conv_weight.astype(self.dtype), bias=conv_bias.astype(self.dtype),
        state=conv_state, segment_ids=segment_ids)
    xbc = jax.nn.silu(xbc)
    xs, b, c = jnp.split(xbc, [inner, inner + groups * d_state], axis=-1)
    xs = xs.reshape(batch, time, heads, head_dim)
    b_groups = b.reshape(batch, time, groups, d_state).astype(jnp.float32)
    if self.b_scale != 1.0:
      b_groups = b_groups * self.b_scale
    # Group-major heads: head h reads group h // (H / G).
    b = jnp.repeat(b_groups, heads // groups, axis=2)
    c = jnp.repeat(c.reshape(batch, time, groups, d_state), heads // groups, axis=2)

    dt_bias = self.param("dt_bias", nn.with_logical_partitioning(_common.dt_bias_init, ("heads",)),
                         (heads,), self.param_dtype)
    a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init, ("heads",)),
                       (heads,), self.param_dtype)
    skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("heads",)),
                      (heads,), self.param_dtype)
    delta = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias)                # [B, T, H]
    if self.delta_scale != 1.0:
      delta = delta * self.delta_scale
    a = -jnp.exp(a_log.astype(jnp.float32))
    if self.a_scale != 1.0:
      a = a * self.a_scale
    log_decay = delta * a
    if self.decay_mult != 1.0:
      log_decay = log_decay + math.log(self.decay_mult)
    xs32 = xs.astype(jnp.float32)
    q, v = c.astype(jnp.float32), delta[..., None] * xs32

    if self.state_norm_threshold is not None:
      threshold = jnp.broadcast_to(jnp.asarray(self.state_norm_threshold, jnp.float32), (heads,))
      y, new_ssm_state = _normalized_scan(q, b, v, log_decay, ssm_state, threshold, segment_ids)
      new_state = (new_ssm_state,)
    elif self.state_window is not None:
      y, new_ssm_state, new_window = self._windowed(
          q, b, b_groups, v, log_decay, ssm_state, state[2], segment_ids)
      new_state = (new_ssm_state, new_window)
    else:
      y, new_ssm_state = ops.linear_attention(
          q, b, v, log_decay=log_decay, scale=1.0, initial_state=ssm_state,
          segment_ids=segment_ids, chunk_size=self.chunk_size)
      new_state = (new_ssm_state,)
    y = y.astype(jnp.float32) + skip[:, None] * xs32
    y = GatedRMSNorm(num_groups=groups, norm_before_gate=False, eps=self.norm_eps,
                     axis_name="mlp", dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(y.reshape(batch, time, inner), z)
    out = _common.dense(self.d_model, ("mlp", "embed"), name="out_proj", **proj)(y)
    return out, (new_conv_state.astype(conv_state.dtype),) + new_state

  def _windowed(self, q, k, k_groups, v, g, ssm_state, window, segment_ids):
    """The sliding-window recurrence by state difference (module docstring).

    q, k: ``[B, T, H, N]``; k_groups: ``[B, T, G, N]`` (k before the repeat
    over heads); v: ``[B, T, H, P]``; g: ``[B, T, H]``; ssm_state: the
    windowed state ``[B, H, N, P]``; window: the :class:`Mamba2Window`.
    Returns ``(o [B, T, H, P], windowed state, new window)``.
    """
    r = self.state_window
    batch, time, heads, _ = q.shape
    if not isinstance(window, Mamba2Window):
      raise TypeError(f"state[2] is a {type(window).__name__}; expected a Mamba2Window")
    _checks.check_shape("state[2].k", window.k, (batch, r, self.n_groups, self.d_state))
    _checks.check_shape("state[2].v", window.v, (batch, r, heads, self.head_dim))
    _checks.check_shape("state[2].log_decay", window.log_decay, (batch, r, heads))

    # Token i leaves the window at i + r. This call's tokens j = 0 … T−1 see
    # the tokens j − r leave: the buffer's oldest min(T, r) (oldest slot
    # first: the slot of the next token), then this call's first T − r.
    leave = min(time, r)
    oldest = lambda a, n: jnp.take(a, (window.slot + jnp.arange(n, dtype=jnp.int32)) % r, axis=1)
    leaving_k = jnp.concatenate([oldest(window.k, leave), k_groups[:, :time - leave]], 1)
    leaving_v = jnp.concatenate([oldest(window.v, leave), v[:, :time - leave]], 1)
    # Their decay on the way, Π_{j−r<s≤j} α_s: the buffer's r log-decays and this call's.
    ext_g = jnp.concatenate([oldest(window.log_decay, r), g], 1)           # [B, r + T, H]
    doc = (jnp.zeros((batch, time), jnp.int32) if segment_ids is None else
           jnp.cumsum(_checks.segment_starts(segment_ids), axis=1, dtype=jnp.int32))
    # Buffered tokens belong to the call's first document (or are zero).
    leaving_doc = jnp.concatenate([jnp.zeros((batch, leave), jnp.int32), doc[:, :time - leave]], 1)

    # Subtract a leaving token only within its document (the full stream has reset).
    k_out = jnp.where((leaving_doc == doc)[..., None, None],
                      jnp.repeat(leaving_k, heads // self.n_groups, axis=2)
                      * jnp.exp(_window_log_decay(ext_g, r))[..., None], 0.0)
    both = lambda a, b: jnp.concatenate([a, b], axis=2)              # heads: [in | out]
    o, s = ops.linear_attention(
        both(q, q), both(k, k_out), both(v, leaving_v), log_decay=both(g, g),
        scale=1.0, initial_state=jnp.concatenate([ssm_state, jnp.zeros_like(ssm_state)], 1),
        segment_ids=segment_ids, chunk_size=self.chunk_size)
    o = o[:, :, :heads] - o[:, :, heads:]
    new_state = s[:, :heads] - s[:, heads:]

    # The buffer keeps the last r inputs of the last document.
    slot = (window.slot + time) % r
    if segment_ids is None or time == 1:  # no reset inside: write only the new slots
      kept = min(time, r)
      slots = (window.slot + time - kept + jnp.arange(kept, dtype=jnp.int32)) % r
      write = lambda buf, new: buf.at[:, slots].set(new[:, time - kept:], unique_indices=True)
      new_window = Mamba2Window(write(window.k, k_groups), write(window.v, v),
                                write(window.log_decay, g), slot)
    else:  # zero what precedes the last reset: rewrite all r slots, oldest first
      live = jnp.concatenate([jnp.zeros((batch, r), jnp.int32), doc], 1)[:, -r:] == doc[:, -1:]
      def ring(buf, new):
        last = jnp.concatenate([oldest(buf, r), new], 1)[:, -r:]
        last = jnp.where(live.reshape(live.shape + (1,) * (last.ndim - 2)), last, 0.0)
        # Oldest-first entry m is the token at (tokens so far) − r + m: slot (slot + m) mod r.
        return jnp.roll(last, slot, axis=1)
      new_window = Mamba2Window(ring(window.k, k_groups), ring(window.v, v),
                                ring(window.log_decay, g), slot)
    return o, new_state, new_window
