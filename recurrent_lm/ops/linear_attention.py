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

  *Scalar decay* (and none): ``e^{b_i − b_j}`` is a ``C × C`` matrix per
  head that multiplies ``Q Kᵀ``; the backward is written by hand
  (:func:`_scalar_chunks_bwd`: eight matmuls and one reverse scan), 15–20%
  faster on CPU than autodiff of the forward. *Vector decay* cannot factor out of the key
  contraction, and the usual ``(q ⊙ e^{b})(k ⊙ e^{−b})ᵀ`` overflows once a
  chunk decays by more than ~e^{88}. Instead the chunk is cut into
  sub-chunks of ``_SUB_CHUNK``; for a query sub-chunk I with reference
  ``r_I`` (the cumulated log-decay just before I) and a key j before I::

      (q_i ⊙ e^{b_i − b_j})·k_j = (q_i ⊙ e^{b_i − r_I})·(k_j ⊙ e^{r_I − b_j}),

  both exponents ≤ 0 — for each query sub-chunk one matmul against only the
  keys before it; the diagonal sub-chunk blocks are formed element-wise
  (``sub × sub × K``). This is the secondary-chunking formulation of GLA,
  with every factor bounded by 1.
* ``pallas`` — ``pallas_kernels.linear_attention``: the chunked form as GPU
  (Triton) / TPU (Mosaic) kernels, forward and backward, the state carried
  in float32 across chunks inside the kernel; bfloat16 inputs are multiplied
  in bfloat16.
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

import pallas_kernels.linear_attention as pallas_linear_attention
from recurrent_lm.ops import _checks
from recurrent_lm.ops._dispatch import Registry, kernel_predicate
from recurrent_lm.ops.linear_scan import linear_scan

_EPS = 1e-6
# Sub-chunk of the vector-decay form: 8 balances the element-wise diagonal
# blocks (∝ sub) against the rescaled key copies (∝ C / sub); measured on CPU
# against 4 and 16.
_SUB_CHUNK = 8


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
    q_t, k_t, v_t, g_t, reset_t = inputs
    decay = jnp.where(reset_t[:, None, None, None], 0.0, jnp.exp(g_t)[..., None])
    state = decay * state + k_t[..., :, None] * v_t[..., None, :]
    # Causal: read the state now. Non-causal: keep every state for the read below.
    return state, jnp.einsum("bhk,bhkv->bhv", q_t, state) if causal else state

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  s_final, out = lax.scan(step, s0, (time_major(q), time_major(k), time_major(v),
                                     time_major(g), time_major(reset)))
  out = jnp.moveaxis(out, 0, 1)
  if causal:
    return out, s_final
  # Every position reads the state at the last position of its document.
  last = jax.vmap(lambda d: jnp.searchsorted(d, d, side="right") - 1)(doc)
  states = jnp.take_along_axis(out, last[:, :, None, None, None], axis=1)  # [B, T, H, K, V]
  return jnp.einsum("bthk,bthkv->bthv", q, states), s_final


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
  # Blocks left of the diagonal, one query sub-chunk I at a time against the
  # keys before it, rescaled to r_I (the cumulated log-decay just before I).
  rows = [o[..., 0, :, :]]
  for i in range(1, n):
    start = i * sub
    ref = b[..., start - 1:start, :]  # r_I: [..., 1, K]
    q_ref = qs[..., i, :, :] * jnp.exp(bs[..., i, :, :] - ref)  # [..., sub, K]
    k_ref = k[..., :start, :] * jnp.exp(ref - b[..., :start, :])  # [..., I·sub, K]
    scores = jnp.einsum("...ik,...jk->...ij", q_ref, k_ref)
    if same_doc is not None:
      scores = jnp.where(same_doc[..., i, :, :start], scores, 0.0)
    rows.append(o[..., i, :, :] + jnp.einsum("...ij,...jv->...iv", scores, v[..., :start, :]))
  return jnp.stack(rows, -3).reshape(*lead, chunk, v.shape[-1])


def _scan_chunk_states(decay, chunk_kv, s0):
  """``S_n = decay_n · S_{n−1} + kv_n`` over the chunk axis 2.

  decay: ``[B, H, N, G]``; chunk_kv: ``[B, H, N, K, V]``; s0: ``[B, H, K, V]``.
  Returns the state entering every chunk ``[B, H, N, K, V]`` and the final one.
  """
  def step(state, inputs):
    decay_n, kv_n = inputs
    return decay_n[..., None] * state + kv_n, state

  s_final, s_in = lax.scan(step, s0, (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(chunk_kv, 2, 0)))
  return jnp.moveaxis(s_in, 0, 2), s_final


def _boundary_factors(b, masks):
  """``e^{b}``, ``e^{b_C − b}`` and ``e^{b_C}``: how each position of a chunk
  reads the entering state, how each key reaches the chunk's end, and how the
  whole chunk decays — zero across a document boundary.

  b: ``[B, H, N, C, ...]`` in-chunk cumulated log-decays (trailing ``K`` for
  per-channel decays); masks: None or ``(sees_state, reaches_end, same_doc)``
  bool ``[B, 1, N, C]``, ``[B, 1, N, C]``, ``[B, 1, N, C, C]``.
  """
  b_last = b[:, :, :, -1:]
  if masks is None:
    return jnp.exp(b), jnp.exp(b_last - b), jnp.exp(b_last[:, :, :, 0])
  trailing = (None,) * (b.ndim - 4)
  sees_state, reaches_end = masks[0][(...,) + trailing], masks[1][(...,) + trailing]
  return (jnp.where(sees_state, jnp.exp(b), 0.0),
          _masked_exp(reaches_end, b_last - b),
          jnp.where(sees_state[:, :, :, -1], jnp.exp(b_last[:, :, :, 0]), 0.0))


def _scalar_factors(g, masks):
  """The decay factors of the scalar-decay chunk equations, every exponent ≤ 0.

  g: ``[B, H, N, C]`` log-decays; masks as in :func:`_boundary_factors`.
  Returns its three factors and ``D_ij = e^{b_i − b_j}`` (j ≤ i, same
  document), with ``b = cumsum(g)``.
  """
  b = jnp.cumsum(g, axis=-1)
  chunk = g.shape[-1]
  causal = np.tril(np.ones((chunk, chunk), bool))
  if masks is not None:
    causal = causal & masks[2]
  intra_decay = _masked_exp(causal, b[..., :, None] - b[..., None, :])
  return (*_boundary_factors(b, masks), intra_decay)


def _scalar_chunks_fwd(q, k, v, g, s0, masks):
  q_decay, k_decay, chunk_decay, intra_decay = _scalar_factors(g, masks)
  chunk_kv = jnp.einsum("bhnck,bhncv->bhnkv", k * k_decay[..., None], v)
  s_in, s_final = _scan_chunk_states(chunk_decay[..., None], chunk_kv, s0)
  scores = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * intra_decay
  o = (jnp.einsum("bhnij,bhnjv->bhniv", scores, v)
       + jnp.einsum("bhnck,bhnkv->bhncv", q * q_decay[..., None], s_in))
  return (o, s_final), (q, k, v, g, masks, s_in, scores)


def _scalar_chunks_bwd(residuals, cotangents):
  """Hand-written backward: 8 matmuls and one reverse scan over chunks.

  With ``q̃ = q ⊙ e^{b}``, ``k̃ = k ⊙ e^{b_C − b}``, ``A = (q kᵀ) ⊙ D`` and ``R_n``
  the gradient of the state entering chunk n:
  ``R_n = q̃_nᵀ dO_n + e^{b_C,n} R_{n+1}`` (``R_N = dS_final``),
  ``dV = Aᵀ dO + k̃ R_{n+1}``, ``dQ = (dO Vᵀ ⊙ D) K + (dO S_inᵀ) ⊙ e^{b}``,
  ``dK = (dO Vᵀ ⊙ D)ᵀ Q + (V R_{n+1}ᵀ) ⊙ e^{b_C − b}``; log-decay gradients
  collect the same products and are reverse-cumulated over the chunk.
  """
  q, k, v, g, masks, s_in, scores = residuals
  d_o, d_s_final = cotangents
  q_decay, k_decay, chunk_decay, intra_decay = _scalar_factors(g, masks)
  q_tilde, k_tilde = q * q_decay[..., None], k * k_decay[..., None]

  def step(r_next, inputs):
    u_n, decay_n = inputs
    return u_n + decay_n[..., None, None] * r_next, r_next

  u = jnp.einsum("bhnck,bhncv->bhnkv", q_tilde, d_o)
  d_s0, d_kv = lax.scan(step, d_s_final, (jnp.moveaxis(u, 2, 0), jnp.moveaxis(chunk_decay, 2, 0)),
                        reverse=True)
  d_kv = jnp.moveaxis(d_kv, 0, 2)  # R_{n+1}: gradient of chunk n's kᵀv

  d_scores = jnp.einsum("bhniv,bhnjv->bhnij", d_o, v)
  d_v = (jnp.einsum("bhnij,bhniv->bhnjv", scores, d_o)
         + jnp.einsum("bhnck,bhnkv->bhncv", k_tilde, d_kv))
  d_q_tilde = jnp.einsum("bhncv,bhnkv->bhnck", d_o, s_in)
  d_k_tilde = jnp.einsum("bhncv,bhnkv->bhnck", v, d_kv)
  d_qk = d_scores * intra_decay
  d_q = jnp.einsum("bhnij,bhnjk->bhnik", d_qk, k) + d_q_tilde * q_decay[..., None]
  d_k = jnp.einsum("bhnij,bhnik->bhnjk", d_qk, q) + d_k_tilde * k_decay[..., None]

  d_exponent = d_scores * scores  # d/d(b_i − b_j)
  from_k = jnp.sum(d_k_tilde * k_tilde, -1)
  d_b = (d_exponent.sum(-1) - d_exponent.sum(-2)
         + jnp.sum(d_q_tilde * q_tilde, -1) - from_k)
  d_chunk_decay = jnp.sum(d_kv * s_in, (-2, -1))
  d_b = d_b.at[..., -1].add(from_k.sum(-1) + d_chunk_decay * chunk_decay)
  d_g = jnp.flip(jnp.cumsum(jnp.flip(d_b, -1), -1), -1)
  return d_q, d_k, d_v, d_g, d_s0, None


@jax.custom_vjp
def _scalar_chunks(q, k, v, g, s0, masks):
  """Scalar-decay chunk equations (module docstring) with a hand-written vjp.

  q, k: ``[B, H, N, C, K]``; v: ``[B, H, N, C, V]``; g: ``[B, H, N, C]``;
  s0: ``[B, H, K, V]``. Returns ``(o [B, H, N, C, V], S_final)``.
  """
  return _scalar_chunks_fwd(q, k, v, g, s0, masks)[0]


_scalar_chunks.defvjp(_scalar_chunks_fwd, _scalar_chunks_bwd)


def _vector_chunks(q, k, v, g, s0, masks, sub):
  """Per-key-channel-decay chunk equations (module docstring), autodiff vjp.

  q, k, g: ``[B, H, N, C, K]``; v: ``[B, H, N, C, V]``; s0: ``[B, H, K, V]``;
  masks as in :func:`_scalar_factors`. Returns ``(o, S_final)``.
  """
  b = jnp.cumsum(g, axis=3)  # in-chunk, inclusive
  q_decay, k_decay, chunk_decay = _boundary_factors(b, masks)
  chunk_kv = jnp.einsum("bhnck,bhncv->bhnkv", k * k_decay, v)
  s_in, s_final = _scan_chunk_states(chunk_decay, chunk_kv, s0)
  same_doc = None if masks is None else masks[2][:, 0]
  o = (jnp.einsum("bhnck,bhnkv->bhncv", q * q_decay, s_in)
       + _vector_intra(q, k, v, b, same_doc, sub))
  return o, s_final


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

  if doc is None:
    masks = None
  else:
    doc = doc.reshape(batch, n, chunk)
    doc_in = jnp.concatenate([doc[:, :1, 0], doc[:, :-1, -1]], axis=1)  # doc of S_{n-1}
    masks = ((doc == doc_in[..., None])[:, None],  # sees_state [B, 1, N, C]
             (doc == doc[:, :, -1:])[:, None],  # reaches_end
             (doc[:, :, :, None] == doc[:, :, None, :])[:, None])  # same_doc [B, 1, N, C, C]

  if not vector:
    o, s_final = _scalar_chunks(q, k, v, g[..., 0], s0, masks)
  else:
    o, s_final = _vector_chunks(q, k, v, g, s0, masks, sub)

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


REGISTRY = Registry(
    "linear_attention",
    # CPU: chunked beats parallel at every length measured (64 to 8192) and
    # recurrent whenever gradients are taken (BUILD.md, experiments/op_bench.py).
    auto_order={"cpu": ("chunked", "recurrent"),
                "default": ("pallas", "chunked", "recurrent")})
REGISTRY.register("recurrent", _recurrent)
REGISTRY.register("parallel", _both_directions(_parallel_causal))
REGISTRY.register("chunked", _both_directions(_chunked_causal))
# The kernel is causal; the non-causal read is built from causal passes here.
REGISTRY.register(
    "pallas", _both_directions(pallas_linear_attention.linear_attention),
    kernel_predicate(lambda **call: pallas_linear_attention.supports(**{**call, "causal": True})))


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
    impl: ``"recurrent" | "parallel" | "chunked" | "pallas" | "auto"``.

  Returns:
    ``(o, state)``: ``o [B, T, H, V]`` in q's dtype; the final state as
    ``S`` or ``(S, z)``, float32.
  """
  batch, time, heads, dk, dv = _checks.check_qkv(q, k, v)
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
  from recurrent_lm.ops import sequence_parallel   # it imports this module
  if causal and sequence_parallel.splits(time):
    return sequence_parallel.split_sequence(
        lambda q, k, v, g, ids, s0: sequence_parallel.linear_attention(
            q, k, v, axis_name=sequence_parallel.SEQUENCE_AXIS, log_decay=g,
            normalize=normalize, scale=scale, initial_state=s0, segment_ids=ids,
            chunk_size=chunk_size, impl=impl),
        (q, k, v, log_decay, segment_ids), (initial_state,), time)
  decay_kind = "none" if log_decay is None else ("scalar" if log_decay.ndim == 3 else "vector")
  chosen = REGISTRY.resolve(impl, time=time, decay=decay_kind, causal=causal,
                            normalize=normalize, dtype=q.dtype, chunk_size=chunk_size,
                            key_dim=dk)

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

  if chosen.name == "pallas":   # the kernel multiplies bfloat16 and accumulates in float32
    q, k, v = (x.astype(out_dtype) for x in (q, k, v))
  o, state = chosen.fn(q, k, v, g, s0, doc, causal=causal, chunk_size=chunk_size)
  if normalize:
    o = o[..., :dv] / (o[..., dv:] + _EPS)
    state = (state[..., :dv], state[..., dv])
  return o.astype(out_dtype), state
