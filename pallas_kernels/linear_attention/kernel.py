"""Chunked (gated) linear attention as Pallas kernels, forward and backward.

Per head, with the state ``S ∈ R^{K×V}`` and log-decays ``g ≤ 0``::

    S_t = diag(e^{g_t}) S_{t−1} + k_t v_tᵀ,      o_t = q_tᵀ S_t

``g`` is ``[B, T, H, G]``: ``G = 1`` one decay per head (zeros: no decay),
``G = K`` one per key channel (GLA). ``q`` arrives already scaled.

The sequence is cut into chunks of ``L``. With ``b`` the log-decay cumulated
inside a chunk (inclusive, cumulated outside the kernels), position ``i`` of
a chunk entered with state ``S`` and the state leaving it are::

    o_i = (q_i ⊙ e^{b_i})ᵀ S + Σ_{j≤i} (Σ_c q_ic k_jc e^{b_ic − b_jc}) v_j
    S'  = diag(e^{b_L}) S + Σ_j (k_j ⊙ e^{b_L − b_j}) v_jᵀ

With documents (``doc``), a pair ``(i, j)`` counts only inside one document,
``i`` reads ``S`` only if its document began before the chunk, and ``S``
(resp. key ``j``) reaches ``S'`` only if the chunk's last position is in the
same document. Every exponent is ≤ 0:

* scalar decay: ``e^{b_i − b_j}`` is an ``[L, L]`` matrix that multiplies
  ``Q Kᵀ``; everything is whole-chunk matmuls.
* vector decay: the chunk is cut into sub-chunks of ``_SUB``. Query
  sub-chunk ``I`` against an earlier key sub-chunk ``J`` is one matmul of
  ``q_I ⊙ e^{b_I − r_I}`` and ``k_J ⊙ e^{r_I − b_J}``, with ``r_I`` the
  cumulated log-decay just before ``I`` (both exponents ≤ 0); the diagonal
  blocks ``I = J`` are built element-wise one key column at a time
  (``[_SUB, K]`` per column), since no reference point keeps both factors ≤ 1
  there.

Backward, per chunk in reverse with ``dS`` the cotangent of the leaving state
``S'`` (``dS_final`` for the last chunk), ``dP_ij = do_i·v_j`` on the same
pairs as the forward, and the forward's scores ``A``::

    dq_i = Σ_{j≤i} dP_ij (k_j ⊙ e^{b_i − b_j}) + e^{b_i} ⊙ (S do_i)
    dk_j = Σ_{i≥j} dP_ij (q_i ⊙ e^{b_i − b_j}) + e^{b_L − b_j} ⊙ (dS v_j)
    dv_j = Σ_{i≥j} A_ij do_i + dSᵀ (k_j ⊙ e^{b_L − b_j})
    dS_in = diag(e^{b_L}) dS + Σ_i (q_i ⊙ e^{b_i}) do_iᵀ

Every factor ``e^{b_x − b_y}`` gives ``+`` to ``b_x`` and ``−`` to ``b_y``,
so the gradient of the cumulated log-decay needs no more matmuls::

    db_i = q_i ⊙ dq_i − k_i ⊙ dk_i   (+ rowsum(dS ⊙ S') at the chunk's last position)

(summed over channels for a scalar decay), and ``dg`` is its reverse
cumulative sum inside the chunk (autodiff of the ``cumsum``, in XLA). Taken
literally, that sum carries O(1) terms with no decay in them, the pairs
``j = i`` and the last key's write ``e^{b_L − b_L}``, which cancel only up to
rounding: under strong decays (gradients ~1e-16) that rounding would be the
whole answer. So the kernels compute the pairs ``j < i`` by matmuls, add the
pairs ``j = i`` to ``dq, dk, dv`` in closed form (``do_i·v_i``,
``q_i·k_i``), and form ``db`` from decay-carrying terms only; the chunk-end
term is ``e^{b_L} ⊙ rowsum(dS ⊙ S)`` plus the other keys' writes. The
forward saves every chunk's entering state for the backward.

Layout: per-chunk arrays are ``[B, H, N, L, X]``; ``V`` is cut into blocks of
``BV`` (the state columns are independent), so the backward's ``dq``,
``dk`` and ``db`` are partial sums over value blocks, summed in XLA. Block shapes per
backend (:func:`_block_shapes`):

* ``gpu`` (Triton): grid ``(B, H, V/BV)``; each program loops over the
  chunks with the state ``[K, BV]`` in registers (a Triton grid has no order
  to carry a state through). ``L``, ``K``, ``BV`` are powers of two ≥ 16
  (``tl.dot``); ``BV`` at most 64 (32 for ``K > 128``) so the float32 state
  stays ≤ 8192 values per program.
* ``tpu`` (Mosaic): grid ``(B, H, V/BV, N)``, the chunk axis sequential with
  the state in VMEM scratch; ``K`` and ``BV`` multiples of 128 (lanes), ``L``
  a multiple of 16 (sublanes; bfloat16 packs two).

Matmuls take their operands in the input dtype and accumulate in float32
(float32 operands at ``Precision.HIGHEST``: no TF32); the state and every
decay factor are float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._poison import poison

BACKENDS = ("gpu", "tpu")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
DECAYS = ("none", "scalar", "vector")
# Triton: powers of two, ≥ 16 for tl.dot, ≤ 128 so the [L, L] tiles stay in
# registers. Mosaic: multiples of 16 up to what VMEM comfortably holds.
GPU_CHUNKS = (16, 32, 64, 128)
TPU_MAX_CHUNK = 256
# Widest key dimension (padded): Triton holds [L, K] tiles of q, k and the
# decays in registers; Mosaic holds them, and the [K, BV] state, in VMEM.
GPU_MAX_KEY = 256
TPU_MAX_KEY = 512
# Vector-decay sub-chunk: the smallest tl.dot dimension and one bfloat16
# sublane tile; the element-wise diagonal blocks cost ∝ _SUB.
_SUB = 16


def _next_power_of_2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _block_shapes(backend: str, *, time: int, key_dim: int, value_dim: int,
                  chunk_size: int) -> tuple[int, int, int, int]:
  """``(L, K_pad, BV, V_pad)``: chunk, padded key width, value block, padded
  value width. A sequence shorter than a chunk gets one chunk of its own,
  rounded up to the backend's granule."""
  if backend == "gpu":
    key = _next_power_of_2(max(key_dim, 16))
    block_v = min(_next_power_of_2(max(value_dim, 16)), 64 if key <= 128 else 32)
    return (min(chunk_size, _next_power_of_2(max(time, 16))), key, block_v,
            _round_up(value_dim, block_v))
  if backend == "tpu":
    return (min(chunk_size, _round_up(time, 16)), _round_up(key_dim, 128), 128,
            _round_up(value_dim, 128))
  raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


def supports(*, backend: str, time: int | None = None, decay: str = "scalar",
             causal: bool = True, normalize: bool = False, dtype: Any = None,
             chunk_size: int = 64, key_dim: int | None = None) -> bool:
  """Whether :func:`linear_attention` lowers and is exact for this call.

  Takes the op's call description (``time, decay, causal, normalize, dtype,
  chunk_size``; ``key_dim`` when known). Causal only: the op builds the
  non-causal read from causal passes. ``normalize`` is a value column to the
  kernel, so any setting is supported.
  """
  del normalize
  if backend not in BACKENDS or not causal or decay not in DECAYS:
    return False
  if time is not None and time < 1:
    return False
  if dtype is not None and jnp.dtype(dtype) not in DTYPES:
    return False
  if backend == "gpu":
    return chunk_size in GPU_CHUNKS and (key_dim is None
                                         or _next_power_of_2(key_dim) <= GPU_MAX_KEY)
  return (chunk_size % 16 == 0 and 16 <= chunk_size <= TPU_MAX_CHUNK
          and (key_dim is None or _round_up(key_dim, 128) <= TPU_MAX_KEY))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call: backend, block sizes, grid."""
  backend: str
  interpret: Any  # False, True or pltpu.InterpretParams
  vector: bool  # one decay per key channel
  segments: bool  # doc given: masks on
  chunk: int
  key: int
  block_v: int
  n_chunks: int
  n_v: int
  poison: bool

  @property
  def grid_over_chunks(self) -> bool:
    return self.backend == "tpu"

  @property
  def decay_width(self) -> int:
    return self.key if self.vector else 1


class _Inputs(NamedTuple):
  """A chunk's input refs, all ``[N, L, X]`` (gpu) or ``[L, X]`` (tpu)."""
  q: Any      # [L, K]
  k: Any      # [L, K]
  v: Any      # [L, BV]
  b: Any      # [L, G] float32 in-chunk cumulated log-decay
  b_row: Any  # [1, L] b as a row (scalar decay: the key side of e^{b_i − b_j}); else None
  decay: Any  # [G, 1] float32 e^{b_L}, 0 where a document starts in the chunk
  doc: Any    # [L, 1] int32 start of the position's document in the chunk, −1 before it; or None


def _input_fields(plan: _Plan) -> tuple[str, ...]:
  absent = (("b_row",) if plan.vector else ()) + (() if plan.segments else ("doc",))
  return tuple(f for f in _Inputs._fields if f not in absent)


def _unflatten_inputs(plan: _Plan, refs) -> _Inputs:
  present = dict(zip(_input_fields(plan), refs))
  return _Inputs(*(present.get(f) for f in _Inputs._fields))


def _at(n, rows=None):
  """Index of a chunk's tile: chunk ``n`` of a whole-sequence ref (gpu), or
  the block itself (tpu: ``n`` None); ``rows = (start, size)`` picks rows."""
  rows = slice(None) if rows is None else pl.ds(*rows)
  return (rows, slice(None)) if n is None else (n, rows, slice(None))


def _store(ref, index, value):
  """``ref[index] = value`` for every per-chunk output (one place, so a test
  can drop a chunk's write and see the poisoned output)."""
  ref[index] = value.astype(ref.dtype)


def _dot(a, b, contract):
  """Contracts ``contract`` in the operands' dtype, accumulating in float32;
  float32 operands at full precision (Triton would otherwise use TF32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _mm(a, b):
  """``a @ b``."""
  return _dot(a, b, ((1,), (0,)))


def _mm_nt(a, b):
  """``a @ bᵀ``."""
  return _dot(a, b, ((1,), (1,)))


def _mm_tn(a, b):
  """``aᵀ @ b``."""
  return _dot(a, b, ((0,), (0,)))


def _row_sum(x):
  return jnp.sum(x, axis=1, keepdims=True)


def _col_sum(x):
  return jnp.sum(x, axis=0, keepdims=True)


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _row(x, index):
  """Row ``index`` of ``x`` as ``[1, X]`` (a masked sum: no dynamic slicing)."""
  return _col_sum(jnp.where(_iota((x.shape[0], 1), 0) == index, x, jnp.zeros_like(x)))


def _column(x, index):
  """Column ``index`` of ``x`` as ``[R, 1]``."""
  return _row_sum(jnp.where(_iota((1, x.shape[1]), 1) == index, x, jnp.zeros_like(x)))


def _exp_where(mask, exponent):
  """``e^{exponent}`` where ``mask`` (None: everywhere), else 0; masked
  exponents are never exponentiated."""
  return jnp.exp(exponent if mask is None else jnp.where(mask, exponent, -jnp.inf))


class _Masks(NamedTuple):
  """Masks of a whole chunk; ``sees`` and ``reach`` are None without documents."""
  pairs: Any  # [L, L] bool: j ≤ i in one document
  sees: Any   # [L, 1] bool: i reads the entering state
  reach: Any  # [L, 1] bool: key j reaches the chunk's end


def _reaches_end(plan: _Plan, x: _Inputs, n, start: int, size: int):
  """``[size, 1]`` bool: whether keys ``start…start+size−1`` of chunk ``n``
  are in the document of the chunk's last position (None without documents)."""
  if not plan.segments:
    return None
  return start + _iota((size, 1), 0) >= _row(x.doc[_at(n)], plan.chunk - 1)


def _masks(plan: _Plan, x: _Inputs, n, *, strict: bool = False) -> _Masks:
  """The chunk's masks; ``strict`` leaves the pairs ``j = i`` out."""
  length = plan.chunk
  row, col = _iota((length, length), 0), _iota((length, length), 1)
  pairs = col < row if strict else col <= row
  if not plan.segments:
    return _Masks(pairs, None, None)
  doc = x.doc[_at(n)]
  return _Masks(pairs & (col >= doc), doc < 0, _reaches_end(plan, x, n, 0, length))


def _scalar_forward(plan: _Plan, x: _Inputs, n, s, o_ref):
  """Chunk ``n`` with a scalar decay from the entering state ``s [K, BV]``:
  stores ``o`` and returns the leaving state."""
  q, k, v, b = x.q[_at(n)], x.k[_at(n)], x.v[_at(n)], x.b[_at(n)]
  cast = lambda a: a.astype(q.dtype)
  m = _masks(plan, x, n)
  scores = _mm_nt(q, k) * _exp_where(m.pairs, b - x.b_row[_at(n)])
  o = _mm(cast(scores), v) + _exp_where(m.sees, b) * _mm(q, cast(s))
  _store(o_ref, _at(n), o)
  to_end = _exp_where(m.reach, _row(b, plan.chunk - 1) - b)
  return x.decay[_at(n)] * s + _mm_tn(cast(to_end * k), v)


def _state_keys(k, d_k_state, last_row: bool):
  """``k ⊙ dk`` of the state-write term without the chunk's last key (its
  factor ``e^{b_L − b_L}`` holds no decay), and the same summed over keys
  (``[1, K]``): what the write gives ``−b_j`` and ``+b_L``."""
  if last_row:
    d_k_state = jnp.where(_iota((k.shape[0], 1), 0) < k.shape[0] - 1, d_k_state, 0.0)
  k_d_k = k.astype(jnp.float32) * d_k_state
  return k_d_k, _col_sum(k_d_k)


def _scalar_backward(plan: _Plan, x: _Inputs, n, s_in, d_s, d_o_ref, out):
  """Gradients of chunk ``n`` (module docstring) from its entering state and
  ``d_s``, the cotangent of the leaving one: stores ``dq, dk, dv, db`` and the
  chunk decay's ``rowsum(dS ⊙ S) e^{b_L}``; returns the entering state's
  cotangent.

  Pairs ``j < i`` go through the ``[L, L]`` matmuls, the pairs ``j = i``
  (no decay) in closed form, so ``db`` sums only terms that carry a decay.
  """
  q, k, v, b = x.q[_at(n)], x.k[_at(n)], x.v[_at(n)], x.b[_at(n)]
  d_o = d_o_ref[_at(n)]
  cast, f32 = (lambda a: a.astype(q.dtype)), (lambda a: a.astype(jnp.float32))
  m = _masks(plan, x, n, strict=True)
  pair_decay = _exp_where(m.pairs, b - x.b_row[_at(n)])  # [L, L]
  reads = _exp_where(m.sees, b)  # [L, 1]
  to_end = _exp_where(m.reach, _row(b, plan.chunk - 1) - b)  # [L, 1]
  d_s_cast = cast(d_s)
  d_scores = _mm_nt(d_o, v) * pair_decay
  scores = _mm_nt(q, k) * pair_decay
  d_p_self, a_self = _row_sum(f32(d_o) * f32(v)), _row_sum(f32(q) * f32(k))  # j = i
  d_q = _mm(cast(d_scores), k) + reads * _mm_nt(d_o, cast(s_in))
  d_k = _mm_tn(cast(d_scores), q)
  d_k_state = to_end * _mm_nt(v, d_s_cast)
  _store(out.d_q, _at(n), d_q + d_p_self * k)
  _store(out.d_k, _at(n), d_k + d_p_self * q + d_k_state)
  _store(out.d_v, _at(n), _mm_tn(cast(scores), d_o) + a_self * d_o
         + _mm(cast(to_end * k), d_s_cast))
  k_d_k, k_d_k_sum = _state_keys(k, d_k_state, last_row=True)
  is_last = _iota((plan.chunk, 1), 0) == plan.chunk - 1
  d_b = q * d_q - k * d_k - k_d_k + jnp.where(is_last, k_d_k_sum, 0.0)
  _store(out.d_b, _at(n), _row_sum(d_b))
  decay = x.decay[_at(n)]
  _store(out.d_b_last, _at(n), _col_sum(decay * _row_sum(d_s * s_in)))
  return decay * d_s + _mm_tn(cast(reads * q), d_o)


def _sub_chunks(plan: _Plan, ref, n):
  """The ``[_SUB, X]`` sub-chunk tiles of chunk ``n`` of ``ref``."""
  return [ref[_at(n, (i * _SUB, _SUB))] for i in range(plan.chunk // _SUB)]


def _diagonal_decays(b, doc, start, *, strict=False):
  """``decays(j)``: the ``[_SUB, K]`` factors ``e^{b_i − b_j}`` of key ``j``
  inside one sub-chunk, for ``j ≤ i`` (``j < i`` if ``strict``) in one
  document, else 0.

  ``start`` is the sub-chunk's first row in the chunk (``doc`` counts from
  the chunk's start).
  """
  rows = _iota((b.shape[0], 1), 0)

  def decays(j):
    valid = rows > j if strict else rows >= j
    if doc is not None:
      valid &= start + j >= doc
    return _exp_where(valid, b - _row(b, j))

  return decays


def _diagonal_scores(q, k, b, doc, start):
  """``A_ij = Σ_c q_ic k_jc e^{b_ic − b_jc}`` on one diagonal sub-chunk block
  (``[_SUB, _SUB]``), built one key column ``j`` at a time."""
  size = q.shape[0]
  q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  decays = _diagonal_decays(b, doc, start)
  cols = _iota((1, size), 1)

  def column(j, scores):
    return jnp.where(cols == j, _row_sum(q * _row(k, j) * decays(j)), scores)

  return lax.fori_loop(0, size, column, jnp.zeros((size, size), jnp.float32))


def _diagonal_backward(q, k, b, doc, start, d_scores):
  """On one diagonal sub-chunk block, the pairs ``j < i`` only (``j = i``
  holds no decay; the caller adds it in closed form): the scores ``A`` and
  ``dq_i = Σ_j dP_ij k_j ⊙ e^{b_i − b_j}``, ``dk_j = Σ_i dP_ij q_i ⊙
  e^{b_i − b_j}`` from ``d_scores = dP`` (``[_SUB, _SUB]``)."""
  size = q.shape[0]
  q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  decays = _diagonal_decays(b, doc, start, strict=True)
  cols, rows = _iota((1, size), 1), _iota((size, 1), 0)

  def column(j, carry):
    scores, d_q, d_k = carry
    decay = decays(j)  # [_SUB, K]
    k_j, d_p = _row(k, j), _column(d_scores, j)
    scores = jnp.where(cols == j, _row_sum(q * k_j * decay), scores)
    d_q = d_q + d_p * k_j * decay
    d_k = jnp.where(rows == j, _col_sum(d_p * q * decay), d_k)
    return scores, d_q, d_k

  zeros = jnp.zeros_like(q)
  return lax.fori_loop(0, size, column, (jnp.zeros((size, size), jnp.float32), zeros, zeros))


def _cross_doc(doc_i, key_start):
  """``[_SUB, _SUB]`` bool: key sub-chunk starting at ``key_start`` lies in
  query ``i``'s document (all keys are before the queries)."""
  return key_start + _iota((doc_i.shape[0], _SUB), 1) >= doc_i


def _vector_forward(plan: _Plan, x: _Inputs, n, s, o_ref):
  """Chunk ``n`` with per-channel decays (sub-chunks, module docstring):
  stores ``o`` and returns the leaving state."""
  q_sub, k_sub, v_sub, b_sub = (_sub_chunks(plan, ref, n) for ref in (x.q, x.k, x.v, x.b))
  doc_sub = _sub_chunks(plan, x.doc, n) if plan.segments else [None] * len(q_sub)
  cast = lambda a: a.astype(q_sub[0].dtype)
  b = x.b[_at(n)]
  to_end = _exp_where(_reaches_end(plan, x, n, 0, plan.chunk), _row(b, plan.chunk - 1) - b)
  s_next = x.decay[_at(n)] * s + _mm_tn(cast(x.k[_at(n)] * to_end), x.v[_at(n)])

  s_cast = cast(s)
  for i, (q_i, b_i, doc_i) in enumerate(zip(q_sub, b_sub, doc_sub)):
    sees = None if doc_i is None else doc_i < 0
    o_i = _mm(cast(q_i * _exp_where(sees, b_i)), s_cast)
    o_i += _mm(cast(_diagonal_scores(q_i, k_sub[i], b_i, doc_i, i * _SUB)), v_sub[i])
    if i:
      ref = _row(b_sub[i - 1], _SUB - 1)  # r_I, the cumulated log-decay before I
      q_ref = cast(q_i * jnp.exp(b_i - ref))
      for j in range(i):
        scores = _mm_nt(q_ref, cast(k_sub[j] * jnp.exp(ref - b_sub[j])))
        if doc_i is not None:
          scores = jnp.where(_cross_doc(doc_i, j * _SUB), scores, 0.0)
        o_i += _mm(cast(scores), v_sub[j])
    _store(o_ref, _at(n, (i * _SUB, _SUB)), o_i)
  return s_next


def _vector_backward(plan: _Plan, x: _Inputs, n, s_in, d_s, d_o_ref, out):
  """Gradients of chunk ``n`` with per-channel decays; as
  :func:`_scalar_backward`, block by block over sub-chunks."""
  q_sub, k_sub, v_sub, b_sub, d_o_sub = (
      _sub_chunks(plan, ref, n) for ref in (x.q, x.k, x.v, x.b, d_o_ref))
  doc_sub = _sub_chunks(plan, x.doc, n) if plan.segments else [None] * len(q_sub)
  cast, f32 = (lambda a: a.astype(q_sub[0].dtype)), (lambda a: a.astype(jnp.float32))
  s_in_cast, d_s_cast = cast(s_in), cast(d_s)
  decay = x.decay[_at(n)]
  d_s_in = decay * d_s
  # Per key sub-chunk, accumulated over the query sub-chunks: dk and dv of
  # the pairs j < i; per query sub-chunk: q ⊙ dq (db's share from queries).
  d_k, d_v, q_d_q = [], [], []

  for i, (q_i, k_i, v_i, b_i, d_o_i, doc_i) in enumerate(
      zip(q_sub, k_sub, v_sub, b_sub, d_o_sub, doc_sub)):
    sees = None if doc_i is None else doc_i < 0
    reads = _exp_where(sees, b_i)
    d_s_in += _mm_tn(cast(q_i * reads), d_o_i)
    scores, d_q_i, d_k_i = _diagonal_backward(q_i, k_i, b_i, doc_i, i * _SUB,
                                              _mm_nt(d_o_i, v_i))
    d_q_i += reads * _mm_nt(d_o_i, s_in_cast)
    d_k.append(d_k_i)
    d_v.append(_mm_tn(cast(scores), d_o_i))
    if i:
      ref = _row(b_sub[i - 1], _SUB - 1)  # r_I
      up = jnp.exp(b_i - ref)
      q_ref = cast(q_i * up)
      d_q_ref = jnp.zeros_like(d_q_i)
      for j in range(i):
        down = jnp.exp(ref - b_sub[j])
        k_ref = cast(k_sub[j] * down)
        scores = _mm_nt(q_ref, k_ref)
        d_scores = _mm_nt(d_o_i, v_sub[j])
        if doc_i is not None:
          same = _cross_doc(doc_i, j * _SUB)
          scores, d_scores = jnp.where(same, scores, 0.0), jnp.where(same, d_scores, 0.0)
        d_q_ref += _mm(cast(d_scores), k_ref)
        d_k[j] += _mm_tn(cast(d_scores), q_ref) * down
        d_v[j] += _mm_tn(cast(scores), d_o_i)
      d_q_i += d_q_ref * up
    q_d_q.append(q_i * d_q_i)
    _store(out.d_q, _at(n, (i * _SUB, _SUB)), d_q_i + _row_sum(f32(d_o_i) * f32(v_i)) * k_i)

  b_last = _row(b_sub[-1], _SUB - 1)
  k_d_k, k_d_k_sum = [], 0.0
  for j, (q_j, k_j, v_j, b_j, d_o_j) in enumerate(zip(q_sub, k_sub, v_sub, b_sub, d_o_sub)):
    rows = _at(n, (j * _SUB, _SUB))
    to_end = _exp_where(_reaches_end(plan, x, n, j * _SUB, _SUB), b_last - b_j)
    d_k_state = to_end * _mm_nt(v_j, d_s_cast)
    d_p_self, a_self = _row_sum(f32(d_o_j) * f32(v_j)), _row_sum(f32(q_j) * f32(k_j))
    _store(out.d_k, rows, d_k[j] + d_p_self * q_j + d_k_state)
    _store(out.d_v, rows, d_v[j] + a_self * d_o_j + _mm(cast(k_j * to_end), d_s_cast))
    share, share_sum = _state_keys(k_j, d_k_state, last_row=j == len(k_sub) - 1)
    k_d_k.append(share)
    k_d_k_sum += share_sum
  is_last = _iota((_SUB, 1), 0) == _SUB - 1
  for j, (k_j, share) in enumerate(zip(k_sub, k_d_k)):
    d_b = q_d_q[j] - k_j * d_k[j] - share
    if j == len(k_sub) - 1:
      d_b += jnp.where(is_last, k_d_k_sum, 0.0)
    _store(out.d_b, _at(n, (j * _SUB, _SUB)), d_b)
  _store(out.d_b_last, _at(n), decay * _row_sum(d_s * s_in))
  return d_s_in


class _Grads(NamedTuple):
  """The backward kernel's per-chunk output refs (float32 but ``d_v``;
  ``partial``: to be summed over value blocks)."""
  d_q: Any       # [L, K] partial
  d_k: Any       # [L, K] partial
  d_v: Any       # [L, BV]
  d_b: Any       # [L, G] partial: the decay-carrying terms of db
  d_b_last: Any  # [G, 1] partial: e^{b_L} ⊙ rowsum(dS ⊙ S), db's share at the chunk's end


def _forward_kernel(*refs, plan: _Plan, save_states: bool):
  """Runs the chunks in order. Refs: the inputs (:func:`_input_fields`),
  ``s0``; ``o, s_final`` (and every chunk's entering state when
  ``save_states``); the tpu scratch state."""
  n_in = len(_input_fields(plan))
  x = _unflatten_inputs(plan, refs[:n_in])
  s0_ref, o_ref, s_final_ref, *rest = refs[n_in:]
  s_in_ref = rest.pop(0) if save_states else None
  chunk = _vector_forward if plan.vector else _scalar_forward

  def step(n, s):
    if save_states:
      _store(s_in_ref, _at(n), s)
    return chunk(plan, x, n, s, o_ref)

  if plan.grid_over_chunks:
    (s_scratch,) = rest
    t = pl.program_id(3)

    @pl.when(t == 0)
    def _():
      s_scratch[...] = s0_ref[...]

    s_next = step(None, s_scratch[...])
    s_scratch[...] = s_next

    @pl.when(t == plan.n_chunks - 1)
    def _():
      s_final_ref[...] = s_next
  else:
    s_final_ref[...] = lax.fori_loop(0, plan.n_chunks, step, s0_ref[...])


def _backward_kernel(*refs, plan: _Plan):
  """Runs the chunks in reverse. Refs: the inputs, every chunk's entering
  state, ``d_o``, ``d_s_final``; the :class:`_Grads`, ``d_s0``; the tpu
  scratch ``dS``."""
  n_in = len(_input_fields(plan))
  x = _unflatten_inputs(plan, refs[:n_in])
  s_in_ref, d_o_ref, d_s_final_ref = refs[n_in:n_in + 3]
  out = _Grads(*refs[n_in + 3:n_in + 8])
  d_s0_ref, *scratch = refs[n_in + 8:]
  chunk = _vector_backward if plan.vector else _scalar_backward

  def step(n, d_s):
    return chunk(plan, x, n, s_in_ref[_at(n)], d_s, d_o_ref, out)

  if plan.grid_over_chunks:
    (d_s_scratch,) = scratch
    t = pl.program_id(3)

    @pl.when(t == 0)
    def _():
      d_s_scratch[...] = d_s_final_ref[...]

    d_s = step(None, d_s_scratch[...])
    d_s_scratch[...] = d_s

    @pl.when(t == plan.n_chunks - 1)
    def _():
      d_s0_ref[...] = d_s
  else:
    last = plan.n_chunks - 1
    d_s0_ref[...] = lax.fori_loop(0, plan.n_chunks, lambda t, d_s: step(last - t, d_s),
                                  d_s_final_ref[...])


class _Specs(NamedTuple):
  """Block specs by array kind (grid ``(B, H, NV)`` on gpu, ``(B, H, NV, N)`` on tpu)."""
  chunk: Any    # (*tile, along_v=False) for [B, H, N, *tile-sized] arrays
  doc: Any      # [B, N, L, 1]
  head: Any     # [B, H, K, V]: one value block
  partial: Any  # (*tile) for [NV, B, H, N, *tile-sized] arrays


def _specs(plan: _Plan, *, reverse: bool) -> _Specs:
  n, length = plan.n_chunks, plan.chunk
  head_tile = (plan.key, plan.block_v)
  if plan.grid_over_chunks:
    at = (lambda t: n - 1 - t) if reverse else (lambda t: t)
    return _Specs(
        chunk=lambda *tile, along_v=False: pl.BlockSpec(
            (None, None, None, *tile), lambda b, h, j, t: (b, h, at(t), 0, j if along_v else 0)),
        doc=pl.BlockSpec((None, None, length, 1), lambda b, h, j, t: (b, at(t), 0, 0)),
        head=pl.BlockSpec((None, None, *head_tile), lambda b, h, j, t: (b, h, 0, j)),
        partial=lambda *tile: pl.BlockSpec(
            (None, None, None, None, *tile), lambda b, h, j, t: (j, b, h, at(t), 0, 0)))
  return _Specs(
      chunk=lambda *tile, along_v=False: pl.BlockSpec(
          (None, None, n, *tile), lambda b, h, j: (b, h, 0, 0, j if along_v else 0)),
      doc=pl.BlockSpec((None, n, length, 1), lambda b, h, j: (b, 0, 0, 0)),
      head=pl.BlockSpec((None, None, *head_tile), lambda b, h, j: (b, h, 0, j)),
      partial=lambda *tile: pl.BlockSpec(
          (None, None, None, n, *tile), lambda b, h, j: (j, b, h, 0, 0, 0)))


def _input_specs(plan: _Plan, specs: _Specs) -> list:
  length, key, width = plan.chunk, plan.key, plan.decay_width
  by_field = dict(q=specs.chunk(length, key), k=specs.chunk(length, key),
                  v=specs.chunk(length, plan.block_v, along_v=True),
                  b=specs.chunk(length, width), b_row=specs.chunk(1, length),
                  decay=specs.chunk(width, 1), doc=specs.doc)
  return [by_field[f] for f in _input_fields(plan)]


def _chunk_inputs(plan: _Plan, q, k, v, b, doc) -> list:
  """The kernel inputs in :func:`_input_fields` order; ``b_row`` and the
  chunk decay are derived from ``b`` (their gradients flow through ``db``)."""
  decay = jnp.exp(b[..., -1, :])  # [B, H, N, G]
  if doc is not None:
    decay = jnp.where(doc[:, None, :, -1] < 0, decay, 0.0)
  arrays = dict(q=q, k=k, v=v, b=b, decay=decay[..., None], doc=doc)
  if not plan.vector:
    arrays["b_row"] = jnp.swapaxes(b, -1, -2)
  return [arrays[f] for f in _input_fields(plan)]


def _pallas_call(plan: _Plan, kernel, inputs, in_specs, out_shapes, out_specs, scratch, name):
  """``pl.pallas_call`` on the plan's grid; with ``plan.poison`` every output
  starts as NaN (aliased NaN inputs the kernel never reads)."""
  batch, heads = inputs[0].shape[:2]
  if plan.grid_over_chunks:
    grid = (batch, heads, plan.n_v, plan.n_chunks)
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
  else:
    grid = (batch, heads, plan.n_v)
    big = plan.chunk * max(plan.key, plan.block_v) > 64 * 64
    params = pltriton.CompilerParams(num_warps=8 if big else 4, num_stages=1)
  aliases = {}
  if plan.poison:
    kernel, inputs, in_specs, aliases = poison(kernel, inputs, in_specs, out_specs, out_shapes)
  return pl.pallas_call(
      kernel, out_shape=out_shapes, grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=scratch if plan.grid_over_chunks else (),
      input_output_aliases=aliases, compiler_params=params, interpret=plan.interpret,
      name=name)(*inputs)


def _forward(plan: _Plan, q, k, v, b, s0, doc, *, save_states: bool):
  specs = _specs(plan, reverse=False)
  batch, heads, n, length, _ = q.shape
  f32, state = jnp.float32, (plan.key, plan.n_v * plan.block_v)
  out_shapes = [jax.ShapeDtypeStruct(v.shape, f32), jax.ShapeDtypeStruct(s0.shape, f32)]
  out_specs = [specs.chunk(length, plan.block_v, along_v=True), specs.head]
  if save_states:
    out_shapes.append(jax.ShapeDtypeStruct((batch, heads, n, *state), f32))
    out_specs.append(specs.chunk(plan.key, plan.block_v, along_v=True))
  kernel = functools.partial(_forward_kernel, plan=plan, save_states=save_states)
  return _pallas_call(plan, kernel, [*_chunk_inputs(plan, q, k, v, b, doc), s0],
                      [*_input_specs(plan, specs), specs.head], out_shapes, out_specs,
                      [pltpu.VMEM((plan.key, plan.block_v), f32)],
                      "linear_attention_chunked_forward")


def _backward(plan: _Plan, q, k, v, b, doc, s_in, d_o, d_s_final):
  specs = _specs(plan, reverse=True)
  batch, heads, n, length, key = q.shape
  width, f32 = plan.decay_width, jnp.float32
  along_v = lambda *tile: specs.chunk(*tile, along_v=True)
  partial = lambda *tile: jax.ShapeDtypeStruct((plan.n_v, batch, heads, n, *tile), f32)
  out_shapes = [partial(length, key), partial(length, key), jax.ShapeDtypeStruct(v.shape, v.dtype),
                partial(length, width), partial(width, 1),
                jax.ShapeDtypeStruct((batch, heads, key, plan.n_v * plan.block_v), f32)]
  out_specs = [specs.partial(length, key), specs.partial(length, key),
               along_v(length, plan.block_v), specs.partial(length, width),
               specs.partial(width, 1), specs.head]
  in_specs = [*_input_specs(plan, specs), along_v(key, plan.block_v),
              along_v(length, plan.block_v), specs.head]
  inputs = [*_chunk_inputs(plan, q, k, v, b, doc), s_in, d_o.astype(q.dtype), d_s_final]
  return _pallas_call(plan, functools.partial(_backward_kernel, plan=plan), inputs, in_specs,
                      out_shapes, out_specs, [pltpu.VMEM((key, plan.block_v), f32)],
                      "linear_attention_chunked_backward")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(plan, q, k, v, b, s0, doc):
  """``(o, S_final)`` in the kernel layout: q, k ``[B, H, N, L, K]``, v
  ``[B, H, N, L, V]``, b ``[B, H, N, L, G]``, s0 ``[B, H, K, V]``, doc
  ``[B, N, L, 1]`` or None."""
  return tuple(_forward(plan, q, k, v, b, s0, doc, save_states=False))


def _chunked_fwd(plan, q, k, v, b, s0, doc):
  o, s_final, s_in = _forward(plan, q, k, v, b, s0, doc, save_states=True)
  return (o, s_final), (q, k, v, b, doc, s_in)


def _chunked_bwd(plan, residuals, cotangents):
  q, k, v, b, doc, s_in = residuals
  d_q, d_k, d_v, d_b, d_b_last, d_s0 = _backward(plan, q, k, v, b, doc, s_in, *cotangents)
  d_q, d_k, d_b, d_b_last = (x.sum(0) for x in (d_q, d_k, d_b, d_b_last))
  d_b = d_b.at[..., -1, :].add(d_b_last[..., 0])
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v, d_b, d_s0, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _doc_start(doc, *, n_chunks: int, chunk: int):
  """``[B, N, L, 1]`` int32: each position's document start relative to its
  chunk, or −1 where the document began before the chunk."""
  batch, time = doc.shape
  padded = n_chunks * chunk
  doc = jnp.pad(doc, ((0, 0), (0, padded - time)), mode="edge")
  position = jnp.arange(padded, dtype=jnp.int32)
  starts = jnp.pad(doc[:, 1:] != doc[:, :-1], ((0, 0), (1, 0)))  # never at t = 0
  relative = lax.cummax(jnp.where(starts, position, -1), axis=1) - position // chunk * chunk
  return jnp.maximum(relative, -1).reshape(batch, n_chunks, chunk, 1)


def linear_attention_kernel(q, k, v, g, s0, doc, *, chunk_size: int, backend: str,
                            interpret: Any = False, poison_outputs: bool = False):
  """Causal linear attention (module docstring) by the Pallas kernels of ``backend``.

  Args:
    q, k: ``[B, T, H, K]`` float32 or bfloat16 (q already scaled).
    v: ``[B, T, H, V]``, any V (the op's normaliser column included).
    g: ``[B, T, H, G]`` float32 log-decays ≤ 0, ``G = 1`` or ``K``.
    s0: ``[B, H, K, V]`` the entering state.
    doc: ``[B, T]`` int32 document index (non-decreasing from 0; the state
      resets where it increases; s0 flows only into document 0) or None.
    chunk_size: chunk length (``supports`` lists those of each backend).
    backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic): block shapes and grid.
    interpret: passed to ``pl.pallas_call``: True runs on CPU;
      ``pltpu.InterpretParams()`` runs the tpu kernels in the TPU interpreter.
    poison_outputs: tests only: every kernel output starts as NaN, so an
      element the kernels do not write shows.

  Returns:
    ``(o [B, T, H, V], S_final [B, H, K, V])`` float32; differentiable in
    q, k, v, g and s0.
  """
  batch, time, heads, key_dim = q.shape
  value_dim, width = v.shape[-1], g.shape[-1]
  dtype = jnp.result_type(q, k, v)
  if dtype not in DTYPES:
    raise ValueError(f"q, k, v must be float32 or bfloat16; got {dtype}")
  if width not in (1, key_dim):
    raise ValueError(f"g has {width} channels; expected 1 (one decay per head) or "
                     f"K = {key_dim} (one per key channel)")
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
  if not supports(backend=backend, chunk_size=chunk_size, key_dim=key_dim):
    raise ValueError(
        f"chunk_size={chunk_size} with K={key_dim} does not lower on backend {backend!r}: "
        f"gpu takes chunk sizes {GPU_CHUNKS} and K ≤ {GPU_MAX_KEY}, tpu multiples of 16 "
        f"up to {TPU_MAX_CHUNK} and K ≤ {TPU_MAX_KEY}")
  chunk, key, block_v, value = _block_shapes(backend, time=time, key_dim=key_dim,
                                             value_dim=value_dim, chunk_size=chunk_size)
  n_chunks = -(-time // chunk)
  padded = n_chunks * chunk
  vector = width > 1
  plan = _Plan(backend, interpret, vector, doc is not None, chunk, key, block_v, n_chunks,
               value // block_v, poison_outputs)

  def to_chunks(x, columns, dtype):  # [B, T, H, X] -> [B, H, N, L, columns], zero-padded
    x = jnp.pad(x.astype(dtype), ((0, 0), (0, padded - time), (0, 0), (0, columns - x.shape[-1])))
    return x.reshape(batch, n_chunks, chunk, heads, columns).transpose(0, 3, 1, 2, 4)

  # Padding: zero keys add nothing and zero log-decays keep the state.
  b = jnp.cumsum(to_chunks(g, plan.decay_width, jnp.float32), axis=3)
  doc = None if doc is None else _doc_start(doc, n_chunks=n_chunks, chunk=chunk)
  s0 = jnp.pad(s0.astype(jnp.float32),
               ((0, 0), (0, 0), (0, key - key_dim), (0, value - value_dim)))
  o, s_final = _chunked(plan, to_chunks(q, key, dtype), to_chunks(k, key, dtype),
                        to_chunks(v, value, dtype), b, s0, doc)
  o = o.transpose(0, 2, 3, 1, 4).reshape(batch, padded, heads, value)[:, :time, :, :value_dim]
  return o, s_final[:, :, :key_dim, :value_dim]


def linear_attention(q, k, v, g, s0, doc, *, chunk_size):
  """:func:`linear_attention_kernel` on the default backend: the causal
  implementation the op registers (the signature of
  ``recurrent_lm.ops.linear_attention``'s ``_chunked_causal``). On CPU it
  runs the gpu kernels in interpret mode (slow; tests only)."""
  backend = jax.default_backend()
  if backend in BACKENDS:
    return linear_attention_kernel(q, k, v, g, s0, doc, chunk_size=chunk_size, backend=backend)
  return linear_attention_kernel(q, k, v, g, s0, doc, chunk_size=chunk_size, backend="gpu",
                                 interpret=True)
