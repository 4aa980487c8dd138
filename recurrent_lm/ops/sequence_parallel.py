"""Sequence parallelism: a linear recurrence with its time axis split over devices.

Called inside ``jax.shard_map`` with every ``[B, T, …]`` input split along T
over the mesh axis ``axis_name`` into ``P`` shards of ``L = T / P`` tokens
(shard ``p`` holds positions ``pL … pL + L − 1``). Each shard runs the
ordinary op on its tokens from a zero state, the shards exchange one small
pair each, and each shard corrects its outputs — one ``all_gather`` of
``P`` states, no pass over the sequence in order.

**Diagonal recurrence** ``h_t = a_t ⊙ h_{t−1} + b_t`` (:func:`linear_scan`)::

    local, from zero:  ĥ_t = a_t ⊙ ĥ_{t−1} + b_t,   Â_t = ∏_{shard start ≤ s ≤ t} a_s
    shard p's pair:    (A_p, h_p) = (Â_{last}, ĥ_{last})
    entering state:    H_0 = h0,   H_{p+1} = A_p ⊙ H_p + h_p
    output:            h_t = ĥ_t + Â_t ⊙ H_p

``H`` is the exclusive scan over shards of the pairs under the associative
combine ``(A1, h1) ∘ (A2, h2) = (A1·A2, A2 ⊙ h1 + h2)`` — the same affine
maps the ``associative`` form composes over tokens, here over shards.

**Linear attention** ``S_t = diag(e^{g_t}) S_{t−1} + k_t v_tᵀ, o_t = q̂_tᵀ S_t``
(:func:`linear_attention`; ``q̂ = scale·q``, ``G_t = Σ_{shard start ≤ s ≤ t} g_s``)::

    local, from zero:  Ŝ_t, ô_t = q̂_tᵀ Ŝ_t
    shard p's pair:    (D_p, S_p) = (e^{G_last}, Ŝ_last)      D: [B, H, K] (per key channel)
    entering state:    S⁰_0 = initial_state,   S⁰_{p+1} = diag(D_p) S⁰_p + S_p
    output:            o_t = ô_t + (q̂_t ⊙ e^{G_t})ᵀ S⁰_p

The normaliser ``z`` of ``normalize=True`` is one more value column of ones
(as in the op), so numerator and denominator are corrected alike before the
division.

**Documents** (``segment_ids``): a document that starts inside a shard
forgets what came before, so the incoming state only reaches the positions
before the shard's first document start (``carry_t`` = no start in
``shard start … t``), and a shard with a start passes ``A_p = 0`` on. Whether
the shard's first token starts a document depends on the previous shard's
last id, which one ``ppermute`` brings.

**mLSTM** (:func:`mlstm`; notation of ``ops.mlstm``: ``b`` the cumulated
log forget gates, ``D_tj = b_t − b_j + ĩ_j``). Its output divides by a
normaliser that depends on the incoming state, so instead of correcting
outputs each shard runs twice: once to get its pair, once from its exact
entering state. With ``(Ĉ, n̂, m̂)`` the shard's final state from no state
(stabiliser started at ``−∞``, so ``m̂ = max_j D_Lj``)::

    entering (C, n, m), shard without a document start:
      m′ = max(m + b_L, m̂)
      C′ = e^{m + b_L − m′} C + e^{m̂ − m′} Ĉ,    n′ likewise
    shard with a start: (C′, n′, m′) = (Ĉ, n̂, m̂)       (what came before is forgotten)

which is the chunked form's chunk-to-chunk step with whole shards as
chunks. Twice the FLOPs of one pass, still no sequential pass over T.

The final state of the whole sequence, ``A_{P−1} ⊙ H_{P−1} + h_{P−1}``, is
computed on every shard from the gathered pairs, so it comes back replicated.
Gradients flow through the same computation (``all_gather`` transposes to a
reduce-scatter), so the backward pass is sequence-parallel too.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from recurrent_lm.ops import _checks

# The modules, not the functions of the same name that ``recurrent_lm.ops`` exports.
linear_attention_lib = importlib.import_module("recurrent_lm.ops.linear_attention")
linear_scan_lib = importlib.import_module("recurrent_lm.ops.linear_scan")
mlstm_lib = importlib.import_module("recurrent_lm.ops.mlstm")
# A stabiliser that no real one reaches: a local pass started from it has m_t = max_j D_tj.
_NO_STATE = -1e30
_EPS = linear_attention_lib._EPS


SEQUENCE_AXIS = "sequence"


def sequence_shards() -> int:
  """How many ways the current mesh (``jax.set_mesh``) splits the ``sequence``
  axis; 1 without a mesh, without that axis, or inside a ``shard_map`` over it."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
    return 1
  if dict(zip(mesh.axis_names, mesh.axis_types))[SEQUENCE_AXIS] == AxisType.Manual:
    return 1
  return mesh.shape[SEQUENCE_AXIS]


def splits(length: int) -> bool:
  """Whether an op over ``length`` steps runs sequence-parallel here: the
  current mesh splits ``sequence`` and ``length`` divides into its shards.

  A length that does not (a decoding step, HMT's one-token summaries) runs
  as the plain op on every shard; the partitioner gathers what it needs.
  """
  shards = sequence_shards()
  return shards > 1 and length % shards == 0


def split_sequence(fn, sequence_args, whole_args, length: int):
  """``fn(*sequence_args, *whole_args)`` in a ``shard_map`` over the current
  mesh's ``sequence`` axis: ``sequence_args`` ``[B, T, …]`` split along T,
  ``whole_args`` (states) replicated; returns ``(split output, replicated state)``.
  The other mesh axes stay with the SPMD partitioner."""
  shards = sequence_shards()
  if length % shards:
    raise ValueError(f"sequence length {length} does not divide into the mesh's "
                     f"{shards} sequence shards; expected a multiple of {shards}")
  split = P(None, SEQUENCE_AXIS)
  body = lambda seq, whole: fn(*seq, *whole)
  return jax.shard_map(body, in_specs=(split, P()), out_specs=(split, P()),
                       axis_names={SEQUENCE_AXIS}, check_vma=False)(tuple(sequence_args),
                                                                    tuple(whole_args))


def _starts(segment_ids, axis_name):
  """``[B, L]`` bool: where a document starts, consistently with the whole sequence.

  Position 0 of shard p > 0 starts a document iff its id differs from the
  last id of shard p − 1; position 0 of the sequence never does (``h0`` flows
  into the first document, as in the ops).
  """
  count = lax.psum(1, axis_name)
  index = lax.axis_index(axis_name)
  previous = lax.ppermute(segment_ids[:, -1], axis_name,
                          [(p, (p + 1) % count) for p in range(count)])
  previous = jnp.where(index == 0, segment_ids[:, 0], previous)
  before = jnp.concatenate([previous[:, None], segment_ids[:, :-1]], axis=1)
  return segment_ids != before


def _carry(segment_ids, axis_name, batch, length):
  """``[B, L]`` float32: 1 where the state entering the shard still counts."""
  if segment_ids is None:
    return jnp.ones((batch, length), jnp.float32)
  starts = _starts(segment_ids, axis_name)
  return (jnp.cumsum(starts, axis=1) == 0).astype(jnp.float32)


def _entering(pairs, initial, combine, axis_name):
  """``(state entering this shard, state after the last shard)``.

  ``pairs`` is this shard's ``(decay, state)``; all shards' are gathered and
  composed in order from ``initial``: a loop over the P shards (P is the
  mesh axis size, small), identical on every shard.
  """
  gathered = jax.tree.map(lambda x: lax.all_gather(x, axis_name), pairs)
  count = jax.tree.leaves(gathered)[0].shape[0]
  states = [initial]
  for p in range(count):
    states.append(combine(jax.tree.map(lambda x: x[p], gathered), states[-1]))
  index = lax.axis_index(axis_name)
  entering = jax.tree.map(lambda *xs: jnp.stack(xs)[index], *states[:-1])
  return entering, states[-1]


def linear_scan(a, b, h0=None, *, axis_name: str, segment_ids=None, impl: str = "auto",
                chunk_size: int = linear_scan_lib._CHUNK):
  """``ops.linear_scan`` of a sequence split over ``axis_name`` (module docstring).

  Args:
    a, b: this shard's ``[B, L, ...]`` coefficients and inputs.
    h0: ``[B, ...]`` the state before the whole sequence (replicated); zeros if None.
    axis_name: the mesh axis the time axis is split over (inside ``shard_map``).
    segment_ids: this shard's ``[B, L]`` document ids.
    impl, chunk_size: the form each shard runs (``ops.linear_scan``).

  Returns:
    ``(h, h_last)``: this shard's ``[B, L, ...]`` states and the state after
    the whole sequence (the same on every shard).
  """
  _checks.check_floating("a", a)
  batch, length = a.shape[:2]
  acc = linear_scan_lib._acc_dtype(jnp.result_type(a.dtype, b.dtype))
  a32, b32 = a.astype(acc), b.astype(acc)
  carry = _carry(segment_ids, axis_name, batch, length)
  carry = carry.reshape(carry.shape + (1,) * (a.ndim - 2)).astype(acc)
  h_local, last_local = linear_scan_lib.linear_scan(a32, b32, segment_ids=segment_ids,
                                                    impl=impl, chunk_size=chunk_size)
  # Â_t, the product of a since the shard's start: the same recurrence from 1 with no input.
  # (jnp.cumprod instead measured slower, forward + backward at T = 65,536 over 8 CPU
  # devices: 0.31-0.33 s against 0.27 s.)
  decay, _ = linear_scan_lib.linear_scan(a32, jnp.zeros_like(a32), jnp.ones_like(a32[:, 0]),
                                         segment_ids=segment_ids, impl=impl,
                                         chunk_size=chunk_size)
  decay = decay.astype(acc) * carry
  h0 = jnp.zeros_like(last_local) if h0 is None else h0.astype(acc)
  entering, final = _entering((decay[:, -1], last_local), h0,
                              lambda pair, h: pair[0] * h + pair[1], axis_name)
  h = h_local.astype(acc) + decay * entering[:, None]
  return h.astype(jnp.result_type(a.dtype, b.dtype)), final


def linear_attention(q, k, v, *, axis_name: str, log_decay=None, normalize: bool = False,
                     scale=None, initial_state=None, segment_ids=None, chunk_size: int = 64,
                     impl: str = "auto"):
  """Causal ``ops.linear_attention`` of a sequence split over ``axis_name`` (module docstring).

  Args:
    q, k: this shard's ``[B, L, H, K]``; v: ``[B, L, H, V]``.
    axis_name: the mesh axis the time axis is split over (inside ``shard_map``).
    log_decay, normalize, scale, initial_state, segment_ids, chunk_size, impl:
      as ``ops.linear_attention`` (``log_decay`` and ``segment_ids`` this
      shard's part; ``initial_state`` the state before the whole sequence).

  Returns:
    ``(o, state)``: this shard's ``[B, L, H, V]`` outputs and the state after
    the whole sequence (``S`` or ``(S, z)``; the same on every shard).
  """
  batch, length, heads, dk, dv = _checks.check_qkv(q, k, v)
  out_dtype = q.dtype
  scale = dk ** -0.5 if scale is None else scale
  f32 = lambda x: x.astype(jnp.float32)
  if normalize:     # z is one more value column of ones: correct both, divide at the end
    v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], -1)
    if initial_state is not None:
      initial_state = jnp.concatenate([f32(initial_state[0]), f32(initial_state[1])[..., None]],
                                      -1)
  o_local, last_local = linear_attention_lib.linear_attention(
      q, k, v, log_decay=log_decay, scale=scale, segment_ids=segment_ids,
      chunk_size=chunk_size, impl=impl)
  # G_t, the log-decay summed since the shard's start, per key channel.
  if log_decay is None:
    cumulative = jnp.zeros((batch, length, heads, 1), jnp.float32)
  else:
    g = f32(log_decay)
    cumulative = jnp.cumsum(g[..., None] if g.ndim == 3 else g, axis=1)
  carry = _carry(segment_ids, axis_name, batch, length)[:, :, None, None]
  decay = jnp.exp(cumulative) * carry                                  # [B, L, H, K or 1]
  decay_last = jnp.broadcast_to(decay[:, -1], (batch, heads, dk))
  s0 = (jnp.zeros_like(last_local) if initial_state is None else f32(initial_state))
  entering, final = _entering((decay_last, f32(last_local)), s0,
                              lambda pair, s: pair[0][..., None] * s + pair[1], axis_name)
  q_hat = f32(q) * scale * decay
  o = f32(o_local) + jnp.einsum("blhk,bhkv->blhv", q_hat, entering)
  if normalize:
    o = o[..., :dv] / (o[..., dv:] + _EPS)
    final = (final[..., :dv], final[..., dv])
  return o.astype(out_dtype), final


def mlstm(q, k, v, input_gate, forget_gate, *, axis_name: str, initial_state=None,
          segment_ids=None, chunk_size: int = 64, impl: str = "auto"):
  """``ops.mlstm`` of a sequence split over ``axis_name`` (module docstring).

  Args:
    q, k: this shard's ``[B, L, H, K]``; v: ``[B, L, H, V]``; input_gate,
      forget_gate: ``[B, L, H]`` pre-activations.
    axis_name: the mesh axis the time axis is split over (inside ``shard_map``).
    initial_state: ``(C, n, m)`` before the whole sequence; None is zeros.
    segment_ids, chunk_size, impl: as ``ops.mlstm`` (this shard's ids).

  Returns:
    ``(h, state)``: this shard's ``[B, L, H, V]`` outputs and ``(C, n, m)``
    after the whole sequence (the same on every shard).
  """
  batch, length, heads, dk, dv = _checks.check_qkv(q, k, v)
  run = lambda state: mlstm_lib.mlstm(q, k, v, input_gate, forget_gate, initial_state=state,
                                      segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)
  zeros = (jnp.zeros((batch, heads, dk, dv), jnp.float32),
           jnp.zeros((batch, heads, dk), jnp.float32), jnp.zeros((batch, heads), jnp.float32))
  if segment_ids is None:
    starts_first = jnp.zeros((batch,), bool)
    has_start = jnp.zeros((batch,), bool)
  else:
    starts = _starts(segment_ids, axis_name)
    starts_first, has_start = starts[:, 0], starts.any(axis=1)
  # Pass 1: the shard from no state, or from the reset state if its first token starts a document.
  m_start = jnp.broadcast_to(jnp.where(starts_first[:, None], 0.0, _NO_STATE), (batch, heads))
  _, local = run((zeros[0], zeros[1], m_start))
  log_f = jax.nn.log_sigmoid(forget_gate.astype(jnp.float32))
  b_last = log_f.sum(axis=1)                                              # [B, H]

  def combine(pair, state):
    (b, forget, c_hat, n_hat, m_hat), (c, n, m) = pair, state
    m_new = jnp.maximum(m + b, m_hat)
    keep, add = jnp.exp(m + b - m_new), jnp.exp(m_hat - m_new)
    c_new = keep[..., None, None] * c + add[..., None, None] * c_hat
    n_new = keep[..., None] * n + add[..., None] * n_hat
    return tuple(jnp.where(forget.reshape(forget.shape + (1,) * (x.ndim - 1)), x_hat, x)
                 for x, x_hat in ((c_new, c_hat), (n_new, n_hat), (m_new, m_hat)))

  initial = zeros if initial_state is None else tuple(x.astype(jnp.float32)
                                                      for x in initial_state)
  entering, final = _entering((b_last, has_start, *local), initial, combine, axis_name)
  # A shard whose first token starts a document enters from the reset state.
  entering = tuple(jnp.where(starts_first.reshape((batch,) + (1,) * (x.ndim - 1)), z, x)
                   for x, z in zip(entering, zeros))
  h, _ = run(entering)                                                   # pass 2
  return h, final
