"""The mLSTM matrix memory, chunkwise, as Pallas kernels (forward and backward).

Per head, with ``F = logσ(f̃)``, ``ĩ`` the input-gate pre-activation and
``S = [C, n]`` (the normaliser is one more value column, of ones in ``v``)::

    m_t = max(F_t + m_{t−1}, ĩ_t),   S_t = e^{F_t + m_{t−1} − m_t} S_{t−1} + e^{ĩ_t − m_t} k_t v_tᵀ
    qs_t = q_tᵀ S_t                                      [V+1]

A chunk of ``L`` positions is computed in closed form from the state
``(S, m)`` entering it (``recurrent_lm.ops.mlstm`` derives it). With
``b_c = Σ_{s≤c} F_s`` cumulated inside the chunk, ``ss_c`` the same sum from
the chunk's start or the start of ``c``'s document (the later), ``sees_c``
whether ``c`` continues the entering state's document::

    D_cj = b_c − b_j + ĩ_j  (j ≤ c, same document; else −inf)          [L, L]
    m_c  = max([sees_c] m + ss_c,  max_j D_cj)
    qs_c = Σ_j (q_c·k_j) e^{D_cj − m_c} v_j + [sees_c] e^{m + ss_c − m_c} q_cᵀ S
    r_j  = b_L − b_j + ĩ_j  (j in the document of the chunk's end; else −inf)
    m'   = max([sees_L] m + ss_L,  max_j r_j)
    S'   = [sees_L] e^{m + ss_L − m'} S + Σ_j e^{r_j − m'} k_j v_jᵀ

Every exponent is ≤ 0. The forward kernel runs the chunks in order with
``(S, m)`` carried in float32; the backward kernel runs them in reverse with
``(dS, dm)`` carried, from the entering states the forward saved. Per chunk,
with ``P = e^{D − m}``, ``A = q kᵀ``, ``G = dqs vᵀ`` ``[L, L]``, the state
weights ``w_c = [sees_c] e^{m + ss_c − m_c}``, ``e_j = e^{r_j − m'}`` and the
state decay ``γ``::

    dq = (G∘P) k + w ∘ dqs Sᵀ,   dk = (G∘P)ᵀ q + e ∘ v dS'ᵀ,   dv = (A∘P)ᵀ dqs + e ∘ k dS'
    dS = γ dS' + (w ∘ q)ᵀ dqs
    dD = G∘A∘P,      dm_c gets −Σ_j dD_cj − w_c (q_cᵀ S)·dqs_c
    dr_j = e_j k_jᵀ dS' v_j,   dm' gets −Σ_j dr_j − γ ⟨dS', S⟩

and each ``max`` passes its gradient to its argmax (the maximum's own term:
the carried ``m`` and ``ss``, or one ``D_cj`` / ``r_j``), as autodiff of the
token-by-token form does where there are no ties.

The gate sums ``b`` and ``ss`` are cumulated outside the kernels (XLA, O(T)),
so their gradients reach ``log_f`` by autodiff of that cumsum. Inside, the
gates enter both as columns ``[L, 1]`` (the query side) and as rows
``[1, L]`` (the key side of ``D``), so no kernel transposes a vector.

Layout: every per-position array is ``[B, H, N, L, X]`` (``N`` chunks of
``L``), padded to the block sizes of the backend (:func:`_block_shapes`):

* ``gpu`` (Triton): grid ``(B, H)``; each program loops over the chunks with
  ``(S, m)`` in registers, since a Triton grid has no order to carry state
  through. ``L``, ``K``, ``V+1`` are padded to powers of two ≥ 16 (``tl.dot``).
* ``tpu`` (Mosaic): grid ``(B, H, N)`` with the chunk axis sequential and
  ``(S, m)`` in VMEM scratch; ``K`` and ``V+1`` padded to multiples of 128
  (lanes), ``L`` a multiple of 16 (sublanes, bfloat16 packs two).
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
# Chunk lengths each backend accepts: Triton needs powers of two (and ≥ 16 for
# tl.dot); Mosaic needs multiples of 16 (bfloat16 sublane tiles). The upper
# bounds keep the [L, L] tiles and the state in registers / VMEM.
GPU_CHUNKS = (16, 32, 64, 128)
TPU_MAX_CHUNK = 256
# Triton keeps the state [K, V+1] (padded) in registers: beyond 128 × 128
# float32 per program it spills.
GPU_MAX_STATE = 128 * 128


def _next_power_of_2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _block_shapes(backend: str, *, time: int, key_dim: int, value_dim: int,
                  chunk_size: int) -> tuple[int, int, int]:
  """``(L, K_pad, V_pad)``: the chunk and the padded feature widths.

  ``value_dim`` counts the normaliser column. A sequence shorter than a chunk
  gets one chunk of its own (rounded up to the backend's granule).
  """
  if backend == "gpu":
    return (min(chunk_size, _next_power_of_2(max(time, 16))),
            _next_power_of_2(max(key_dim, 16)), _next_power_of_2(max(value_dim, 16)))
  if backend == "tpu":
    return (min(chunk_size, _round_up(time, 16)),
            _round_up(key_dim, 128), _round_up(value_dim, 128))
  raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


def supports(*, backend: str, time: int | None = None, dtype: Any = None,
             chunk_size: int = 64, key_dim: int | None = None,
             value_dim: int | None = None) -> bool:
  """Whether :func:`mlstm` lowers and is exact for this call on ``backend``.

  ``key_dim`` / ``value_dim`` (V, without the normaliser) are checked when
  given; any ``time ≥ 1`` is supported.
  """
  if backend not in BACKENDS:
    return False
  if time is not None and time < 1:
    return False
  if dtype is not None and jnp.dtype(dtype) not in DTYPES:
    return False
  if backend == "gpu":
    if chunk_size not in GPU_CHUNKS:
      return False
    if key_dim is not None and value_dim is not None:
      _, key, value = _block_shapes("gpu", time=chunk_size, key_dim=key_dim,
                                    value_dim=value_dim + 1, chunk_size=chunk_size)
      return key * value <= GPU_MAX_STATE
    return True
  return chunk_size % 16 == 0 and 16 <= chunk_size <= TPU_MAX_CHUNK


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call: backend, block sizes, grid."""
  backend: str
  interpret: Any  # False, True or pltpu.InterpretParams
  chunk: int
  key: int
  value: int
  n_chunks: int
  poison: bool

  @property
  def grid_over_chunks(self) -> bool:
    return self.backend == "tpu"


class _Chunk(NamedTuple):
  """One chunk's inputs inside a kernel: ``[L, X]`` tiles, gates as ``[L, 1]``
  columns and ``[1, L]`` rows, all float32 except q, k, v."""
  q: jax.Array           # [L, K]
  k: jax.Array           # [L, K]
  v: jax.Array           # [L, V]
  b_row: jax.Array       # [1, L] Σ F from the chunk's start (key side)
  i_row: jax.Array       # [1, L] ĩ (key side)
  b_col: jax.Array       # [L, 1] Σ F from the chunk's start (query side)
  i_col: jax.Array       # [L, 1] ĩ (how keys reach the chunk's end)
  since_start: jax.Array  # [L, 1] ss: Σ F from the chunk's or the document's start
  doc_start: jax.Array   # [L, 1] int32: the document's first position in the chunk, −1 before it


_N_CHUNK_INPUTS = len(_Chunk._fields)


def _matmul(a, b):
  """``a @ b`` in the operands' dtype, accumulated in float32."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_nt(a, b):
  """``a @ bᵀ``."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_tn(a, b):
  """``aᵀ @ b``."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _row_sum(x):
  return jnp.sum(x, axis=1, keepdims=True)


def _col_sum(x):
  return jnp.sum(x, axis=0, keepdims=True)


class _Gates(NamedTuple):
  """The exponents and weights of one chunk (module docstring)."""
  log_d: jax.Array        # [L, L] D
  log_d_max: jax.Array    # [L, 1] max_j D_cj
  sees: jax.Array         # [L, 1] bool
  from_state: jax.Array   # [L, 1] [sees_c] m + ss_c
  m: jax.Array            # [L, 1]
  p: jax.Array            # [L, L] e^{D − m}
  w: jax.Array            # [L, 1] [sees_c] e^{m + ss_c − m_c}
  is_last: jax.Array      # [L, 1] bool: the chunk's last position
  sees_end: jax.Array     # [1, 1] bool
  end_from_state: jax.Array  # [1, 1] [sees_L] m + ss_L
  reach: jax.Array        # [L, 1] r
  reach_max: jax.Array    # [1, 1]
  decay: jax.Array        # [1, 1] γ = [sees_L] e^{m + ss_L − m'}
  e: jax.Array            # [L, 1] e^{r − m'}
  m_next: jax.Array       # [1, 1] m'


def _gates(x: _Chunk, m_in) -> _Gates:
  """Every gate quantity of a chunk entered with stabiliser ``m_in [1, 1]``.

  Masked exponents are −inf before ``exp``; no exponent is positive.
  """
  length = x.b_col.shape[0]
  row = lax.broadcasted_iota(jnp.int32, (length, length), 0)
  col = lax.broadcasted_iota(jnp.int32, (length, length), 1)
  same_doc = (col <= row) & (col >= jnp.maximum(x.doc_start, 0))
  sees = x.doc_start < 0
  log_d = jnp.where(same_doc, (x.b_col - x.b_row) + x.i_row, -jnp.inf)
  log_d_max = jnp.max(log_d, axis=1, keepdims=True)
  from_state = jnp.where(sees, m_in, 0.0) + x.since_start
  m = jnp.maximum(from_state, log_d_max)
  p = jnp.exp(log_d - m)
  w = jnp.exp(jnp.where(sees, m_in + x.since_start - m, -jnp.inf))

  position = lax.broadcasted_iota(jnp.int32, (length, 1), 0)
  is_last = position == length - 1
  last = lambda column: _col_sum(jnp.where(is_last, column, 0.0))  # [1, 1]
  end_doc_start = last(x.doc_start.astype(jnp.float32))
  sees_end = end_doc_start < 0
  through = last(x.since_start)
  reaches = position.astype(jnp.float32) >= jnp.maximum(end_doc_start, 0.0)
  reach = jnp.where(reaches, (last(x.b_col) - x.b_col) + x.i_col, -jnp.inf)
  reach_max = jnp.max(reach, axis=0, keepdims=True)
  end_from_state = jnp.where(sees_end, m_in, 0.0) + through
  m_next = jnp.maximum(end_from_state, reach_max)
  decay = jnp.exp(jnp.where(sees_end, m_in + through - m_next, -jnp.inf))
  e = jnp.exp(reach - m_next)
  return _Gates(log_d, log_d_max, sees, from_state, m, p, w, is_last, sees_end,
                end_from_state, reach, reach_max, decay, e, m_next)


def _chunk_forward(x: _Chunk, s, m_in):
  """``(qs [L, V], m [L, 1], S' [K, V], m' [1, 1])`` from the entering ``(S, m)``."""
  g = _gates(x, m_in)
  cast = lambda a: a.astype(x.q.dtype)  # matmul operands in the inputs' dtype
  scores = _matmul_nt(x.q, x.k) * g.p
  qs = _matmul(cast(scores), x.v) + g.w * _matmul(x.q, cast(s))
  s_next = g.decay * s + _matmul_tn(cast(g.e * x.k), x.v)
  return qs, g.m, s_next, g.m_next


def _chunk_backward(x: _Chunk, s, m_in, d_qs, d_m, d_s_next, d_m_next):
  """Gradients of one chunk (module docstring).

  Takes the chunk's inputs, its entering state ``(S, m_in)`` and the
  cotangents of its outputs ``qs, m`` and of the state leaving it; returns
  ``(d_chunk: _Chunk without doc_start, dS, dm)`` for the entering state.
  """
  g = _gates(x, m_in)
  cast = lambda a: a.astype(x.q.dtype)  # matmul operands in the inputs' dtype

  # The state leaving the chunk.
  k_ds = _matmul(x.k, cast(d_s_next))                             # [L, V]
  d_reach = _row_sum(k_ds * x.v.astype(jnp.float32)) * g.e        # through e_j
  d_decay = _col_sum(_row_sum(d_s_next * s)) * g.decay            # through γ's exponent
  d_m_next = d_m_next - _col_sum(d_reach) - d_decay
  end_is_state = g.end_from_state >= g.reach_max
  d_through = d_decay + jnp.where(end_is_state, d_m_next, 0.0)
  d_reach = d_reach + jnp.where((g.reach == g.reach_max) & ~end_is_state, d_m_next, 0.0)

  # Inside the chunk.
  qk = _matmul_nt(x.q, x.k)                                       # [L, L]
  d_qk = _matmul_nt(cast(d_qs), x.v) * g.p
  d_log_d = d_qk * qk
  d_w = _row_sum(_matmul(x.q, cast(s)) * d_qs) * g.w              # through w's exponent
  d_m = d_m - _row_sum(d_log_d) - d_w
  row_is_state = g.from_state >= g.log_d_max
  d_from_state = jnp.where(row_is_state, d_m, 0.0)
  d_log_d = d_log_d + jnp.where((g.log_d == g.m) & ~row_is_state, d_m, 0.0)

  d_q = _matmul(cast(d_qk), x.k) + g.w * _matmul_nt(cast(d_qs), cast(s))
  d_k = _matmul_tn(cast(d_qk), x.q) + g.e * _matmul_nt(x.v, cast(d_s_next))
  d_v = _matmul_tn(cast(qk * g.p), cast(d_qs)) + g.e * k_ds
  d_b_col = _row_sum(d_log_d) - d_reach + jnp.where(g.is_last, _col_sum(d_reach), 0.0)
  d_since_start = d_w + d_from_state + jnp.where(g.is_last, d_through, 0.0)
  d_i_row = _col_sum(d_log_d)
  d_chunk = (d_q, d_k, d_v, -d_i_row, d_i_row, d_b_col, d_reach, d_since_start)

  d_s = g.decay * d_s_next + _matmul_tn(cast(g.w * x.q), cast(d_qs))
  d_m_in = (_col_sum(jnp.where(g.sees, d_w + d_from_state, 0.0))
            + jnp.where(g.sees_end, d_through, 0.0))
  return d_chunk, d_s, d_m_in


def _chunk_access(plan: _Plan):
  """``(load, store)`` of chunk ``n`` of a per-chunk ref: on TPU the grid
  already selected the block; on GPU the ref holds every chunk."""
  if plan.grid_over_chunks:
    def load(ref, n):
      del n
      return ref[...]

    def store(ref, n, value):
      del n
      ref[...] = value
  else:
    def load(ref, n):
      return ref[n]

    def store(ref, n, value):
      ref[n] = value
  return load, store


def _forward_kernel(*refs, plan: _Plan, save_states: bool):
  """Runs the chunks in order. Refs: the ``_Chunk`` inputs, ``s0, m0``; then
  ``qs, m, s_final, m_final`` (and ``s_in, m_in`` per chunk when
  ``save_states``); then the TPU scratch ``(S, m)``."""
  chunk_refs, (s0_ref, m0_ref), rest = (
      refs[:_N_CHUNK_INPUTS], refs[_N_CHUNK_INPUTS:_N_CHUNK_INPUTS + 2],
      refs[_N_CHUNK_INPUTS + 2:])
  qs_ref, m_ref, s_final_ref, m_final_ref = rest[:4]
  states_refs = rest[4:6] if save_states else ()
  load, store = _chunk_access(plan)

  def step(n, s, m):
    x = _Chunk(*(load(ref, n) for ref in chunk_refs))
    qs, m_pos, s_next, m_next = _chunk_forward(x, s, m)
    store(qs_ref, n, qs)
    store(m_ref, n, m_pos)
    if save_states:
      store(states_refs[0], n, s)
      store(states_refs[1], n, m)
    return s_next, m_next

  if plan.grid_over_chunks:
    s_scratch, m_scratch = rest[4 + len(states_refs):]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
      s_scratch[...] = s0_ref[...]
      m_scratch[...] = m0_ref[...]

    s_next, m_next = step(n, s_scratch[...], m_scratch[...])
    s_scratch[...] = s_next
    m_scratch[...] = m_next

    @pl.when(n == plan.n_chunks - 1)
    def _():
      s_final_ref[...] = s_next
      m_final_ref[...] = m_next
  else:
    s_final, m_final = lax.fori_loop(0, plan.n_chunks, lambda n, c: step(n, *c),
                                     (s0_ref[...], m0_ref[...]))
    s_final_ref[...] = s_final
    m_final_ref[...] = m_final


def _backward_kernel(*refs, plan: _Plan):
  """Runs the chunks in reverse. Refs: the ``_Chunk`` inputs, the saved
  ``s_in, m_in``, the cotangents ``d_qs, d_m, d_s_final, d_m_final``; then
  the gradients of the ``_Chunk`` inputs but ``doc_start``, ``d_s0, d_m0``;
  then the TPU scratch ``(dS, dm)``."""
  n_in = _N_CHUNK_INPUTS + 6
  chunk_refs = refs[:_N_CHUNK_INPUTS]
  s_in_ref, m_in_ref, d_qs_ref, d_m_ref, d_s_final_ref, d_m_final_ref = refs[_N_CHUNK_INPUTS:n_in]
  grad_refs = refs[n_in:n_in + _N_CHUNK_INPUTS - 1]
  d_s0_ref, d_m0_ref = refs[n_in + _N_CHUNK_INPUTS - 1:n_in + _N_CHUNK_INPUTS + 1]
  load, store = _chunk_access(plan)

  def step(n, d_s, d_m_next):
    x = _Chunk(*(load(ref, n) for ref in chunk_refs))
    d_chunk, d_s, d_m = _chunk_backward(x, load(s_in_ref, n), load(m_in_ref, n),
                                        load(d_qs_ref, n), load(d_m_ref, n), d_s, d_m_next)
    for ref, grad in zip(grad_refs, d_chunk):
      store(ref, n, grad.astype(ref.dtype))
    return d_s, d_m

  if plan.grid_over_chunks:
    d_s_scratch, d_m_scratch = refs[n_in + _N_CHUNK_INPUTS + 1:]
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _():
      d_s_scratch[...] = d_s_final_ref[...]
      d_m_scratch[...] = d_m_final_ref[...]

    d_s, d_m = step(plan.n_chunks - 1 - t, d_s_scratch[...], d_m_scratch[...])
    d_s_scratch[...] = d_s
    d_m_scratch[...] = d_m

    @pl.when(t == plan.n_chunks - 1)
    def _():
      d_s0_ref[...] = d_s
      d_m0_ref[...] = d_m
  else:
    last = plan.n_chunks - 1
    d_s0, d_m0 = lax.fori_loop(0, plan.n_chunks, lambda t, c: step(last - t, *c),
                               (d_s_final_ref[...], d_m_final_ref[...]))
    d_s0_ref[...] = d_s0
    d_m0_ref[...] = d_m0


def _specs(plan: _Plan, *, reverse: bool):
  """``(per_chunk(*tile), doc_start, per_head(*tile))`` block specs.

  ``per_chunk``: ``[B, H, N, *tile]`` arrays, one chunk per grid step on TPU
  (in reverse order for the backward), all chunks per program on GPU;
  ``doc_start``: ``[B, N, L, 1]``; ``per_head``: ``[B, H, *tile]``.
  """
  n = plan.n_chunks
  if plan.grid_over_chunks:
    at = (lambda t: n - 1 - t) if reverse else (lambda t: t)
    per_chunk = lambda *tile: pl.BlockSpec(
        (None, None, None, *tile), lambda b, h, t: (b, h, at(t)) + (0,) * len(tile))
    doc_start = pl.BlockSpec((None, None, plan.chunk, 1), lambda b, h, t: (b, at(t), 0, 0))
    per_head = lambda *tile: pl.BlockSpec(
        (None, None, *tile), lambda b, h, t: (b, h) + (0,) * len(tile))
  else:
    per_chunk = lambda *tile: pl.BlockSpec(
        (None, None, n, *tile), lambda b, h: (b, h, 0) + (0,) * len(tile))
    doc_start = pl.BlockSpec((None, n, plan.chunk, 1), lambda b, h: (b, 0, 0, 0))
    per_head = lambda *tile: pl.BlockSpec(
        (None, None, *tile), lambda b, h: (b, h) + (0,) * len(tile))
  return per_chunk, doc_start, per_head


def _pallas_call(plan: _Plan, kernel, inputs, in_specs, out_shapes, out_specs, scratch, name):
  """``pl.pallas_call`` on the plan's grid; with ``plan.poison`` every
  output starts as NaN (aliased NaN inputs the kernel never reads)."""
  batch, heads = inputs[0].shape[:2]
  if plan.grid_over_chunks:
    grid = (batch, heads, plan.n_chunks)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
  else:
    grid = (batch, heads)
    params = pltriton.CompilerParams(num_warps=4 if plan.key * plan.value <= 64 * 64 else 8,
                                     num_stages=1)
  aliases = {}
  if plan.poison:
    kernel, inputs, in_specs, aliases = poison(kernel, inputs, in_specs, out_specs, out_shapes)
  return pl.pallas_call(
      kernel, out_shape=out_shapes, grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=scratch if plan.grid_over_chunks else (),
      input_output_aliases=aliases, compiler_params=params, interpret=plan.interpret,
      name=name)(*inputs)


def _forward(plan: _Plan, chunk_inputs, s0, m0, *, save_states: bool):
  per_chunk, doc_start, per_head = _specs(plan, reverse=False)
  f32 = jnp.float32
  q = chunk_inputs[0]
  batch, heads = q.shape[:2]
  L, K, V, N = plan.chunk, plan.key, plan.value, plan.n_chunks
  in_specs = [per_chunk(L, K), per_chunk(L, K), per_chunk(L, V),
              per_chunk(1, L), per_chunk(1, L), per_chunk(L, 1), per_chunk(L, 1),
              per_chunk(L, 1), doc_start, per_head(K, V), per_head(1, 1)]
  out_shapes = [jax.ShapeDtypeStruct((batch, heads, N, L, V), f32),
                jax.ShapeDtypeStruct((batch, heads, N, L, 1), f32),
                jax.ShapeDtypeStruct((batch, heads, K, V), f32),
                jax.ShapeDtypeStruct((batch, heads, 1, 1), f32)]
  out_specs = [per_chunk(L, V), per_chunk(L, 1), per_head(K, V), per_head(1, 1)]
  if save_states:
    out_shapes += [jax.ShapeDtypeStruct((batch, heads, N, K, V), f32),
                   jax.ShapeDtypeStruct((batch, heads, N, 1, 1), f32)]
    out_specs += [per_chunk(K, V), per_chunk(1, 1)]
  kernel = functools.partial(_forward_kernel, plan=plan, save_states=save_states)
  scratch = [pltpu.VMEM((K, V), f32), pltpu.VMEM((1, 1), f32)]
  return _pallas_call(plan, kernel, [*chunk_inputs, s0, m0], in_specs, out_shapes, out_specs,
                      scratch, "mlstm_chunkwise_forward")


def _backward(plan: _Plan, chunk_inputs, s_in, m_in, d_qs, d_m, d_s_final, d_m_final):
  per_chunk, doc_start, per_head = _specs(plan, reverse=True)
  f32 = jnp.float32
  q = chunk_inputs[0]
  batch, heads = q.shape[:2]
  L, K, V = plan.chunk, plan.key, plan.value
  chunk_specs = [per_chunk(L, K), per_chunk(L, K), per_chunk(L, V),
                 per_chunk(1, L), per_chunk(1, L), per_chunk(L, 1), per_chunk(L, 1),
                 per_chunk(L, 1)]
  in_specs = chunk_specs + [doc_start, per_chunk(K, V), per_chunk(1, 1), per_chunk(L, V),
                            per_chunk(L, 1), per_head(K, V), per_head(1, 1)]
  out_shapes = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in chunk_inputs[:-1]]
                + [jax.ShapeDtypeStruct((batch, heads, K, V), f32),
                   jax.ShapeDtypeStruct((batch, heads, 1, 1), f32)])
  out_specs = chunk_specs + [per_head(K, V), per_head(1, 1)]
  kernel = functools.partial(_backward_kernel, plan=plan)
  scratch = [pltpu.VMEM((K, V), f32), pltpu.VMEM((1, 1), f32)]
  return _pallas_call(plan, kernel, [*chunk_inputs, s_in, m_in, d_qs, d_m, d_s_final, d_m_final],
                      in_specs, out_shapes, out_specs, scratch, "mlstm_chunkwise_backward")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunkwise(plan, chunk_inputs, s0, m0):
  """``(qs, m, S_final, m_final)`` in the kernel layout (module docstring)."""
  return tuple(_forward(plan, chunk_inputs, s0, m0, save_states=False))


def _chunkwise_fwd(plan, chunk_inputs, s0, m0):
  qs, m, s_final, m_final, s_in, m_in = _forward(plan, chunk_inputs, s0, m0, save_states=True)
  return (qs, m, s_final, m_final), (chunk_inputs, s_in, m_in)


def _chunkwise_bwd(plan, residuals, cotangents):
  chunk_inputs, s_in, m_in = residuals
  *d_chunk, d_s0, d_m0 = _backward(plan, chunk_inputs, s_in, m_in, *cotangents)
  return _Chunk(*d_chunk, None), d_s0, d_m0


_chunkwise.defvjp(_chunkwise_fwd, _chunkwise_bwd)


def _doc_start(doc, *, batch: int, time: int, n_chunks: int, chunk: int):
  """``[B, N, L]`` int32: where each position's document starts, relative to
  its chunk, or −1 where it continues the state entering the chunk."""
  if doc is None:
    return jnp.full((batch, n_chunks, chunk), -1, jnp.int32)
  padded = n_chunks * chunk
  doc = jnp.pad(doc, ((0, 0), (0, padded - time)), mode="edge")
  position = jnp.arange(padded, dtype=jnp.int32)
  starts = jnp.pad(doc[:, 1:] != doc[:, :-1], ((0, 0), (1, 0)))  # never at t = 0
  last_start = lax.cummax(jnp.where(starts, position, -1), axis=1)
  return jnp.maximum(last_start - position // chunk * chunk, -1).reshape(batch, n_chunks, chunk)


def mlstm_kernel(q, k, v, log_f, i, s0, m0, doc, *, chunk_size: int, backend: str,
                 interpret: Any = False, poison_outputs: bool = False):
  """The mLSTM memory (module docstring) by the Pallas kernels of ``backend``.

  Args:
    q, k: ``[B, T, H, K]`` float32 or bfloat16 (k already scaled by 1/√K).
    v: ``[B, T, H, V+1]``, the last column ones (it carries the normaliser).
    log_f: ``[B, T, H]`` ``logσ(f̃)``; i: ``[B, T, H]`` ``ĩ``.
    s0: ``[B, H, K, V+1]`` the entering ``[C, n]``; m0: ``[B, H]``.
    doc: ``[B, T]`` int32 document index (non-decreasing from 0; a new
      document restarts ``(C, n, m)`` at 0) or None.
    chunk_size: chunk length (``supports`` lists those of each backend).
    backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic): block shapes and grid.
    interpret: passed to ``pl.pallas_call``: True runs on CPU;
      ``pltpu.InterpretParams()`` runs the TPU kernels in the TPU interpreter.
    poison_outputs: tests only: every kernel output starts as NaN, so an
      element the kernels do not write shows.

  Returns:
    ``(qs [B, T, H, V+1] = q_tᵀ[C_t, n_t], m [B, T, H], S_final [B, H, K, V+1],
    m_final [B, H])``, float32; differentiable in every array input.
  """
  batch, time, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  dtype = jnp.result_type(q, k, v)
  if dtype not in DTYPES:
    raise ValueError(f"q, k, v must be float32 or bfloat16; got {dtype}")
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
  if not supports(backend=backend, chunk_size=chunk_size):
    raise ValueError(f"chunk_size={chunk_size} does not lower on backend {backend!r}: "
                     f"gpu takes {GPU_CHUNKS}, tpu multiples of 16 up to {TPU_MAX_CHUNK}")
  chunk, key, value = _block_shapes(backend, time=time, key_dim=key_dim,
                                    value_dim=value_dim, chunk_size=chunk_size)
  n_chunks = -(-time // chunk)
  padded = n_chunks * chunk
  plan = _Plan(backend, interpret, chunk, key, value, n_chunks, poison_outputs)

  def to_chunks(x, width):  # [B, T, H, X] -> [B, H, N, L, width], zero-padded
    x = jnp.pad(x.astype(dtype), ((0, 0), (0, padded - time), (0, 0), (0, width - x.shape[-1])))
    return x.reshape(batch, n_chunks, chunk, heads, width).transpose(0, 3, 1, 2, 4)

  def gate_chunks(x, fill):  # [B, T, H] -> [B, H, N, L]
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, padded - time), (0, 0)),
                constant_values=fill)
    return x.reshape(batch, n_chunks, chunk, heads).transpose(0, 3, 1, 2)

  # Padding: F = 0, ĩ = −inf and zero keys leave (S, m) as they were.
  b = jnp.cumsum(gate_chunks(log_f, 0.0), axis=-1)
  i = gate_chunks(i, -jnp.inf)
  doc_start = _doc_start(doc, batch=batch, time=time, n_chunks=n_chunks, chunk=chunk)
  before = jnp.pad(b[..., :-1], ((0, 0),) * 3 + ((1, 0),))  # Σ F before each position
  start = jnp.broadcast_to(jnp.maximum(doc_start, 0)[:, None], b.shape)
  since_start = b - jnp.take_along_axis(before, start, axis=-1)
  chunk_inputs = _Chunk(to_chunks(q, key), to_chunks(k, key), to_chunks(v, value),
                        b[..., None, :], i[..., None, :], b[..., None], i[..., None],
                        since_start[..., None], doc_start[..., None])
  s0 = jnp.pad(s0.astype(jnp.float32), ((0, 0), (0, 0), (0, key - key_dim), (0, value - value_dim)))
  m0 = m0.astype(jnp.float32)[..., None, None]

  qs, m, s_final, m_final = _chunkwise(plan, chunk_inputs, s0, m0)
  qs = qs.transpose(0, 2, 3, 1, 4).reshape(batch, padded, heads, value)[:, :time, :, :value_dim]
  m = m[..., 0].transpose(0, 2, 3, 1).reshape(batch, padded, heads)[:, :time]
  return qs, m, s_final[:, :, :key_dim, :value_dim], m_final[..., 0, 0]


def mlstm(q, k, v, log_f, i, s0, m0, doc, *, chunk_size):
  """:func:`mlstm_kernel` on the default backend: the implementation the op
  registers (``recurrent_lm.ops.mlstm``'s private signature). On CPU it runs
  the GPU kernels in interpret mode (slow; tests only)."""
  backend = jax.default_backend()
  if backend in BACKENDS:
    return mlstm_kernel(q, k, v, log_f, i, s0, m0, doc, chunk_size=chunk_size, backend=backend)
  return mlstm_kernel(q, k, v, log_f, i, s0, m0, doc, chunk_size=chunk_size, backend="gpu",
                      interpret=True)
