"""The language model: embeddings, a stack of pre-norm residual blocks, logits.

For tokens ``x`` ``[B, T]``::

    h_0 = E[x] (+ P[pos])                        token (and learned position) embedding
    h   = h + Mixer_l(Norm(h))                   every layer l
    h   = h + MLP_l(Norm(h))                     (unless mlp == "none")
    logits = cap · tanh(Norm(h) W / cap)         W = Eᵀ when tied; no cap when None

The layers follow a *layout*: a period of mixer specs repeated
``num_layers / len(layout)`` times, so a homogeneous stack is a layout of one
spec and a hybrid (e.g. linear attention, sliding window, linear attention, …)
is a longer layout — a config, not a new class. The periods run under
``nn.scan`` with parameters stacked on a leading ``layers`` axis, so compile
time does not grow with depth; ``remat`` recomputes a period's activations in
the backward pass instead of storing them.

The model follows the mixer protocol itself::

    logits, state = model.apply(params, tokens, state=None, segment_ids=None)

``state`` holds every layer's mixer state (stacked per layout slot) and the
position of the next token within its document, so a sequence run whole,
in pieces with the state carried, or token by token gives the same logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm import layers
from recurrent_lm.models import registry
from recurrent_lm.ops import _checks

_MLPS = ("gelu", "swiglu", "moe", "none")
_ROUTERS = ("linear", "recurrent")
_NORMS = ("layernorm", "rmsnorm")
_POSITIONS = ("none", "learned")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  """One slot of a layout: a registered mixer name and its keyword arguments."""
  name: str
  kwargs: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def from_dict(cls, spec: Mapping[str, Any]) -> "MixerSpec":
    """``{"mixer": "gla", "num_heads": 4}`` → ``MixerSpec("gla", (("num_heads", 4),))``."""
    spec = dict(spec)
    if "mixer" not in spec:
      raise ValueError(f"layout entry {spec} has no 'mixer' key; expected {{'mixer': name, ...}}")
    name = spec.pop("mixer")
    return cls(name, tuple(sorted(spec.items())))

  def to_dict(self) -> dict[str, Any]:
    return {"mixer": self.name, **dict(self.kwargs)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that defines a model's parameters and its function.

  Attributes:
    vocab_size: V.
    d_model: width D.
    num_layers: L, a multiple of ``len(layout)``.
    layout: the mixer specs of one period of layers.
    mlp: channel mixer after every mixer: ``gelu`` (GPT), ``swiglu`` or ``none``.
    mlp_hidden_dim: its hidden width; 4·D for ``gelu``, 8/3·D rounded up to a
      multiple of 64 for ``swiglu`` when None.
    norm: ``layernorm`` or ``rmsnorm``, before every mixer, MLP and the logits.
    positions: ``learned`` adds a position embedding of ``max_len`` rows
      (positions restart at every document); ``none`` leaves order to the mixers.
    max_len: rows of the learned position table; positions past it give NaN
      logits rather than a silently wrong position.
    num_experts, top_k, router, router_dim, capacity_factor,
    load_balance_coef: the mixture of experts of ``mlp == "moe"`` (SwiGLU
      experts of width ``hidden_dim``; ``layers.MoEMLP``): E experts, top-k
      routing by a per-layer ``linear`` router or RMoE's ``recurrent`` one (a
      GRU of width ``router_dim`` shared across layers, recurrent over depth),
      dropless when ``capacity_factor`` is None, and the weight of the
      load-balance loss (mean over layers) in the training loss.
    tie_embeddings: logits use the transposed token embedding.
    logit_softcap: ``cap · tanh(logits / cap)`` when set.
    remat: recompute each period's activations in the backward pass.
    dtype: compute dtype of the layers (logits are float32).
    param_dtype: dtype of the parameters.
  """
  vocab_size: int
  d_model: int
  num_layers: int
  layout: tuple[MixerSpec, ...]
  mlp: str = "gelu"
  mlp_hidden_dim: int | None = None
  num_experts: int = 8
  top_k: int = 2
  router: str = "linear"
  router_dim: int = 256
  capacity_factor: float | None = None
  load_balance_coef: float = 1e-3
  norm: str = "layernorm"
  positions: str = "none"
  max_len: int = 512
  tie_embeddings: bool = False
  logit_softcap: float | None = None
  remat: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for field, value in (("vocab_size", self.vocab_size), ("d_model", self.d_model),
                         ("num_layers", self.num_layers), ("max_len", self.max_len)):
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{field}={value!r}; expected a positive int")
    if not self.layout:
      raise ValueError("model.layout is empty; expected at least one mixer spec")
    if self.num_layers % len(self.layout):
      raise ValueError(
          f"model.num_layers={self.num_layers} is not a multiple of the layout "
          f"length {len(self.layout)}")
    for spec in self.layout:
      registry.get_mixer(spec.name)   # raises on an unknown name
    for field, value, allowed in (("mlp", self.mlp, _MLPS), ("norm", self.norm, _NORMS),
                                  ("positions", self.positions, _POSITIONS),
                                  ("router", self.router, _ROUTERS),
                                  ("dtype", self.dtype, _DTYPES),
                                  ("param_dtype", self.param_dtype, _DTYPES)):
      if value not in allowed:
        raise ValueError(f"model.{field}={value!r}; expected one of {', '.join(allowed)}")
    if self.logit_softcap is not None and not self.logit_softcap > 0:
      raise ValueError(f"model.logit_softcap={self.logit_softcap}; expected > 0 or None")

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "ModelConfig":
    """From plain data (an ``ml_collections`` dict, JSON): ``layout`` is a list of dicts."""
    config = dict(config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(f"unknown model config field(s) {unknown}; expected some of {sorted(known)}")
    config["layout"] = tuple(MixerSpec.from_dict(s) for s in config.get("layout", ()))
    return cls(**config)

  def to_dict(self) -> dict[str, Any]:
    config = dataclasses.asdict(self)
    config["layout"] = [spec.to_dict() for spec in self.layout]
    return config

  @property
  def num_periods(self) -> int:
    return self.num_layers // len(self.layout)

  @property
  def hidden_dim(self) -> int:
    if self.mlp_hidden_dim is not None:
      return self.mlp_hidden_dim
    if self.mlp in ("swiglu", "moe"):
      return -(-8 * self.d_model // 3 // 64) * 64
    return 4 * self.d_model

  def make_mixer(self, spec: MixerSpec, **kwargs) -> nn.Module:
    return registry.get_mixer(spec.name)(
        self.d_model, dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
        **dict(spec.kwargs), **kwargs)


def _norm(config: ModelConfig, name: str) -> nn.Module:
  cls = layers.LayerNorm if config.norm == "layernorm" else layers.RMSNorm
  return cls(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), name=name)


class Block(nn.Module):
  """``h + Mixer(Norm h)`` then ``h + MLP(Norm h)``; ``h`` ``[B, T, D]``.

  With ``mlp == "moe"`` the MLP is a mixture of experts; its routing
  statistics are sown into the ``moe_aux`` collection, and RMoE's router
  state ``router_h`` ``[B, T, R]`` passes from block to block (None otherwise).
  """
  config: ModelConfig
  spec: MixerSpec

  @nn.compact
  def __call__(self, h, state, segment_ids, router_h=None, gru_params=None, tokens=None):
    config = self.config
    dtypes = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
    mixer = config.make_mixer(self.spec, name="mixer")
    # Mixers that match on token ids (the n-gram head) get them at any depth.
    extra = {"tokens": tokens} if getattr(mixer, "reads_tokens", False) else {}
    y, state = mixer(_norm(config, "mixer_norm")(h), state, segment_ids, **extra)
    h = h + y.astype(h.dtype)
    if config.mlp == "moe":
      u = _norm(config, "mlp_norm")(h)
      if config.router == "linear":
        logits = layers.LinearRouter(config.num_experts, name="router", **dtypes)(u)
      else:
        logits, router_h = layers.RecurrentRouterStep(
            config.num_experts, config.router_dim, param_dtype=dtypes["param_dtype"],
            name="router")(u, router_h, gru_params)
      mask = None if segment_ids is None else segment_ids > 0
      y, aux = layers.MoEMLP(config.d_model, config.hidden_dim, config.num_experts,
                             config.top_k, config.capacity_factor, name="mlp", **dtypes)(
                                 u, logits, mask)
      for name, value in aux.items():   # one value per layer (overwrite, not append)
        self.sow("moe_aux", name, value, init_fn=lambda: jnp.zeros((), jnp.float32),
                 reduce_fn=lambda _, new: new)
      h = h + y.astype(h.dtype)
    elif config.mlp != "none":
      mlp_cls = layers.GeluMLP if config.mlp == "gelu" else layers.SwiGLU
      mlp = mlp_cls(config.hidden_dim, name="mlp", **dtypes)
      h = h + mlp(_norm(config, "mlp_norm")(h)).astype(h.dtype)
    return h, state, router_h


class _Period(nn.Module):
  """One period of the layout: ``len(layout)`` blocks; scanned over by the LM."""
  config: ModelConfig

  @nn.compact
  def __call__(self, carry, states, segment_ids, gru_params, tokens):
    h, router_h = carry
    new_states = []
    for i, spec in enumerate(self.config.layout):
      h, state, router_h = Block(self.config, spec, name=f"block_{i}")(
          h, None if states is None else states[i], segment_ids, router_h, gru_params, tokens)
      new_states.append(state)
    return (h, router_h), tuple(new_states)


class LanguageModel(nn.Module):
  """A causal LM over a layout of token mixers (module docstring for the equations)."""
  config: ModelConfig

  def init_state(self, batch_size: int, dtype=None) -> dict[str, Any]:
    """The state of ``batch_size`` fresh sequences; needs no parameters.

    Returns:
      ``{"position": [B] int32, "layers": (per layout slot: the mixer state
      stacked on a leading [num_periods] axis, ...)}``.
    """
    config = self.config
    layer_states = tuple(
        jax.tree_util.tree_map(
            lambda s: jnp.broadcast_to(s, (config.num_periods,) + s.shape),
            config.make_mixer(spec, parent=None).init_state(batch_size, dtype))
        for spec in config.layout)
    return {"position": jnp.zeros((batch_size,), jnp.int32), "layers": layer_states}

  @nn.compact
  def __call__(self, tokens, state=None, segment_ids=None, *, embeddings=None,
               embedding_mask=None, return_hidden=False):
    """Next-token logits.

    Args:
      tokens: ``[B, T]`` int token ids in ``[0, vocab_size)``; an id outside
        gives NaN logits at its position (ids are checked on the host where
        data enters; inside ``jit`` NaN is the loudest signal available).
      state: from ``init_state`` or a previous call; None starts every row.
      segment_ids: ``[B, T]`` document ids of a packed row.
      embeddings: ``[B, T, D]`` input vectors used instead of the token
        embedding where ``embedding_mask`` ``[B, T]`` is True (everywhere when
        it is None); position embeddings are added to them as to tokens. For
        wrappers that feed vectors of their own (HMT's memory embeddings).
      return_hidden: also return the final hidden states ``[B, T, D]`` (after
        the final norm: the input of the logits layer).

    Returns:
      ``(logits, state)``: ``logits`` ``[B, T, V]`` float32 and the state
      after the last token; ``(logits, state, hidden)`` with ``return_hidden``.
    """
    config = self.config
    if tokens.ndim != 2 or tokens.shape[1] < 1:
      raise ValueError(f"tokens have shape {list(tokens.shape)}; expected [B, T] with T >= 1")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"tokens have dtype {tokens.dtype}; expected an integer dtype")
    batch, time = tokens.shape
    dtype = jnp.dtype(config.dtype)
    embed_init = nn.initializers.normal(0.02)
    table = self.param("embedding", nn.with_logical_partitioning(embed_init, ("vocab", "embed")),
                       (config.vocab_size, config.d_model), jnp.dtype(config.param_dtype))
    h = jnp.take(table, tokens, axis=0, mode="fill", fill_value=jnp.nan)
    if embeddings is not None:
      _checks.check_shape("embeddings", embeddings, (batch, time, config.d_model))
      replace = True if embedding_mask is None else embedding_mask[..., None]
      h = jnp.where(replace, embeddings.astype(h.dtype), h)

    offset = jnp.zeros((batch,), jnp.int32) if state is None else state["position"]
    positions = _checks.document_positions(offset, segment_ids, time)
    if config.positions == "learned":
      pos_table = self.param(
          "position_embedding", nn.with_logical_partitioning(embed_init, (None, "embed")),
          (config.max_len, config.d_model), jnp.dtype(config.param_dtype))
      h = h + jnp.take(pos_table, positions, axis=0, mode="fill", fill_value=jnp.nan)
    h = h.astype(dtype)

    period = _Period
    if config.remat:
      period = nn.remat(period, prevent_cse=False)
    # RMoE's router GRU is one set of parameters for every layer: owned here,
    # broadcast into the scan, its state carried next to the residual stream.
    gru_params, router_h = None, None
    if config.mlp == "moe" and config.router == "recurrent":
      gru_params = self.param("router_gru", layers.moe.gru_param_init(
          config.router_dim, jnp.dtype(config.param_dtype)))
      router_h = layers.moe.initial_router_state(batch, time, config.router_dim)
    stack = nn.scan(period, variable_axes={"params": 0, "moe_aux": 0},
                    split_rngs={"params": True},
                    in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                    length=config.num_periods, metadata_params={nn.PARTITION_NAME: "layers"})
    (h, _), layer_states = stack(config, name="layers")(
        (h, router_h), None if state is None else state["layers"], segment_ids, gru_params,
        tokens)

    h = _norm(config, "final_norm")(h)
    if config.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", h, table.astype(dtype))
    else:
      logits = nn.Dense(
          config.vocab_size, use_bias=False, dtype=dtype,
          param_dtype=jnp.dtype(config.param_dtype), name="logits",
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), ("embed", "vocab")))(h)
    logits = logits.astype(jnp.float32)
    if config.logit_softcap is not None:
      logits = config.logit_softcap * jnp.tanh(logits / config.logit_softcap)
    new_state = {"position": positions[:, -1] + 1, "layers": layer_states}
    if return_hidden:
      return logits, new_state, h
    return logits, new_state


def with_mixer_options(config: ModelConfig, mixer: str, **options) -> ModelConfig:
  """``config`` with ``options`` set on every layout slot of ``mixer``.

  For switches that change a mixer's function but not its parameters, e.g.
  Mamba-2's state-collapse mitigations at inference::

      config = with_mixer_options(config, "mamba2", state_window=1024)
      model = LanguageModel(config)          # the trained params apply unchanged
  """
  if not any(spec.name == mixer for spec in config.layout):
    raise ValueError(f"the layout has no {mixer!r} slot; its mixers are "
                     f"{sorted({spec.name for spec in config.layout})}")
  layout = tuple(
      MixerSpec(spec.name, tuple(sorted({**dict(spec.kwargs), **options}.items())))
      if spec.name == mixer else spec for spec in config.layout)
  return dataclasses.replace(config, layout=layout)


def prefix_len(config: ModelConfig) -> int | None:
  """The prefix length M of the model's prefix mixers (JRT-RNN), None without one.

  The training objective and evaluation read it to tell the prefix (read
  twice, trained by masked LM) from the decoder region; all prefix mixers of
  a model must share one M.
  """
  lengths = {dict(spec.kwargs)["prefix_len"] for spec in config.layout
             if "prefix_len" in dict(spec.kwargs)}
  if len(lengths) > 1:
    raise ValueError(f"layout has prefix mixers with prefix_len {sorted(lengths)}; "
                     "expected one prefix length per model")
  return lengths.pop() if lengths else None


def state_bytes(config: ModelConfig, batch_size: int = 1) -> int:
  """Bytes of the state ``init_state`` carries for ``batch_size`` sequences.

  What a model remembers of its past between calls: recurrent states,
  convolution windows, and KV caches at their capacity (``max_len`` tokens
  for full attention, ``window`` for a sliding window). The recall
  experiments place models on the recall / state-size plane with it.
  """
  state = jax.eval_shape(lambda: LanguageModel(config).init_state(batch_size))
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
