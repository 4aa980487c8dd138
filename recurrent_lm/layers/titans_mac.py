"""Titans MAC, Memory as Context (Behrouz et al. 2024, arXiv 2501.00663).

The sequence is cut into segments of C tokens per document (positions
``[jC, (j+1)C)`` within it, the chunk grid of ``ops.neural_memory``). Per
head (H heads of width d, ``H·d = D``) a neural memory ``M_W`` (a matrix, or
the MLP ``x + gelu(x W1) W2`` of hidden width ``expansion·d``) is read before
the segment and written by the attention outputs of the segment. For a token
t of segment s, with ``G_s`` the memory at the start of s::

    h_t = W_h [M_{G_s}(q^x_t)]_heads,        q^x_t = l2norm(silu(W_qm x_t))    retrieval
    y_t = W_ao [softmax_u(q_t·k_u / √d) v_u]_heads ,  q_t = W_q x_t                attention
        u over P (N_p learned persistent keys/values, always visible) and
        h_u, x_u for u ≤ t in segment s  (k = W_k ·, v = W_v · of h_u and x_u)
    ȳ_t = y_t / √(mean(y_t²) + 10⁻⁶)                                             memory input
    k_t = l2norm(silu(W_k' ȳ_t)),  v_t = silu(W_v' ȳ_t)                         memory write
    θ_t = max_lr·σ(w_θ·ȳ_t + b_θ),  r_t = σ(w_r·ȳ_t + b_r),  η_t = σ(w_η·ȳ_t + b_η)
    S_t = η_t S_{t−1} − θ_t clip_c(∇_W ‖M_{G_s}(k_t) − v_t‖²),   W_t = r_t W_{t−1} + S_t
    o_t = W_o [y_t ⊙ σ(M_{W_t}(q^y_t))]_heads,  q^y_t = l2norm(silu(W_qy ȳ_t))      output

with ``l2norm(a) = a / √(‖a‖² + 10⁻⁶)`` and every gate per head. The write
is ``ops.neural_memory``'s Titans memory (ℓ2 bias, momentum, decay) with chunk
size C, so ``G_{s+1}`` is the memory after the last token of s; a document
starts from the learned ``W_{−1} = A_0`` with ``S = 0``. The biases start at
``b_θ = 0, b_r = 4, b_η = 2`` (r ≈ 0.98, η ≈ 0.88). Segment s+1 reads what
segment s wrote from its attention outputs: the recurrence is sequential over
segments.

The memory sees ``y`` at unit RMS (``ȳ``) because of that loop: retrieval →
attention → values → memory has a gain that grows with the memory, and
without the normalisation perturbed parameters diverge within a few segments
even at ``max_lr = 10⁻³``. ``max_lr`` bounds θ; within a segment all C steps
are taken at ``G_s`` and momentum adds them up, so the largest stable θ
shrinks roughly like ``(1 − η)/C``: at C = 64 and η ≈ 0.88 a fresh layer on
unit inputs diverges from ``max_lr ≈ 0.03`` on, hence the default 0.01.

**Blocks.** A call walks its row in blocks of C tokens (the call's grid, not
the document's). A block holds, per row, the tail of the running segment
(epoch 0, retrieval and gradients at the carried ``G``), the head of the
running document's next segment from a split p on (epoch 1, at
``G = W_{p−1}``), and documents that start inside the block (epoch 2, at
``A_0``). Phase 1 runs the block with the retrievals of epochs 0 and 2, which
fixes the outputs of the tokens before p and so ``W_{p−1}``; phase 2 runs it
again with the epoch-1 retrievals at ``W_{p−1}``. The attention of a segment
spans two blocks (or calls): the keys and values of the running segment's
last ``≤ C−1`` tokens are carried.

Inside a block nothing of the memory's size is formed per token. Every
gradient is an outer product per matrix (``k ⊗ 2e`` for the linear memory;
``k ⊗ δ`` and ``gelu(z) ⊗ 2e`` for the MLP), ``(S, W)`` is linear in the
carried state and the updates with weights from cumulative log-gates
(:func:`_transfer`), so a read ``x W_t`` is a few ``[C, C]`` and ``[C, m]``
matrix products, like chunked linear attention.

State ``{memory, momentum, grad_memory, position, cache}``: the first four as
in ``ops.neural_memory`` (``[B, H, ...]`` float32, ``position`` ``[B]``
int32); ``cache`` ``{key, value}`` ``[B, C−1, 2, H, d]`` float32, the keys
and values of (h_u, x_u) of the running segment, slot ``u mod C`` for the
document positions ``u < position`` of that segment, zeros elsewhere.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm.layers import _common
from recurrent_lm.ops import _checks
from recurrent_lm.ops.neural_memory import MEMORIES, memory_apply
from recurrent_lm.ops.neural_memory import init_state as init_memory_state

# Gate biases (θ, r, η) at initialisation: θ = max_lr/2, r = σ(4) ≈ 0.98,
# η = σ(2) ≈ 0.88, as in ``layers.NeuralMemory``.
_GATE_BIAS = (0.0, 4.0, 2.0)


def _l2norm(a):
  return a * jax.lax.rsqrt(jnp.sum(a * a, axis=-1, keepdims=True) + 1e-6)


def _rms_normalize(a):
  return a * jax.lax.rsqrt(jnp.mean(a * a, axis=-1, keepdims=True) + 1e-6)


def _bcast(a, like):
  """A ``[B, H, C]`` per-token scalar broadcastable against ``[B, H, C, ...]``."""
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def _tree_where(cond, on_true, on_false):
  return jax.tree_util.tree_map(lambda a, b: jnp.where(_bcast(cond, a), a, b), on_true, on_false)


def _pick(epoch, first, second, third):
  """Per token, the value of its epoch: ``epoch`` ``[B, C]``, leaves ``[B, H, C, ...]``."""
  ep = epoch[:, None, :]
  return _tree_where(ep == 2, third, _tree_where(ep == 1, second, first))


def _gradient_factors(weights, k, v):
  """``∇_W ‖M_W(k_t) − v_t‖²`` of every token, as an outer product per matrix.

  Linear ``M(x) = x W``: ``e = k W − v`` and ``∇_W = k ⊗ 2e``. MLP
  ``M(x) = x + gelu(z) W2`` with ``z = x W1``: ``e = k + gelu(z) W2 − v``,
  ``∇_{W2} = gelu(z) ⊗ 2e`` and ``∇_{W1} = k ⊗ (gelu′(z) ⊙ 2e W2ᵀ)``.

  Args:
    weights: one memory per row and head, leaves ``[B, H, m, n]`` (or ``[H, m, n]``).
    k, v: ``[B, H, C, d]``.

  Returns:
    ``{name: (left [B, H, C, m], right [B, H, C, n])}``, ``∇ = left ⊗ right``.
  """
  if "w" in weights:
    return {"w": (k, 2.0 * (k @ weights["w"] - v))}
  gelu, gelu_vjp = jax.vjp(jax.nn.gelu, k @ weights["w1"])
  error2 = 2.0 * (k + gelu @ weights["w2"] - v)
  back = gelu_vjp(error2 @ jnp.swapaxes(weights["w2"], -1, -2))[0]
  return {"w1": (k, back), "w2": (gelu, error2)}


def _clip_scale(factors, max_norm):
  """``min(1, c / ‖∇_t‖)`` ``[B, H, C]``: the clip of every token's gradient
  (the norm over all its matrices, ``‖l ⊗ r‖ = ‖l‖ ‖r‖``); 1 when ``c`` is None."""
  if max_norm is None:
    return 1.0
  sq = sum(jnp.sum(l * l, -1) * jnp.sum(r * r, -1) for l, r in factors.values())
  return jnp.minimum(1.0, max_norm / jnp.sqrt(jnp.maximum(sq, 1e-30)))


def _transfer(log_eta, log_retain, reset):
  """The weights of a block's linear recurrence, per row and head.

  Per token ``S_t = η_t S_{t−1} + u_t`` and ``W_t = r_t W_{t−1} + S_t``; a
  document start first sets ``(S, W) = (0, A_0)``. Then, with the carried
  ``(S, W)`` and products taken inside one document::

      S_t = s_from_s_t S + Σ_{τ≤t} decay_s[t, τ] u_τ,       decay_s[t, τ] = Π_{τ<i≤t} η_i
      W_t = from_w_t W + from_s_t S + from_init_t A_0 + Σ_{τ≤t} beta[t, τ] u_τ,
      beta[t, τ] = Σ_{τ≤j≤t} Π_{j<i≤t} r_i · Π_{τ<i≤j} η_i

  Products are differences of cumulative log-gates, so nothing overflows.

  Args:
    log_eta, log_retain: ``[B, H, C]`` ``log η``, ``log r``.
    reset: ``[B, C]`` bool, document starts.

  Returns:
    ``beta``, ``decay_s`` ``[B, H, C, C]``; ``from_w``, ``from_s``, ``from_init``,
    ``s_from_s`` ``[B, H, C]``.
  """
  chunk = log_eta.shape[-1]
  t = jnp.arange(chunk)
  doc = jnp.cumsum(reset, axis=1)                                           # 0: carried
  same = ((doc[:, :, None] == doc[:, None, :]) & (t[:, None] >= t[None, :]))[:, None]
  cum_r, cum_eta = jnp.cumsum(log_retain, -1), jnp.cumsum(log_eta, -1)
  ratio = lambda cum: jnp.exp(jnp.where(same, cum[..., :, None] - cum[..., None, :], -jnp.inf))
  retained, decay_s = ratio(cum_r), ratio(cum_eta)                          # [B, H, t, j]
  carried = (doc == 0)[:, None, :]
  s_from_s = jnp.where(carried, jnp.exp(cum_eta), 0.0)
  # A document starting at ρ loads A_0 before its first step: Π_{ρ≤i≤t} r_i.
  start = jnp.maximum(jax.lax.cummax(jnp.where(reset, t, -1), axis=1), 0)
  start = jnp.broadcast_to(start[:, None], cum_r.shape)
  before_start = jnp.take_along_axis(cum_r - log_retain, start, axis=-1)
  return {"beta": retained @ decay_s, "decay_s": decay_s, "s_from_s": s_from_s,
          "from_w": jnp.where(carried, jnp.exp(cum_r), 0.0),
          "from_s": jnp.einsum("bhtj,bhj->bht", retained, s_from_s),
          "from_init": jnp.where(carried, 0.0, jnp.exp(cum_r - before_start))}


def _memory_at(row, factors, weight, coef, carried_w, carried_s, init):
  """``(S_i, W_i)`` after the token ``i = row`` ``[B]`` of the block.

  ``u_τ = weight_τ left_τ ⊗ right_τ`` (``weight`` ``[B, H, C]``); ``coef`` from
  :func:`_transfer`; carried and initial memories leaves ``[B, H, m, n]``, ``[H, m, n]``.
  """
  onehot = (jnp.arange(weight.shape[-1]) == row[:, None]).astype(weight.dtype)
  at = lambda a: jnp.einsum("bt,bht...->bh...", onehot, a)
  scalar = lambda name: at(coef[name])[:, :, None, None]
  outer = lambda w, pair: jnp.einsum("bhc,bhcm,bhcn->bhmn", w * weight, *pair)
  s = {n: scalar("s_from_s") * carried_s[n] + outer(at(coef["decay_s"]), factors[n])
       for n in factors}
  w = {n: (scalar("from_w") * carried_w[n] + scalar("from_s") * carried_s[n]
           + scalar("from_init") * init[n] + outer(at(coef["beta"]), factors[n]))
       for n in factors}
  return s, w


def _read_each(q, factors, weight, coef, carried_w, carried_s, init):
  """``M_{W_t}(q_t)`` for every token ``[B, H, C, d]``, ``W_t`` as in :func:`_transfer`,
  without forming ``W_t``: each matrix is applied as its terms."""
  def apply(x, name):
    left, right = factors[name]
    out = (_bcast(coef["from_w"], x) * (x @ carried_w[name])
           + _bcast(coef["from_s"], x) * (x @ carried_s[name])
           + _bcast(coef["from_init"], x) * (x @ init[name]))
    mix = coef["beta"] * jnp.einsum("bhtm,bhcm->bhtc", x, left) * weight[:, :, None, :]
    return out + mix @ right
  if "w" in factors:
    return apply(q, "w")
  return q + apply(jax.nn.gelu(apply(q, "w1")), "w2")


def _next_cache(cache, block, positions, real, reset, chunk):
  """The carried keys or values after a block.

  Slot j holds the token at document position ``C⌊n/C⌋ + j`` of the running
  document (``n`` the position of its next token) when that position is
  ``< n``; other slots are zeros.

  Args:
    cache: ``[B, C−1, 2, H, d]`` before the block.
    block: ``[B, C, 2, H, d]`` of the block's tokens.
    positions: ``[B, C]`` document positions; real, reset: ``[B, C]`` bool.
  """
  idx = jnp.arange(chunk)
  last = jnp.sum(real, axis=1) - 1
  next_pos = jnp.take_along_axis(positions, last[:, None], axis=1)[:, 0] + 1
  seg_start = next_pos - next_pos % chunk
  last_reset = jnp.max(jnp.where(reset & real, idx, -1), axis=1)
  current = real & (idx >= last_reset[:, None]) & (positions >= seg_start[:, None])
  slots = jnp.arange(chunk - 1)
  onehot = current[:, :, None] & ((positions - seg_start[:, None])[:, :, None] == slots)
  from_block = jnp.einsum("bcj,bc...->bj...", onehot.astype(block.dtype), block)
  first = positions[:, 0]
  keep = ((last_reset < 0) & (first - first % chunk == seg_start))[:, None] & (
      slots < (first % chunk)[:, None])
  return jnp.where(keep.reshape(keep.shape + (1,) * 3), cache, 0.0) + from_block


class TitansMAC(nn.Module):
  """Titans' Memory-as-Context mixer (module docstring for the equations).

  Attributes:
    d_model: model width D.
    num_heads: H, heads of the attention and of the memory.
    head_dim: d; ``d_model // num_heads`` if None (``H·d`` must equal D: the
      memory's read gates the attention output head by head).
    memory: ``"mlp"`` (``x + gelu(x W1) W2``) or ``"linear"`` (``x W``).
    expansion: hidden width of the MLP memory over d.
    num_persistent: N_p, learned persistent keys/values every token sees.
    chunk_size: C, the segment length and the memory's chunk.
    max_lr: θ's ceiling.
    max_grad_norm: c, the largest norm of one token's memory gradient (as
      ``ops.neural_memory``'s ``clip_c``: it bounds every step, so training
      cannot drive the memory to overflow); None: no clipping.
    dtype: compute dtype of the projections and the output (memory, attention
      scores and state are float32).
    param_dtype: dtype of the parameters.
  """
  d_model: int
  num_heads: int = 4
  head_dim: int | None = None
  memory: str = "mlp"
  expansion: int = 4
  num_persistent: int = 4
  chunk_size: int = 64
  max_lr: float = 0.01
  max_grad_norm: float | None = 10.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dims(self) -> tuple[int, int]:
    """``(d, hidden width of the memory)``, validated."""
    for name in ("num_heads", "chunk_size", "expansion"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive int")
    if self.memory not in MEMORIES:
      raise ValueError(f"memory={self.memory!r}; expected one of {', '.join(MEMORIES)}")
    if not isinstance(self.num_persistent, int) or self.num_persistent < 0:
      raise ValueError(f"num_persistent={self.num_persistent!r}; expected an int >= 0")
    if not self.max_lr > 0:
      raise ValueError(f"max_lr={self.max_lr!r}; expected > 0")
    head_dim = self.head_dim
    if head_dim is None:
      _common.check_divisible("d_model", self.d_model, "num_heads", self.num_heads)
      head_dim = self.d_model // self.num_heads
    if head_dim * self.num_heads != self.d_model:
      raise ValueError(f"num_heads={self.num_heads} x head_dim={head_dim} != "
                       f"d_model={self.d_model}; expected them to multiply to d_model")
    return head_dim, self.expansion * head_dim

  def _memory_shapes(self) -> dict[str, tuple[int, int, int]]:
    head_dim, hidden = self._dims()
    if self.memory == "linear":
      return {"w": (self.num_heads, head_dim, head_dim)}
    return {"w1": (self.num_heads, head_dim, hidden), "w2": (self.num_heads, hidden, head_dim)}

  def init_state(self, batch_size: int, dtype=None):
    """A fresh state (module docstring), float32; ``dtype`` is accepted for the protocol."""
    del dtype
    head_dim, _ = self._dims()
    state = init_memory_state(batch_size, self._memory_shapes(), momentum=True)
    cache_shape = (batch_size, self.chunk_size - 1, 2, self.num_heads, head_dim)
    state["cache"] = {"key": jnp.zeros(cache_shape, jnp.float32),
                      "value": jnp.zeros(cache_shape, jnp.float32)}
    return state

  def _kernel(self, name, in_shape, out_shape, axes):
    """A projection kernel ``in_shape + out_shape``, LeCun-normal over the true fan-in."""
    fan_in = math.prod(in_shape)

    def init(key, shape, dtype):
      return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)
    return self.param(name, nn.with_logical_partitioning(init, axes),
                      tuple(in_shape) + tuple(out_shape), self.param_dtype)

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs MAC over ``x``.

    Args:
      x: ``[B, T, D]``.
      state: from ``init_state`` or a previous call; None starts every row.
      segment_ids: ``[B, T]`` document ids of packed rows.

    Returns:
      ``(y, state)``: ``y`` ``[B, T, D]`` in ``dtype`` and the state after the last token.
    """
    # The projections are plain kernels, not submodules: the segment scan is a
    # jax.lax.scan, inside which Flax modules cannot be called.
    _common.check_input(x, self.d_model)
    head_dim, _ = self._dims()
    batch, time, width = x.shape
    heads, chunk = self.num_heads, self.chunk_size
    _checks.check_segment_ids(segment_ids, batch, time)
    dtype = self.dtype
    acc_dtype = jnp.promote_types(dtype, jnp.float32)
    to_heads = ((width,), (heads, head_dim), ("embed", "heads", "head_dim"))
    from_heads = ((heads, head_dim), (width,), ("heads", "head_dim", "embed"))
    w_q, w_k, w_v = (self._kernel(n, *to_heads) for n in ("q_proj", "k_proj", "v_proj"))
    w_qm = self._kernel("memory_query_proj", *to_heads)
    w_h = self._kernel("retrieved_proj", *from_heads)
    w_ao = self._kernel("attention_out_proj", *from_heads)
    w_km, w_vm, w_qy = (self._kernel(n, *to_heads) for n in
                        ("memory_key_proj", "memory_value_proj", "read_query_proj"))
    w_gate = self._kernel("gate_proj", (width,), (3, heads), ("embed", None, "heads"))
    gate_bias = self.param("gate_bias", nn.with_logical_partitioning(
        lambda key, shape, dt: jnp.broadcast_to(jnp.asarray(_GATE_BIAS, dt)[:, None], shape),
        (None, "heads")), (3, heads), self.param_dtype)
    w_o = self._kernel("o_proj", *from_heads)
    persistent = {n: self.param(n, nn.with_logical_partitioning(
        nn.initializers.normal(1.0), (None, "heads", "head_dim")),
        (self.num_persistent, heads, head_dim), self.param_dtype)
        for n in ("persistent_key", "persistent_value")}
    memory_axes = {"w": ("heads", "head_dim", None), "w1": ("heads", "head_dim", "mlp"),
                   "w2": ("heads", "mlp", "head_dim")}
    # W2 of the MLP starts small, so the fresh memory is close to the identity.
    memory_std = {"w": head_dim ** -0.5, "w1": head_dim ** -0.5, "w2": 0.02}
    init_memory = {n: self.param(f"memory_{n}", nn.with_logical_partitioning(
        nn.initializers.normal(memory_std[n]), memory_axes[n]), shape, self.param_dtype)
        for n, shape in self._memory_shapes().items()}

    def proj(a, kernel, spec, to=dtype):
      return jnp.einsum(spec, a.astype(to), kernel.astype(to))

    # The memory's inputs are projected in float32 whatever ``dtype``: its
    # test-time optimisation amplifies their rounding (as in layers.NeuralMemory).
    def memory_proj(a, kernel, spec):
      return proj(a, kernel, spec, acc_dtype)

    # Decay retention: the memory's weights are its accumulator (W = A).
    a0 = jax.tree_util.tree_map(lambda w: w.astype(acc_dtype), init_memory)
    p_key, p_value = (persistent[n].astype(acc_dtype) for n in ("persistent_key",
                                                                "persistent_value"))
    if state is None:
      state = self.init_state(batch)
    state = jax.tree_util.tree_map(
        lambda s: s.astype(acc_dtype) if jnp.issubdtype(s.dtype, jnp.floating) else s, state)

    padded = -(-time // chunk) * chunk
    pad = padded - time
    positions = _checks.document_positions(state["position"], segment_ids, time)
    real = jnp.arange(padded) < time
    positions = jnp.pad(positions, ((0, 0), (0, pad)))
    reset = (positions == 0) & real
    refresh = (positions % chunk == 0) & real

    def blocks(a):   # [B, T, ...] → [N, B, C, ...]
      a = jnp.pad(a, ((0, 0), (0, padded - a.shape[1])) + ((0, 0),) * (a.ndim - 2))
      return jnp.moveaxis(a.reshape((batch, padded // chunk, chunk) + a.shape[2:]), 1, 0)

    xs = {"q": blocks(proj(x, w_q, "btd,dhk->bthk")),
          "k": blocks(proj(x, w_k, "btd,dhk->bthk").astype(acc_dtype)),
          "v": blocks(proj(x, w_v, "btd,dhk->bthk").astype(acc_dtype)),
          "q_memory": blocks(_l2norm(jax.nn.silu(
              memory_proj(x, w_qm, "btd,dhk->bthk")))),
          "positions": blocks(positions), "reset": blocks(reset), "refresh": blocks(refresh),
          "real": blocks(jnp.broadcast_to(real, (batch, padded)))}
    scale = head_dim ** -0.5
    idx = jnp.arange(chunk)
    read = memory_apply                                     # one memory for the block's tokens
    to_bhc = lambda a: jnp.swapaxes(a, 1, 2)                              # [B, C, H, ...] ↔

    def block(carry, c):
      acc, mom, grad_mem, cache = carry
      reset_, real_ = c["reset"], c["real"]
      started = jnp.cumsum(reset_, axis=1) > 0
      split = c["refresh"] & ~started
      second = (jnp.cumsum(split, axis=1) > 0) & ~started
      epoch = jnp.where(started, 2, jnp.where(second, 1, 0))             # [B, C]
      p_idx = jnp.argmax(split, axis=1)                                  # 0 when no split
      # Keys visible to a query: the persistent ones; its segment's earlier
      # tokens in the cache (epoch 0 only) and in the block.
      label = jnp.cumsum(c["refresh"], axis=1)
      in_block = (idx[:, None] >= idx[None, :]) & (label[:, :, None] == label[:, None, :])
      in_cache = (label == 0)[:, :, None] & (
          jnp.arange(chunk - 1) < (c["positions"][:, 0] % chunk)[:, None])[:, None, :]
      mask = jnp.concatenate([jnp.ones((batch, chunk, self.num_persistent), bool),
                              in_cache, in_cache, in_block, in_block], axis=2)
      q_memory = to_bhc(c["q_memory"])                                  # [B, H, C, d]

      def attend(retrieved):
        """Attention and the memory's inputs, from the retrievals ``[B, H, C, d]``."""
        h = proj(to_bhc(retrieved), w_h, "bchk,hkd->bcd")
        k_h = proj(h, w_k, "bcd,dhk->bchk").astype(acc_dtype)
        v_h = proj(h, w_v, "bcd,dhk->bchk").astype(acc_dtype)
        persist = lambda p: jnp.broadcast_to(p, (batch,) + p.shape)
        keys = jnp.concatenate([persist(p_key), cache["key"][:, :, 0], cache["key"][:, :, 1],
                                k_h, c["k"]], axis=1)
        values = jnp.concatenate([persist(p_value), cache["value"][:, :, 0],
                                  cache["value"][:, :, 1], v_h, c["v"]], axis=1)
        scores = jnp.einsum("bqhk,bnhk->bhqn", c["q"].astype(acc_dtype), keys) * scale
        weights = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
        o = jnp.einsum("bhqn,bnhk->bqhk", weights, values)
        y = proj(o, w_ao, "bchk,hkd->bcd")
        y_bar = _rms_normalize(y.astype(acc_dtype))
        k_m = _l2norm(jax.nn.silu(memory_proj(y_bar, w_km, "bcd,dhk->bchk")))
        v_m = jax.nn.silu(memory_proj(y_bar, w_vm, "bcd,dhk->bchk"))
        gates = memory_proj(y_bar, w_gate, "bcd,dgh->bcgh") + gate_bias.astype(acc_dtype)
        gates = jnp.moveaxis(gates, 1, 3)                                 # [B, 3, H, C]
        lr = jnp.where(real_[:, None], self.max_lr * jax.nn.sigmoid(gates[:, 0]), 0.0)
        return dict(y=y, y_bar=y_bar, k_h=k_h, v_h=v_h, k=to_bhc(k_m), v=to_bhc(v_m),
                    weight=-lr, log_retain=jax.nn.log_sigmoid(gates[:, 1]),
                    log_eta=jax.nn.log_sigmoid(gates[:, 2]))

      # Phase 1: retrievals of epochs 0 and 2; exact up to the split, so W_{p−1}.
      at_carry, at_init = read(grad_mem, q_memory), read(a0, q_memory)
      first = attend(_pick(epoch, at_carry, at_carry, at_init))
      coef = _transfer(first["log_eta"], first["log_retain"], reset_)
      first_factors = _gradient_factors(grad_mem, first["k"], first["v"])
      _, before = _memory_at(jnp.maximum(p_idx - 1, 0), first_factors,
                             first["weight"] * _clip_scale(first_factors, self.max_grad_norm),
                             coef, acc, mom, a0)
      mid = _tree_where((p_idx > 0)[:, None], before, acc)
      # Phase 2: every retrieval and gradient at the memory of its epoch.
      out = attend(_pick(epoch, at_carry, read(mid, q_memory), at_init))
      coef = _transfer(out["log_eta"], out["log_retain"], reset_)
      factors = _pick(epoch, *(_gradient_factors(w, out["k"], out["v"])
                               for w in (grad_mem, mid, a0)))
      weight = out["weight"] * _clip_scale(factors, self.max_grad_norm)
      q_read = _l2norm(jax.nn.silu(memory_proj(out["y_bar"], w_qy, "bcd,dhk->bchk")))
      memory_out = _read_each(to_bhc(q_read), factors, weight, coef, acc, mom, a0)
      gated = out["y"].reshape(batch, chunk, heads, head_dim) * jax.nn.sigmoid(
          to_bhc(memory_out)).astype(dtype)
      new_mom, new_acc = _memory_at(jnp.sum(real_, axis=1) - 1, factors, weight, coef,
                                    acc, mom, a0)

      last = epoch[:, -1][:, None]
      a0_rows = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (batch,) + w.shape), a0)
      new_grad_mem = _tree_where(last == 2, a0_rows, _tree_where(last == 1, mid, grad_mem))
      new_cache = {
          name: _next_cache(cache[name], jnp.stack([out[of_h], c[of_x]], axis=2),
                            c["positions"], real_, reset_, chunk)
          for name, of_h, of_x in (("key", "k_h", "k"), ("value", "v_h", "v"))}
      return (new_acc, new_mom, new_grad_mem, new_cache), gated

    carry = (state["memory"], state["momentum"], state["grad_memory"], state["cache"])
    (acc, mom, grad_mem, cache), gated = jax.lax.scan(jax.checkpoint(block), carry, xs)
    gated = jnp.moveaxis(gated, 0, 1).reshape(batch, padded, heads, head_dim)[:, :time]
    y = proj(gated, w_o, "bthk,hkd->btd")
    new_state = {"memory": acc, "grad_memory": grad_mem, "momentum": mom,
                 "position": positions[:, time - 1] + 1, "cache": cache}
    return y, new_state
