"""Titans' neural memory as a token mixer, its Miras variants, and Titans MAG.

``NeuralMemory`` (Behrouz et al. 2024, the long-term memory module, LMM):
per head ``h`` of width ``K``, from ``x_t``::

    q_t, k_t = l2norm(silu(W_q x_t)), l2norm(silu(W_k x_t))      [H, K]
    v_t = silu(W_v x_t)                                           [H, K]
    θ_t = max_lr · σ(w_θ x_t + b_θ)     step size
    r_t = σ(w_r x_t + b_r)              retention 1 − α_t   (b_r = 4: r ≈ 0.98)
    η_t = σ(w_η x_t + b_η)              momentum            (b_η = 2: η ≈ 0.88)
    δ_t = softplus(w_δ x_t + b_δ)       Huber threshold (Yaad)
    o_t = ops.neural_memory(q, k, v, θ, r, η, δ)                  [H, K]
    y_t = W_o [RMSNorm(o_t^h) ⊙ swish(W_g x_t)^h]_h

with the learned initial memory ``A_0`` (a matrix, or a residual 2-layer MLP
of width ``expansion · K``) as parameters. The Miras models are the same
module with another attentional bias and retention (registry names):

    titans   mlp memory, ℓ2 bias, decay retention, momentum
    moneta   mlp memory, ℓp bias (p = 3), ℓq retention (q = 4), no momentum
    yaad     mlp memory, Huber bias, decay retention, no momentum
    memora   mlp memory, ℓ2 bias, KL (softmax) retention, no momentum

Titans' three architectures: MAL (memory as a layer) is the layout
``[titans, sliding_window]``; MAG (memory as a gate) is :class:`TitansMAG`,
``y = W_o [RMSNorm(SWA(x)) ⊙ σ(RMSNorm(LMM(x)))]`` with both branches on the
same input; MAC (memory as context) is :class:`~recurrent_lm.layers.TitansMAC`
(``layers/titans_mac.py``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common
from recurrent_lm.layers.attention import Attention
from recurrent_lm.layers.norms import GatedRMSNorm, RMSNorm
from recurrent_lm.ops.neural_memory import MEMORIES, OBJECTIVES, RETENTIONS
from recurrent_lm.ops.neural_memory import init_state as init_memory_state


def _l2norm(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class NeuralMemory(nn.Module):
  """Titans' neural memory and the Miras variants (module docstring for the equations).

  Attributes:
    d_model: model width D.
    num_heads: heads H.
    head_dim: K (and V); ``D / H`` when None.
    memory: ``linear`` (a ``[K, K]`` matrix) or ``mlp`` (``x + gelu(x W1) W2``).
    expansion: the MLP memory's hidden width over K.
    objective: attentional bias ``l2``, ``lp`` or ``huber``.
    p: ℓp's exponent.
    retention: ``decay``, ``lq`` or ``kl``.
    q_norm: ℓq's exponent.
    momentum: keep Titans' surprise with momentum η.
    max_lr: the largest step θ.
    max_grad_norm: the largest norm of one token's memory gradient (the op's
      ``clip_c``; keeps decoding finite on any input); None: no clipping.
    chunk_size: C, the tokens whose gradients share one memory; 1 is recurrent.
    norm_eps: ε of the output RMSNorm.
    dtype: compute dtype of the projections and the output.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  num_heads: int = 4
  head_dim: int | None = None
  memory: str = "mlp"
  expansion: int = 4
  objective: str = "l2"
  p: float = 3.0
  retention: str = "decay"
  q_norm: float = 4.0
  momentum: bool = True
  max_lr: float = 0.1
  max_grad_norm: float | None = 10.0
  chunk_size: int = 16
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _head_dim(self) -> int:
    if self.head_dim is not None:
      return self.head_dim
    _common.check_divisible("d_model", self.d_model, "num_heads", self.num_heads)
    return self.d_model // self.num_heads

  def _memory_shapes(self) -> dict[str, tuple[int, ...]]:
    for field, value, allowed in (("memory", self.memory, MEMORIES),
                                  ("objective", self.objective, OBJECTIVES),
                                  ("retention", self.retention, RETENTIONS)):
      if value not in allowed:
        raise ValueError(f"{field}={value!r}; expected one of {', '.join(allowed)}")
    k, h = self._head_dim(), self.num_heads
    if self.memory == "linear":
      return {"w": (h, k, k)}
    return {"w1": (h, k, self.expansion * k), "w2": (h, self.expansion * k, k)}

  def init_state(self, batch_size: int, dtype=None):
    """``{memory, grad_memory, (momentum,) position}`` zeros: memories ``[B, H, m, n]`` float32."""
    del dtype
    return init_memory_state(batch_size, self._memory_shapes(), momentum=self.momentum)

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs the memory over ``x`` ``[B, T, D]``; returns ``(y [B, T, D], state)``."""
    _common.check_input(x, self.d_model)
    shapes = self._memory_shapes()
    k_dim, heads = self._head_dim(), self.num_heads
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # The memory's inputs are float32 whatever ``dtype``: its test-time
    # optimisation amplifies their rounding (ℓp steps square the error, and
    # ℓq's normalisation divides by the memory's norm), and it runs in float32.
    exact = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
    qkv_axes = ("embed", "heads", "head_dim")
    x32 = x.astype(jnp.float32)
    q, k, v = (_common.dense((heads, k_dim), qkv_axes, name=f"{n}_proj", **exact)(x32)
               for n in ("q", "k", "v"))
    g = _common.dense((heads, k_dim), qkv_axes, name="g_proj", **proj)(x)
    q, k, v = _l2norm(nn.silu(q)), _l2norm(nn.silu(k)), nn.silu(v).astype(jnp.float32)

    def gate(name, bias):
      return _common.dense(heads, ("embed", "heads"), use_bias=True, name=name,
                           bias_init=nn.initializers.constant(bias), **exact)(x32)

    gates = {"lr": self.max_lr * jax.nn.sigmoid(gate("lr_proj", 0.0)),
             "retain": jax.nn.sigmoid(gate("retain_proj", 4.0))}
    if self.momentum:
      gates["momentum"] = jax.nn.sigmoid(gate("momentum_proj", 2.0))
    if self.objective == "huber":
      gates["delta"] = jax.nn.softplus(gate("delta_proj", 0.0))

    def memory_init(key, shape, dtype):
      std = 1.0 / shape[-2] ** 0.5 if shape[-1] != k_dim or self.memory == "linear" else 0.02
      a = std * jax.random.normal(key, shape, jnp.float32)
      if self.retention == "lq":   # unit ℓq norm per matrix: φ(A_0) = A_0
        a = a / jnp.sum(jnp.abs(a) ** self.q_norm, axis=(-2, -1), keepdims=True) ** (
            1.0 / self.q_norm)
      return a.astype(dtype)

    init_memory = {
        name: self.param(name, nn.with_logical_partitioning(memory_init, ("heads", None, None)),
                         shape, self.param_dtype)
        for name, shape in shapes.items()}
    o, state = ops.neural_memory(
        q, k, v, **gates, init_memory=init_memory, objective=self.objective, p=self.p,
        retention=self.retention, q_norm=self.q_norm, max_grad_norm=self.max_grad_norm,
        chunk_size=self.chunk_size,
        initial_state=state, segment_ids=segment_ids)
    o = GatedRMSNorm(norm_before_gate=True, eps=self.norm_eps, axis_name="head_dim",
                     dtype=self.dtype, param_dtype=self.param_dtype, name="g_norm")(
                         o.astype(self.dtype), g)
    y = _common.dense(self.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1),
                      name="o_proj", **proj)(o)
    return y, state


class TitansMAG(nn.Module):
  """Titans MAG: sliding-window attention gated by the neural memory.

  ``y = W_o [RMSNorm(SWA(x)) ⊙ σ(RMSNorm(LMM(x)))]``; the state is
  ``{"attention": ring-buffer KV cache, "memory": NeuralMemory's state}``.

  Attributes:
    d_model: model width D.
    num_heads: heads of both branches.
    window: the attention's window.
    rope_theta: the attention's rotary base.
    chunk_size, memory, expansion: the memory branch's (``NeuralMemory``).
    norm_eps: ε of the two branch norms.
    dtype, param_dtype: compute and parameter dtypes.
  """
  d_model: int
  num_heads: int = 4
  window: int = 64
  rope_theta: float = 10_000.0
  chunk_size: int = 16
  memory: str = "mlp"
  expansion: int = 4
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _branches(self, unbound: bool = False):
    """The two branches; ``unbound`` builds them outside a scope (for ``init_state``)."""
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    scope = lambda name: {"parent": None} if unbound else {"name": name}
    attention = Attention(self.d_model, num_heads=self.num_heads, window=self.window,
                          rope_theta=self.rope_theta, **scope("attention"), **dtypes)
    memory = NeuralMemory(self.d_model, num_heads=self.num_heads, memory=self.memory,
                          expansion=self.expansion, chunk_size=self.chunk_size,
                          **scope("memory"), **dtypes)
    return attention, memory

  def init_state(self, batch_size: int, dtype=None):
    """``{"attention": KV ring buffer, "memory": NeuralMemory state}``."""
    attention, memory = self._branches(unbound=True)
    return {"attention": attention.init_state(batch_size, dtype),
            "memory": memory.init_state(batch_size, dtype)}

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """``x`` ``[B, T, D]`` → ``(y [B, T, D], state)``."""
    _common.check_input(x, self.d_model)
    attention, memory = self._branches()
    state = state or {"attention": None, "memory": None}
    a, attention_state = attention(x, state["attention"], segment_ids)
    m, memory_state = memory(x, state["memory"], segment_ids)
    norm = dict(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(name="attention_norm", **norm)(a) * jax.nn.sigmoid(
        RMSNorm(name="memory_norm", **norm)(m).astype(jnp.float32)).astype(self.dtype)
    y = _common.dense(self.d_model, (None, "embed"), name="o_proj", dtype=self.dtype,
                      param_dtype=self.param_dtype)(h)
    return y, {"attention": attention_state, "memory": memory_state}
