"""The xLSTM matrix memory (mLSTM), in every form.

Per head, with ``F_t = logσ(f̃_t)`` (forget-gate pre-activation ``f̃``),
input-gate pre-activation ``ĩ_t`` and ``k̂_t = k_t / √K``::

    m_t = max(F_t + m_{t−1}, ĩ_t)                       stabiliser
    f′_t = exp(F_t + m_{t−1} − m_t),   i′_t = exp(ĩ_t − m_t)
    C_t = f′_t C_{t−1} + i′_t k̂_t v_tᵀ                  [K, V]
    n_t = f′_t n_{t−1} + i′_t k̂_t                       [K]
    h_t = q_tᵀ C_t / (max(|q_tᵀ n_t|, exp(−m_t)) + 1e-6)

``C`` and ``n`` are the unstabilised memory and normaliser ``C̃, ñ`` times
``exp(−m_t)``, and the gate exponents are ≤ 0. Unrolled, with
``b_t = Σ_{s≤t} F_s``, the stabiliser and state have the closed form::

    m_t = max(m_0 + b_t,  max_{j≤t} D_tj),     D_tj = b_t − b_j + ĩ_j
    C_t = e^{m_0 + b_t − m_t} C_0 + Σ_{j≤t} e^{D_tj − m_t} k̂_j v_jᵀ

(max distributes over +), which the parallel and chunked forms compute
directly; ``n`` is carried as one more value column of ones, so every form
gets it from the same matmuls as ``C``.

In those terms ``h_t = q_tᵀ C̃_t / (max(|q_tᵀ ñ_t|, 1) + 1e-6·e^{m_t})``:
the stabiliser moves ``h`` only through the 1e-6 term, but it sets the scale
of the state that is returned and passed on. Semantics chosen here:

* ``initial_state=None`` is ``(C, n, m) = (0, 0, 0)``, as in the NX-AI
  reference kernels (``mlstm_kernels``: zero ``C``, ``n`` and max state).
* ``segment_ids``: where a new document starts, ``(C, n, m)`` restarts at
  ``(0, 0, 0)`` before that token, so every document computes exactly what
  it would alone from ``initial_state=None`` (the reset ``m = 0`` still
  enters ``m_t = max(F_t + 0, ĩ_t)``). Position 0 continues the given
  initial state.
* ``k`` is scaled by ``1/√K`` before it enters the state (the xLSTM paper);
  the NX-AI kernels scale ``q`` instead, which gives the same ``h`` and a
  state ``√K`` times larger.

Implementations (``impl=``), all computing in float32:

* ``recurrent`` — token by token with ``lax.scan``: the oracle.
* ``parallel``  — the closed form over the whole sequence: ``[T, T]``
  matrices, short T.
* ``chunked``   — the closed form inside chunks of ``chunk_size``, from the
  state ``(C, n, m)`` entering the chunk; the chunk states come from one scan
  over T/C chunks. With ``b`` cumulated inside the chunk and
  ``a_j = b_L − b_j + ĩ_j`` (how key j reaches the chunk's end L)::

      m_next = max(m + b_L, A),   A = max_j a_j
      C_next = e^{m + b_L − m_next} C + e^{A − m_next} Σ_j e^{a_j − A} k̂_j v_jᵀ

  The last sum is independent of the carried ``m``, so it is one batched
  matmul outside the scan; every exponent is ≤ 0, so nothing overflows.
  Inside the chunk, position i reads the entering state with
  ``e^{m + b_i − m_i}`` and key j ≤ i with ``e^{D_ij − m_i}``, where
  ``m_i = max(m + b_i, max_j D_ij)``. A document that starts inside the
  chunk reads no entering state, and its ``m + b_i`` becomes ``0 + Σ F``
  from its first token (the reset above).
* ``pallas`` — ``pallas_kernels.mlstm``: the chunked form as GPU (Triton) /
  TPU (Mosaic) kernels, forward and backward, with ``(C, n, m)`` carried in
  float32 across chunks inside the kernel.
* ``auto`` — the fastest that supports the call (measurements in the
  registry comment below).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import pallas_kernels.mlstm as pallas_mlstm
from recurrent_lm.ops import _checks
from recurrent_lm.ops._dispatch import Registry, kernel_predicate

_EPS = 1e-6


# Shared conventions of the private implementations below:
#   q, k [B, T, H, K] float32 (k already scaled by 1/√K); v [B, T, H, V+1]
#   (the last column ones: it carries n); log_f = logσ(f̃) and i = ĩ
#   [B, T, H]; s0 [B, H, K, V+1] (C and n); m0 [B, H]; doc [B, T] int32
#   document index, non-decreasing, 0 at t=0, or None for one document.
# Each returns (qs [B, T, H, V+1] = q_tᵀ[C_t, n_t], m [B, T, H], S_final, m_final).


def _masked_exp(mask, exponent):
  """``exp(exponent)`` where ``mask``, else 0 — never exponentiating a
  masked (possibly large positive) value, so gradients stay finite."""
  return jnp.exp(jnp.where(mask, exponent, -jnp.inf))


def _recurrent(q, k, v, log_f, i, s0, m0, doc, *, chunk_size):
  del chunk_size
  reset = jnp.zeros(q.shape[:2], bool) if doc is None else _checks.segment_starts(doc)

  def step(carry, inputs):
    s, m = carry
    q_t, k_t, v_t, f_t, i_t, reset_t = inputs
    m = jnp.where(reset_t[:, None], 0.0, m)
    s = jnp.where(reset_t[:, None, None, None], 0.0, s)
    m_new = jnp.maximum(f_t + m, i_t)
    f_gate = jnp.exp(f_t + m - m_new)[..., None, None]
    i_gate = jnp.exp(i_t - m_new)[..., None, None]
    s = f_gate * s + i_gate * k_t[..., :, None] * v_t[..., None, :]
    return (s, m_new), (jnp.einsum("bhk,bhkv->bhv", q_t, s), m_new)

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  (s_final, m_final), (qs, m) = lax.scan(
      step, (s0, m0), tuple(map(time_major, (q, k, v, log_f, i, reset))))
  return jnp.moveaxis(qs, 0, 1), jnp.moveaxis(m, 0, 1), s_final, m_final


def _document_start(doc):
  """``[B, T]`` int32: the position where each position's document starts."""
  positions = jnp.arange(doc.shape[1], dtype=jnp.int32)
  return lax.cummax(jnp.where(_checks.segment_starts(doc), positions, 0), axis=1)


def _since_document_start(b, start):
  """``Σ F`` from position ``start`` to each position, inclusive.

  b: ``[..., L]`` inclusive cumulated log forget gates of a segment;
  start: ``[..., L]`` int, ``0 ≤ start ≤`` the position, broadcastable to b.
  """
  before = jnp.pad(b[..., :-1], [(0, 0)] * (b.ndim - 1) + [(1, 0)])  # exclusive cumsum
  return b - jnp.take_along_axis(before, jnp.broadcast_to(start, b.shape), axis=-1)


def _parallel(q, k, v, log_f, i, s0, m0, doc, *, chunk_size):
  del chunk_size
  time = q.shape[1]
  # Per head: [B, H, T] gates, [B, H, T, T] matrices.
  log_f, i = jnp.moveaxis(log_f, 2, 1), jnp.moveaxis(i, 2, 1)
  b = jnp.cumsum(log_f, axis=-1)
  causal = np.tril(np.ones((time, time), bool))
  if doc is None:
    same_doc, sees_state, since_start = causal, True, b
  else:
    same_doc = (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]  # [B, 1, T, T]
    sees_state = (doc == 0)[:, None]  # [B, 1, T]: the first document reads C_0
    since_start = _since_document_start(b, _document_start(doc)[:, None])

  log_d = jnp.where(same_doc, b[..., :, None] - b[..., None, :] + i[..., None, :], -jnp.inf)
  from_state = jnp.where(sees_state, m0[..., None], 0.0) + since_start
  m = jnp.maximum(from_state, jnp.max(log_d, axis=-1))  # [B, H, T]
  d = jnp.exp(log_d - m[..., None])
  scores = jnp.einsum("bihk,bjhk->bhij", q, k) * d
  state_weight = _masked_exp(sees_state, m0[..., None] + since_start - m)
  qs = (jnp.einsum("bhij,bjhv->bihv", scores, v)
        + jnp.einsum("bhi,bihk,bhkv->bihv", state_weight, q, s0))

  # The last row of the closed form is the final state.
  s_final = (jnp.einsum("bhj,bjhk,bjhv->bhkv", d[:, :, -1], k, v)
             + state_weight[:, :, -1, None, None] * s0)
  return qs, jnp.moveaxis(m, 1, 2), s_final, m[:, :, -1]


def _chunked(q, k, v, log_f, i, s0, m0, doc, *, chunk_size):
  batch, time, heads, dk = q.shape
  dv = v.shape[-1]
  chunk = min(chunk_size, time)
  n = -(-time // chunk)
  pad = n * chunk - time
  if pad:
    # Zero keys, F = 0 and ĩ = −inf leave (C, n, m) exactly as they were.
    pad_t = lambda x, value=0.0: jnp.pad(
        x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=value)
    q, k, v, log_f, i = pad_t(q), pad_t(k), pad_t(v), pad_t(log_f), pad_t(i, -jnp.inf)
    if doc is not None:
      doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")

  # [B, T, H, X] -> [B, H, N, C, X]; gates [B, T, H] -> [B, H, N, C].
  to_chunks = lambda x: x.reshape(batch, n, chunk, heads, x.shape[-1]).transpose(0, 3, 1, 2, 4)
  q, k, v = to_chunks(q), to_chunks(k), to_chunks(v)
  log_f, i = to_chunks(log_f[..., None])[..., 0], to_chunks(i[..., None])[..., 0]
  b = jnp.cumsum(log_f, axis=-1)

  causal = np.tril(np.ones((chunk, chunk), bool))
  if doc is None:
    same_doc, sees_state, reaches_end, since_start = causal, True, True, b
  else:
    # Each position sums F from its chunk's start or its document's, the later.
    start = _document_start(doc).reshape(batch, n, chunk) - np.arange(n)[:, None] * chunk
    since_start = _since_document_start(b, jnp.maximum(start, 0)[:, None])
    doc = doc.reshape(batch, n, chunk)
    doc_in = jnp.concatenate([doc[:, :1, 0], doc[:, :-1, -1]], axis=1)  # doc of the entering state
    sees_state = (doc == doc_in[..., None])[:, None]  # [B, 1, N, C]
    reaches_end = (doc == doc[:, :, -1:])[:, None]  # [B, 1, N, C]
    same_doc = (causal & (doc[..., :, None] == doc[..., None, :]))[:, None]  # [B, 1, N, C, C]

  # How each key reaches the chunk's end, and the chunk's (C, n) from its own keys.
  reach = jnp.where(reaches_end, b[..., -1:] - b + i, -jnp.inf)  # a_j: [B, H, N, C]
  reach_max = jnp.max(reach, axis=-1)  # A: [B, H, N]
  chunk_kv = jnp.einsum("bhnc,bhnck,bhncv->bhnkv", jnp.exp(reach - reach_max[..., None]), k, v)
  sees_end = jnp.broadcast_to(sees_state if doc is None else sees_state[..., -1], reach_max.shape)
  through = since_start[..., -1]  # Σ F from the entering state (or the reset) to the end

  def step(carry, inputs):
    s, m = carry
    sees_end_n, through_n, reach_max_n, kv_n = inputs
    m_next = jnp.maximum(jnp.where(sees_end_n, m, 0.0) + through_n, reach_max_n)
    s_next = (_masked_exp(sees_end_n, m + through_n - m_next)[..., None, None] * s
              + jnp.exp(reach_max_n - m_next)[..., None, None] * kv_n)
    return (s_next, m_next), (s, m)

  by_chunk = lambda x: jnp.moveaxis(x, 2, 0)
  (s_final, m_final), (s_in, m_in) = lax.scan(
      step, (s0, m0), tuple(map(by_chunk, (sees_end, through, reach_max, chunk_kv))))
  s_in, m_in = jnp.moveaxis(s_in, 0, 2), jnp.moveaxis(m_in, 0, 2)[..., None]  # [B, H, N, 1]

  log_d = jnp.where(same_doc, b[..., :, None] - b[..., None, :] + i[..., None, :], -jnp.inf)
  from_state = jnp.where(sees_state, m_in, 0.0) + since_start
  m = jnp.maximum(from_state, jnp.max(log_d, axis=-1))  # [B, H, N, C]
  scores = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * jnp.exp(log_d - m[..., None])
  state_weight = _masked_exp(sees_state, m_in + since_start - m)
  qs = (jnp.einsum("bhnij,bhnjv->bhniv", scores, v)
        + jnp.einsum("bhnc,bhnck,bhnkv->bhncv", state_weight, q, s_in))

  qs = qs.transpose(0, 2, 3, 1, 4).reshape(batch, n * chunk, heads, dv)[:, :time]
  m = m.transpose(0, 2, 3, 1).reshape(batch, n * chunk, heads)[:, :time]
  return qs, m, s_final, m_final


REGISTRY = Registry(
    "mlstm",
    # CPU, forward+backward, float32, T=2048, B=1, H=4, K=V=64, median of 5
    # after warm-up (2 shared cores): chunked 22 ms, recurrent 543 ms,
    # parallel 359 ms. Forward alone recurrent is about as fast (8.8 ms
    # against 10.2 ms): impl="recurrent" suits forward-only work on CPU.
    auto_order={"cpu": ("chunked", "recurrent"),
                "default": ("pallas", "chunked", "recurrent")})
REGISTRY.register("recurrent", _recurrent)
REGISTRY.register("parallel", _parallel)
REGISTRY.register("chunked", _chunked)
REGISTRY.register("pallas", pallas_mlstm.mlstm, kernel_predicate(pallas_mlstm.supports))


def _check_initial_state(initial_state, batch, heads, dk, dv):
  if initial_state is None:
    return
  if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3:
    raise ValueError("initial_state must be the triple (C, n, m); got "
                     f"{type(initial_state).__name__}"
                     + (f" of length {len(initial_state)}"
                        if isinstance(initial_state, (tuple, list)) else ""))
  c, n, m = initial_state
  _checks.check_shape("initial_state C", c, (batch, heads, dk, dv))
  _checks.check_shape("initial_state n", n, (batch, heads, dk))
  _checks.check_shape("initial_state m", m, (batch, heads))


def mlstm(q, k, v, input_gate, forget_gate, *, initial_state=None, segment_ids=None,
          chunk_size=64, impl="auto"):
  """The mLSTM matrix memory (module docstring) with its stabiliser ``m``.

  Args:
    q: ``[B, T, H, K]`` queries.
    k: ``[B, T, H, K]`` keys (scaled by ``1/√K`` inside).
    v: ``[B, T, H, V]`` values.
    input_gate: ``[B, T, H]`` input-gate pre-activations ``ĩ`` (the gate is ``exp(ĩ)``).
    forget_gate: ``[B, T, H]`` forget-gate pre-activations ``f̃`` (the gate is ``σ(f̃)``).
    initial_state: ``(C [B, H, K, V], n [B, H, K], m [B, H])``; None is all zeros.
    segment_ids: ``[B, T]`` integer document ids for packed rows; the state
      restarts at all zeros where a new document starts.
    chunk_size: chunk length of ``impl="chunked"``.
    impl: ``"recurrent" | "parallel" | "chunked" | "pallas" | "auto"``.

  Returns:
    ``(h, state)``: ``h [B, T, H, V]`` in q's dtype and the final
    ``state = (C, n, m)``, float32.
  """
  batch, time, heads, dk, dv = _checks.check_qkv(q, k, v)
  for name, x in (("input_gate", input_gate), ("forget_gate", forget_gate)):
    _checks.check_floating(name, x)
  _checks.check_shape("input_gate", input_gate, (batch, time, heads))
  _checks.check_shape("forget_gate", forget_gate, (batch, time, heads))
  _check_initial_state(initial_state, batch, heads, dk, dv)
  _checks.check_segment_ids(segment_ids, batch, time)
  _checks.check_positive_int("chunk_size", chunk_size)
  from recurrent_lm.ops import sequence_parallel   # it imports this module
  if sequence_parallel.splits(time):
    return sequence_parallel.split_sequence(
        lambda q, k, v, i, f, ids, s0: sequence_parallel.mlstm(
            q, k, v, i, f, axis_name=sequence_parallel.SEQUENCE_AXIS, initial_state=s0,
            segment_ids=ids, chunk_size=chunk_size, impl=impl),
        (q, k, v, input_gate, forget_gate, segment_ids), (initial_state,), time)
  chosen = REGISTRY.resolve(impl, time=time, dtype=q.dtype, chunk_size=chunk_size,
                            key_dim=dk, value_dim=dv)

  out_dtype = q.dtype
  f32 = lambda x: x.astype(jnp.float32)
  q, k, v = f32(q), f32(k) * dk ** -0.5, f32(v)
  v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], -1)
  log_f, i = jax.nn.log_sigmoid(f32(forget_gate)), f32(input_gate)
  if initial_state is None:
    s0 = jnp.zeros((batch, heads, dk, dv + 1), jnp.float32)
    m0 = jnp.zeros((batch, heads), jnp.float32)
  else:
    c0, n0, m0 = map(f32, initial_state)
    s0 = jnp.concatenate([c0, n0[..., None]], -1)
  doc = (None if segment_ids is None
         else jnp.cumsum(_checks.segment_starts(segment_ids), axis=1, dtype=jnp.int32))

  if chosen.name == "pallas":   # the kernel multiplies bfloat16 and accumulates in float32
    q, k, v = (x.astype(out_dtype) for x in (q, k, v))
  qs, m, s_final, m_final = chosen.fn(q, k, v, log_f, i, s0, m0, doc, chunk_size=chunk_size)
  h = qs[..., :dv] / (jnp.maximum(jnp.abs(qs[..., dv:]), jnp.exp(-m)[..., None]) + _EPS)
  return h.astype(out_dtype), (s_final[..., :dv], s_final[..., dv], m_final)
