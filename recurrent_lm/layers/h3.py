"""H3, the Hungry Hungry Hippos token mixer (Fu et al., 2023).

With ``H`` heads of width ``P = D / H`` and state size ``N`` (``M = N / 2``
complex modes)::

    q, k, v = W_q x + b_q,  W_k x + b_k,  W_v x + b_v             [B, T, H, P] each
    k̄_t = Σ_{i=0}^{W−1} w_i ⊙ k_{t−(W−1)+i} + D_k ⊙ k_t          shift SSM: a W-tap causal
                                                                 depthwise conv (W = N)
    X_t = Ā ⊙ X_{t−1} + B̄ ⊗ (k̄_t v_tᵀ)                         diagonal SSM, per head:
    s_t = 2 Re(Σ_m C_m X_t[:, :, m]) + D k̄_t v_tᵀ              X ∈ C^{P×P×M}, s ∈ R^{P×P}
    y_t = W_o [q_tᵀ s_t]_h + b_o                                 contract q with the key index

The shift SSM (``A`` the shift matrix, ``B = e_1``) has the kernel
``C_shift`` for its first N lags and 0 after: a learned N-tap filter, run by
``ops.causal_conv1d`` (``w_{W−1−i}`` is the reference's ``C_shift[i]``, lag i). The diagonal SSM is S4D-Lin, complex, discretised
bilinearly as in the reference's ``SSKernelDiag`` (its default)::

    Δ = exp(log_dt),   A = −exp(A_log) + i·A_imag,   B = 1
    Ā = (1 + ΔA/2) / (1 − ΔA/2),    B̄ = Δ / (1 − ΔA/2)

``Re(A) < 0`` keeps ``|Ā| < 1``. ``2 Re`` adds each mode's complex
conjugate, so the ``M = N/2`` modes make a real SSM of size N, as in S4D.
``ops.h3_ssm`` runs the diagonal SSM (chunked for training, token by token
for decoding); the docstring there derives the chunked form, including the
``C Ā^{t+1} X_0`` read of an initial state. Every document of a packed row
(``segment_ids``) restarts both SSMs.

Initialisation as the reference (HazyResearch/H3 ``H3``, ``SSKernel``
``mode="diag", measure="diag-lin"``): ``A = −1/2 + iπn`` (n = 0 … M−1),
``log Δ`` uniform in ``[log 1e-3, log 1e-1]`` per head, ``C`` complex
standard normal (real and imaginary parts N(0, 1/2)), ``D`` and ``D_k``
N(0, 1) (``torch.randn``), shift taps U(±1/√W) (PyTorch's conv default).
Projections use this repo's default (LeCun normal, zero bias).

Shapes: the state is ``(window [B, W−1, D], X [B, H, P, P, M, 2])``, both
float32, ``X`` as (real, imaginary) parts: ``(W − 1)·D + D·P·N`` numbers a
sequence. With ``P = 1`` (the reference's ``head_dim=1``) the outer product
is a scalar and every channel is its own head.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from recurrent_lm import ops
from recurrent_lm.layers import _common
from recurrent_lm.ops.h3_ssm import h3_ssm

_DT_MIN = 1e-3
_DT_MAX = 1e-1


def _log_dt_init(key, shape, dtype=jnp.float32):
  return jax.random.uniform(key, shape, jnp.float32, math.log(_DT_MIN),
                            math.log(_DT_MAX)).astype(dtype)


def _a_log_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.full(shape, math.log(0.5), dtype)


def _a_imag_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.broadcast_to(math.pi * jnp.arange(shape[-1], dtype=jnp.float32), shape).astype(dtype)


def _c_init(key, shape, dtype=jnp.float32):
  return (jax.random.normal(key, shape, jnp.float32) * math.sqrt(0.5)).astype(dtype)


def _shift_init(key, shape, dtype=jnp.float32):
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class H3(nn.Module):
  """The H3 mixer (module docstring for the equations).

  Attributes:
    d_model: model width D.
    num_heads: heads H of the outer product, of width ``P = D / H``; None is
      ``D`` heads of width 1, the reference's default (``head_dim=1``).
    d_state: N, real size of the diagonal SSM (``N / 2`` complex modes), 64
      in H3; also the shift SSM's taps unless ``shift_size`` is set.
    shift_size: taps W of the shift SSM; ``d_state`` if None (as in H3).
    use_bias: biases on the q, k, v and output projections (H3: True).
    impl: ``"auto" | "chunked" | "recurrent"``, the form of the diagonal SSM
      (``ops.h3_ssm``); auto is ``recurrent`` for a single token, else ``chunked``.
    chunk_size: chunk length of the chunked form; None is ``8·P`` clipped to
      [8, 64], the fastest on CPU for P = 1, 4, 16 (forward and backward at
      B=8, T=256, D=128, N=64: 8, 16–32 and 64).
    dtype: compute dtype of the projections and the output; both SSMs run
      in float32.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  num_heads: int | None = None
  d_state: int = 64
  shift_size: int | None = None
  use_bias: bool = True
  impl: str = "auto"
  chunk_size: int | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dims(self) -> tuple[int, int, int, int]:
    """``(H, P, M, W)``."""
    heads = self.d_model if self.num_heads is None else self.num_heads
    _common.check_divisible("d_model", self.d_model, "num_heads", heads)
    if self.d_state < 2 or self.d_state % 2:
      raise ValueError(f"d_state={self.d_state}; expected a positive even int "
                       "(N/2 complex conjugate pairs)")
    width = self.d_state if self.shift_size is None else self.shift_size
    if width < 1:
      raise ValueError(f"shift_size={width}; expected a positive int")
    return heads, self.d_model // heads, self.d_state // 2, width

  def init_state(self, batch_size: int, dtype=None):
    """``(window [B, W−1, D], X [B, H, P, P, N/2, 2])``, float32 zeros; ``dtype``
    is accepted for the protocol."""
    del dtype
    heads, width, modes, taps = self._dims()
    return (jnp.zeros((batch_size, taps - 1, self.d_model), jnp.float32),
            jnp.zeros((batch_size, heads, width, width, modes, 2), jnp.float32))

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs H3 over ``x``.

    Args:
      x: ``[B, T, D]``.
      state: ``(window, X)`` as ``init_state``, or None at a sequence start.
      segment_ids: ``[B, T]`` document ids; both SSMs restart where the id changes.

    Returns:
      ``(y, state)``: ``y`` ``[B, T, D]`` in ``dtype`` and the state after the last token.
    """
    _common.check_input(x, self.d_model)
    heads, width, modes, taps = self._dims()
    batch, time, _ = x.shape
    if state is None:
      state = self.init_state(batch)
    window, ssm_state = state
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    axes = ("embed", "heads", "head_dim")
    q, k, v = (_common.dense((heads, width), axes, name=f"{n}_proj", **proj)(x)
               for n in "qkv")
    param = lambda name, init, shape, names: self.param(
        name, nn.with_logical_partitioning(init, names), shape, self.param_dtype)
    f32 = lambda a: a.astype(jnp.float32)

    # Shift SSM on k: a W-tap causal conv plus the skip D_k.
    shift_weight = param("shift_weight", _shift_init, (taps, heads, width),
                         ("conv", "heads", "head_dim"))
    shift_d = param("shift_D", nn.initializers.normal(1.0), (heads, width),
                    ("heads", "head_dim"))
    k = f32(k)
    conv, window = ops.causal_conv1d(
        k.reshape(batch, time, self.d_model), f32(shift_weight).reshape(taps, self.d_model),
        state=f32(window), segment_ids=segment_ids)
    k = conv.reshape(k.shape) + f32(shift_d) * k

    # Diagonal SSM (S4D-Lin, bilinear) over k vᵀ, read by q.
    log_dt = param("log_dt", _log_dt_init, (heads,), ("heads",))
    a_log = param("A_log", _a_log_init, (heads, modes), ("heads", None))
    a_imag = param("A_imag", _a_imag_init, (heads, modes), ("heads", None))
    c = param("C", _c_init, (heads, modes, 2), ("heads", None, None))
    skip = param("D", nn.initializers.normal(1.0), (heads,), ("heads",))
    dt = jnp.exp(f32(log_dt))[:, None]
    dt_a = dt * lax.complex(-jnp.exp(f32(a_log)), f32(a_imag))
    a_bar = (1 + dt_a / 2) / (1 - dt_a / 2)
    b_bar = dt / (1 - dt_a / 2)
    o, ssm_state = h3_ssm(
        f32(q), k, f32(v), a_bar, b_bar, lax.complex(f32(c[..., 0]), f32(c[..., 1])),
        f32(skip), initial_state=ssm_state, segment_ids=segment_ids,
        chunk_size=min(8 * width, 64) if self.chunk_size is None else self.chunk_size,
        impl=self.impl)
    y = _common.dense(self.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1),
                      name="o_proj", **proj)(o.astype(self.dtype))
    return y, (window, ssm_state)
