"""Linear attention with optional decay and normaliser, in every form.

Per head, with the state ``S ∈ R^{K×V}``::

    S_t = diag(exp(log_decay_t)) S_{t−1} + k_t v_tᵀ
    o_t = (scale · q_t)ᵀ S_t

``log_decay`` is absent (plain linear attention), ``[B, T, H]`` (one decay
per head: RetNet, Mamba-2/SSD) or ``[B, T, H, K]`` (one per key channel: GLA,
Liger). Decays enter as logs (≤ 0) and are cumulated in log space in float32.

With ``normalize=True`` a normaliser ``z_t = exp(log_decay_t) ⊙ z_{t−1} + k_t``
rides along and ``o_t = q̂_tᵀ S_t / (q̂_tᵀ z_t + eps)`` with ``q̂ = scale·q``
(BASED, JRT). It is computed as one more value column of ones, so every form
handles it for free.

``causal=False`` gives every position the state of its whole document
(``o_t = q̂_tᵀ S_end(t)``, the JRT prefix read). With ``segment_ids`` the state
resets where a new document starts; the initial state flows into the first
document of the row.

Implementations (``impl=``), all computing in float32:

* ``recurrent`` — token by token with ``lax.scan``: the oracle.
* ``parallel``  — the quadratic masked form ``O = (Q Kᵀ ⊙ D) V`` with
  ``D_ij = exp(Σ_{j<s≤i} log_decay_s)`` for ``j ≤ i``: O(T²) memory, short T.
* ``chunked``   — chunkwise: with ``b`` the log-decay cumulated inside a chunk
  of length C, position i of chunk n gets::

      o_i = (q_i ⊙ e^{b_i})ᵀ S_{n−1}  +  Σ_{j≤i in chunk} (q_i ⊙ e^{b_i − b_j})·k_j v_j
      S_n = diag(e^{b_C}) S_{n−1}  +  Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ

  Intra-chunk terms are matmuls, the chunk states one short scan over T/C
  chunks; memory is O(T·C + (T/C)·K·V), never O(T²). Every exponent is ≤ 0,
  so nothing overflows and no decay is ever divided by.

  *Scalar decay*: ``e^{b_i − b_j}`` is a ``C × C`` matrix per head that
  multiplies ``Q Kᵀ``. *Vector decay* cannot factor out of the key
  contraction, and the usual ``(q ⊙ e^{b})(k ⊙ e^{−b})ᵀ`` overflows once a
  chunk decays by more than ~e^{88}. Instead the chunk is cut into
  sub-chunks of ``_SUB_CHUNK``; for a query sub-chunk I with reference
  ``r_I`` (the cumulated log-decay just before I) and a key j before I::

      (q_i ⊙ e^{b_i − b_j})·k_j = (q_i ⊙ e^{b_i − r_I})·(k_j ⊙ e^{r_I − b_j}),

  both exponents ≤ 0 — a matmul per sub-chunk row; the diagonal
  sub-chunk blocks are formed element-wise (``sub × sub × K``). This is the
  secondary-chunking formulation of GLA, with every factor bounded by 1.
* ``auto`` — the fastest that supports the call (see BUILD.md for the
  measurements behind the choice).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from recurrent_lm.ops import _checks
from recurrent_lm.ops._dispatch import Registry
from recurrent_lm.ops.linear_scan import linear_scan

_EPS = 1e-6
_SUB_CHUNK = 8
# Above this length the quadratic form is never the fastest on CPU and its
# [T, T] masks start to cost real memory (measured with experiments/op_bench.py).
_PARALLEL_MAX_T = 256


# Shared conventions of the private implementations below:
#   q, k [B, T, H, K]; v [B, T, H, V] (V includes the normaliser column);
#   g [B, T, H, G] float32 log-decays with G = 1 (scalar/none) or K (vector);
#   s0 [B, H, K, V]; doc [B, T] int32 document index, non-decreasing, 0 at t=0,
#   or None for a single document (the fast path skips every document mask).
# Each returns (o [B, T, H, V], S_final [B, H, K, V]) in float32.


def _one_document(q):
  return jnp.zeros(q.shape[:2], jnp.int32)


def _recurrent(q, k, v, g, s0, doc, *, causal, chunk_size):
  del chunk_size
  doc = _one_document(q) if doc is None else doc
  reset = _checks.segment_starts(doc)

  def step(state, inputs):
    k_t, v_t, g_t, reset_t = inputs
    decay = jnp.where(reset_t[:, None, None, None], 0.0, jnp.exp(g_t)[..., None])
    state = decay * state + k_t[..., :, None] * v_t[..., None, :]
    return state, state

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  s_final, states = lax.scan(step, s0, (time_major(k), time_major(v),
                                        time_major(g), time_major(reset)))
  states = jnp.moveaxis(states, 0, 1)  # [B, T, H, K, V]
  if not causal:
    # Every position reads the state at the last position of its document.
    last = jax.vmap(lambda d: jnp.searchsorted(d, d, side="right") - 1)(doc)
    states = jnp.take_along_axis(states, last[:, :, None, None, None], axis=1)
  o = jnp.einsum("bthk,bthkv->bthv", q, states)
  return o, s_final


def _masked_exp(mask, exponent):
  """``exp(exponent)`` where ``mask``, else 0 — without ever exponentiating a
  masked (possibly large positive) value, so gradients stay finite."""
  return jnp.exp(jnp.where(mask, exponent, -jnp.inf))


def _parallel_causal(q, k, v, g, s0, doc, *, chunk_size):
  del chunk_size
  doc = _one_document(q) if doc is None else doc
  time = q.shape[1]
  cum = jnp.cumsum(g, axis=1)  # [B, T, H, G]
  tril = jnp.tril(jnp.ones((time, time), bool))
  mask = tril & (doc[:, :, None] == doc[:, None, :])  # [B, Ti, Tj]
  decay = _masked_exp(mask[..., None, None],
                      cum[:, :, None] - cum[:, None, :])  # [B, Ti, Tj, H, G]
  if g.shape[-1] == 1:
    scores = jnp.einsum("bihk,bjhk->bhij", q, k) * jnp.moveaxis(decay[..., 0], 3, 1)
  else:
    scores = jnp.einsum("bihk,bjhk,bijhk->bhij", q, k, decay)
  o = jnp.einsum("bhij,bjhv->bihv", scores, v)

  first_doc = (doc == 0)[:, :, None, None]
  o = o + jnp.where(first_doc, jnp.einsum("bihk,bhkv->bihv", q * jnp.exp(cum), s0), 0.0)

  last_doc = (doc == doc[:, -1:])[:, :, None, None]
  to_end = _masked_exp(last_doc, cum[:, -1:] - cum)  # [B, T, H, G]
  s_final = jnp.einsum("bjhk,bjhv->bhkv", k * to_end, v)
  carried = jnp.where((doc[:, -1] == 0)[:, None, None, None],
                      jnp.exp(cum[:, -1])[..., None] * s0, 0.0)
  return o, s_final + carried


def _vector_intra(q, k, v, b, same_doc, sub):
  """``o_i = Σ_{j≤i, same doc} (Σ_c q_ic k_jc e^{b_ic − b_jc}) v_j`` inside each chunk.

  q, k, b: ``[B, H, N, C, K]`` (b: the inclusive in-chunk cumulated
  log-decay); v: ``[B, H, N, C, V]``; same_doc: ``[B, N, C, C]`` bool, or None
  for a single document.
  Returns ``[B, H, N, C, V]``. See the module docstring for the sub-chunk split.
  """
  *lead, chunk, dim = q.shape
  n = chunk // sub
  split = lambda x: x.reshape(*lead, n, sub, x.shape[-1])
  qs, ks, vs, bs = split(q), split(k), split(v), split(b)
  if same_doc is not None:
    same_doc = same_doc.reshape(same_doc.shape[0], 1, -1, n, sub, chunk)  # [B, 1, N, n, sub, C]

  # Diagonal sub-chunk blocks, element-wise over [..., n, sub, sub, K].
  tri = np.tril(np.ones((sub, sub), bool))
  decay = _masked_exp(tri[:, :, None], bs[..., :, None, :] - bs[..., None, :, :])
  diag = jnp.einsum("...nik,...njk,...nijk->...nij", qs, ks, decay)
  if same_doc is not None:
    block_doc = jnp.stack([same_doc[..., i, :, i * sub:(i + 1) * sub] for i in range(n)], -3)
    diag = jnp.where(block_doc, diag, 0.0)
  o = jnp.einsum("...nij,...njv->...niv", diag, vs)
  if n > 1:
    # Blocks left of the diagonal: matmuls against keys rescaled to r_I, the
    # cumulated log-decay just before query sub-chunk I.
    ref = jnp.concatenate([jnp.zeros_like(bs[..., :1, 0, :]), bs[..., :-1, -1, :]], axis=-2)
    q_ref = qs * jnp.exp(bs - ref[..., :, None, :])  # [..., n, sub, K]
    before = np.arange(chunk)[None, :] < (np.arange(n) * sub)[:, None]  # [n, C]
    k_ref = k[..., None, :, :] * _masked_exp(
        before[:, :, None], ref[..., :, None, :] - b[..., None, :, :])  # [..., n, C, K]
    off_diag = jnp.einsum("...nik,...njk->...nij", q_ref, k_ref)  # [..., n, sub, C]
    if same_doc is not None:
      off_diag = jnp.where(same_doc, off_diag, 0.0)
    o = o + jnp.einsum("...nij,...jv->...niv", off_diag, v)
  return o.reshape(*lead, chunk, v.shape[-1])


def _chunked_causal(q, k, v, g, s0, doc, *, chunk_size):
  batch, time, heads, dk = q.shape
  dv = v.shape[-1]
  vector = g.shape[-1] > 1
  chunk = min(chunk_size, time)
  sub = math.gcd(chunk, _SUB_CHUNK)
  n = -(-time // chunk)
  pad = n * chunk - time
  if pad:
    # Zero keys add nothing and zero log-decays keep the state: the final
    # state is untouched by the padding.
    pad_t = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    q, k, v, g = pad_t(q), pad_t(k), pad_t(v), pad_t(g)
    if doc is not None:
      doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")

  # [B, T, H, X] -> [B, H, N, C, X]
  to_chunks = lambda x: x.reshape(batch, n, chunk, heads, x.shape[-1]).transpose(0, 3, 1, 2, 4)
  q, k, v, g = to_chunks(q), to_chunks(k), to_chunks(v), to_chunks(g)

  b = jnp.cumsum(g, axis=3)  # [B, H, N, C, G], in-chunk, inclusive
  b_last = b[:, :, :, -1]  # [B, H, N, G]
  if doc is None:
    sees_state = reaches_end = True
    same_doc = None
  else:
    doc = doc.reshape(batch, n, chunk)
    doc_in = jnp.concatenate([doc[:, :1, 0], doc[:, :-1, -1]], axis=1)  # doc of S_{n-1}
    sees_state = (doc == doc_in[..., None])[:, None, :, :, None]  # [B, 1, N, C, 1]
    reaches_end = (doc == doc[:, :, -1:])[:, None, :, :, None]
    same_doc = doc[:, :, :, None] == doc[:, :, None, :]  # [B, N, Ci, Cj]

  # Chunk states: S_n = diag(e^{b_C}) S_{n-1} + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ.
  k_end = k * _masked_exp(reaches_end, b_last[:, :, :, None] - b)
  chunk_kv = jnp.einsum("bhnck,bhncv->bhnkv", k_end, v)
  chunk_decay = jnp.exp(b_last)  # [B, H, N, G]
  if doc is not None:
    chunk_decay = jnp.where(sees_state[:, :, :, -1], chunk_decay, 0.0)

  def step(state, inputs):
    decay, kv = inputs
    return decay[..., None] * state + kv, state

  s_final, s_in = lax.scan(step, s0, (jnp.moveaxis(chunk_decay, 2, 0),
                                      jnp.moveaxis(chunk_kv, 2, 0)))
  s_in = jnp.moveaxis(s_in, 0, 2)  # [B, H, N, K, V]: state entering each chunk

  q_in = jnp.where(sees_state, q * jnp.exp(b), 0.0)
  o = jnp.einsum("bhnck,bhnkv->bhncv", q_in, s_in)

  if vector:
    o = o + _vector_intra(q, k, v, b, same_doc, sub)
  else:
    mask = np.tril(np.ones((chunk, chunk), bool))
    if doc is not None:
      mask = (same_doc & mask)[:, None]
    b0 = b[..., 0]
    scores = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * _masked_exp(
        mask, b0[..., :, None] - b0[..., None, :])
    o = o + jnp.einsum("bhnij,bhnjv->bhniv", scores, v)

  o = o.transpose(0, 2, 3, 1, 4).reshape(batch, n * chunk, heads, dv)[:, :time]
  return o, s_final


def _noncausal(causal_fn, q, k, v, g, s0, doc):
  """Bidirectional read from two causal passes without decay.

  With ``R_j = Σ_{j<s≤end(j)} log_decay_s`` (≤ 0), the document's final
  state is ``Σ_j (k_j ⊙ e^{R_j}) v_jᵀ`` (+ the decayed initial state for the
  first document), so with ``k̃ = k ⊙ e^{R}`` the non-causal output is a
  causal pass plus a reversed causal pass over ``(q, k̃, v)`` without
  decay, minus the diagonal that both count.
  """
  through = linear_scan(jnp.ones_like(g), g, reverse=True, segment_ids=doc)[0]
  k_tilde = k * jnp.exp(through - g)
  s0_tilde = s0 * jnp.exp(through[:, 0])[..., None]
  no_decay = jnp.zeros(g.shape[:-1] + (1,), g.dtype)
  o_fwd, s_final = causal_fn(q, k_tilde, v, no_decay, s0_tilde, doc)
  flip = lambda x: jnp.flip(x, 1)
  doc_rev = None if doc is None else doc[:, -1:] - flip(doc)
  o_bwd, _ = causal_fn(flip(q), flip(k_tilde), flip(v), no_decay, jnp.zeros_like(s0), doc_rev)
  diag = jnp.einsum("bthk,bthk->bth", q, k_tilde)[..., None] * v
  return o_fwd + flip(o_bwd) - diag, s_final


def _both_directions(causal_fn):
  def fn(q, k, v, g, s0, doc, *, causal, chunk_size):
    causal_fn_ = functools.partial(causal_fn, chunk_size=chunk_size)
    if causal:
      return causal_fn_(q, k, v, g, s0, doc)
    return _noncausal(causal_fn_, q, k, v, g, s0, doc)
  return fn


def _parallel_is_short(*, time, **call):
  del call
  return time <= _PARALLEL_MAX_T


REGISTRY = Registry(
    "linear_attention",
    auto_order={"cpu": ("parallel", "chunked", "recurrent"),
                "default": ("pallas", "chunked", "recurrent")})
REGISTRY.register("recurrent", _recurrent)
REGISTRY.register("parallel", _both_directions(_parallel_causal), auto_when=_parallel_is_short)
REGISTRY.register("chunked", _both_directions(_chunked_causal))


def _check_log_decay(log_decay, batch, time, heads, dk):
  if log_decay is None:
    return
  _checks.check_floating("log_decay", log_decay)
  if log_decay.shape not in ((batch, time, heads), (batch, time, heads, dk)):
    raise ValueError(
        f"log_decay has shape {_checks.shape_str(log_decay.shape)}; expected "
        f"[B, T, H] = {_checks.shape_str((batch, time, heads))} (one decay per head) or "
        f"[B, T, H, K] = {_checks.shape_str((batch, time, heads, dk))} (one per key channel)")
  if not isinstance(log_decay, jax.core.Tracer):
    worst = float(jnp.max(log_decay))
    if worst > 0:
      raise ValueError(
          f"log_decay has a positive entry ({worst:.4g}); expected log-decays ≤ 0 "
          "(pass log(decay), e.g. jax.nn.log_sigmoid(x), not the decay itself)")


def linear_attention(q, k, v, *, log_decay=None, normalize=False, scale=None,
                     initial_state=None, segment_ids=None, causal=True,
                     chunk_size=64, impl="auto"):
  """Linear attention ``S_t = diag(e^{log_decay_t}) S_{t−1} + k_t v_tᵀ, o_t = q̂_tᵀ S_t``.

  Args:
    q: ``[B, T, H, K]`` queries, already feature-mapped.
    k: ``[B, T, H, K]`` keys, already feature-mapped.
    v: ``[B, T, H, V]`` values.
    log_decay: None, ``[B, T, H]`` or ``[B, T, H, K]``; entries ≤ 0.
    normalize: also carry ``z`` and divide by ``q̂ᵀ z + eps`` (BASED).
    scale: multiplies q; defaults to ``K ** -0.5``.
    initial_state: ``S [B, H, K, V]``, or ``(S, z [B, H, K])`` when normalize.
    segment_ids: ``[B, T]`` integer document ids for packed rows.
    causal: False gives every position the final state of its document.
    chunk_size: chunk length of ``impl="chunked"``.
    impl: ``"recurrent" | "parallel" | "chunked" | "auto"``.

  Returns:
    ``(o, state)``: ``o [B, T, H, V]`` in q's dtype; the final state as
    ``S`` or ``(S, z)``, float32.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    _checks.check_floating(name, x)
  if q.ndim != 4:
    raise ValueError(f"q has shape {_checks.shape_str(q.shape)}; expected [B, T, H, K]")
  batch, time, heads, dk = q.shape
  _checks.check_shape("k", k, (batch, time, heads, dk))
  if v.ndim != 4 or v.shape[:3] != (batch, time, heads):
    raise ValueError(f"v has shape {_checks.shape_str(v.shape)}; expected "
                     f"[B, T, H, V] = {_checks.shape_str((batch, time, heads, 'V'))}")
  dv = v.shape[-1]
  _check_log_decay(log_decay, batch, time, heads, dk)
  _checks.check_segment_ids(segment_ids, batch, time)
  _checks.check_positive_int("chunk_size", chunk_size)
  if initial_state is not None:
    if normalize:
      if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise ValueError("initial_state must be the pair (S, z) when normalize=True; "
                         f"got {type(initial_state).__name__}")
      _checks.check_shape("initial_state S", initial_state[0], (batch, heads, dk, dv))
      _checks.check_shape("initial_state z", initial_state[1], (batch, heads, dk))
    else:
      _checks.check_shape("initial_state", initial_state, (batch, heads, dk, dv))
  decay_kind = "none" if log_decay is None else ("scalar" if log_decay.ndim == 3 else "vector")
  chosen = REGISTRY.resolve(impl, time=time, decay=decay_kind, causal=causal,
                            normalize=normalize, dtype=q.dtype, chunk_size=chunk_size)

  out_dtype = q.dtype
  f32 = lambda x: x.astype(jnp.float32)
  scale = dk ** -0.5 if scale is None else scale
  q, k, v = f32(q) * scale, f32(k), f32(v)
  if log_decay is None:
    g = jnp.zeros((batch, time, heads, 1), jnp.float32)
  else:
    g = f32(log_decay)
    g = g[..., None] if decay_kind == "scalar" else g
  doc = (None if segment_ids is None
         else jnp.cumsum(_checks.segment_starts(segment_ids), axis=1, dtype=jnp.int32))
  if initial_state is None:
    s0 = jnp.zeros((batch, heads, dk, dv + normalize), jnp.float32)
  elif normalize:
    s0 = jnp.concatenate([f32(initial_state[0]), f32(initial_state[1])[..., None]], -1)
  else:
    s0 = f32(initial_state)
  if normalize:
    v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], -1)

  o, state = chosen.fn(q, k, v, g, s0, doc, causal=causal, chunk_size=chunk_size)
  if normalize:
    o = o[..., :dv] / (o[..., dv:] + _EPS)
    state = (state[..., :dv], state[..., dv])
  return o.astype(out_dtype), state
