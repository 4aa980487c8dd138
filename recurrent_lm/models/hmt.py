"""HMT: the Hierarchical Memory Transformer (He et al., 2024) around any backbone.

HMT makes any LM of this project (a :class:`~recurrent_lm.models.lm.ModelConfig`:
GPT, qLSTM, BASED, Mamba, … any layout) segment-recurrent. A document is cut
into segments ``x^(n)`` of ``L`` tokens; the backbone ``BBM`` only ever sees
one segment and a few vectors, and a cache of memory embeddings carries
everything older::

    S_n = BBM([T ‖ x^(n-1)_{L-j..L-1} ‖ T]) at the last T   summary (causality below)
    P_n = Σ_i softmax_i((S_n W_q)·(M_i W_k) / √R) M_i       recall over the last N memories
    h   = BBM([P_n ‖ x^(n-1)_{L-k..L-1} ‖ x^(n) ‖ P_n])      k previous tokens (sensory memory)
    logits(x^(n)) = the backbone's logits at the x^(n) positions
    m_n = h at the trailing P_n                               pushed into the FIFO cache M

``BBM(·)`` stands for the backbone's final hidden states (after its final
norm: the input of its logits layer), ``T`` for a learned summary token,
``M`` ``[N, D]`` for the last ``N`` memory embeddings ``m`` of the document
(fewer at its start: the missing ones are masked out of the softmax) and
``W_q, W_k`` ``[D, R]``. As in the reference the values of the recall are
the memories themselves (no ``W_v``). A document's first segment has
nothing to recall and no previous tokens: it runs as ``[x^(0) ‖ E_0]`` with
a learned first memory token ``E_0``, whose final hidden state is ``m_0``.

Causality. The paper (and the reference, ``RecurrentWrapper.forward`` in
OswaldHe/HMT-pytorch) computes the summary of segment ``n`` from the *first*
``j`` tokens of segment ``n`` itself and prepends its recall ``P_n`` to the
whole segment, so positions ``< j`` read a vector computed from tokens after
them: not a causal LM, and wrong for generation. Here ``S_n`` summarises the
*last* ``j`` tokens of the previous segment instead — the most recent context
the segment can see, the causal stand-in for "what this segment is about" —
so every position of segment ``n`` still reads ``P_n`` (unlike the other
causal option, reading ``P_n`` only from position ``j`` on, which would leave
the first ``j`` positions without long-term memory). Everything segment
``n`` reads depends on segments ``< n`` only.

Other differences from the reference: a document's first segment has no
leading memory token (the reference prepends its learned memory token there
too; here there is nothing to recall, and leaving it out lets the documents
of a packed row share one backbone call); the reference's 1/R scale for
``R ≥ 4096``, its retrieval loss and its "browse" mode are left out.

BPTT. A document's segments form blocks of ``bptt_segments`` (0…b−1, b…2b−1,
…). Gradients flow through the memory cache inside a block and stop where a
block begins: the cache entering segment ``n`` is ``lax.stop_gradient``-ed when
``n % b == 0``. This is the reference's training regime (it unrolls samples of
``bptt_depth`` segments, the memory starting fresh at each) on a stream, where
the memory's *values* carry across blocks.

State (fixed shape, ``init_state`` needs no parameters)::

    position      [B] int32        position of the next token in its document
    tokens        [B, k+L-1] int32 the last k+L-1 tokens of the document: the
                                   current partial segment (< L) and the k before it
    memory        [B, N, D] f32    the cache, oldest first, newest last
    num_memories  [B] int32        how many of its slots are filled (the last ones)
    read          [B, D] f32       P of the segment holding the next token

The backbone's own state is not carried: a call reruns the backbone on the
buffered partial segment (decoding costs one backbone pass over ≤ k+L+2
positions per token, the price of exactness for every backbone and of a
state bounded by ``k + L`` tokens and ``N`` vectors).

How a call runs. The call's tokens are cut into windows of ``V = min(L, T)``
tokens. At most one segment completes inside a window, and at most one
segment with something to recall starts inside it (after that completion),
so a window takes two backbone calls on a *frame* of ``k + L + V + 1``
positions — the window, the ``k + L`` before it (the rerun of the segment
carried in, its previous tokens and recall) and one trailing slot — with the
runs ``[P ‖ prev ‖ segment ‖ P]`` laid out in place and kept apart by the
backbone's own ``segment_ids``. Call A runs everything whose recall is known
when the window starts: the segment carried in, which may complete and
write ``m``, and the first segments of documents starting in the window.
Call B runs the segment that starts inside the window after that write; it
is left out where no segment can start inside a window (fresh rows without
``segment_ids``, one-token windows). The summaries of all windows are one
batched backbone call before the scan over windows. A long row costs about
2½ backbone passes per token (4½ with call B).
Packed rows (``segment_ids``) restart the memory and the segment grid at
every document start and equal their documents run alone. A call's first
token continues the carried document, as for every mixer: start a new
document across calls with a fresh state.

Limitations: an MoE backbone runs, but its ``moe_aux`` statistics are not
collected; a backbone that reads token ids (the n-gram head) sees id 0 at
the memory positions; prefix mixers (JRT) are refused (non-causal).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm.models import lm
from recurrent_lm.ops import _checks


@dataclasses.dataclass(frozen=True)
class HMTConfig:
  """A backbone and HMT's segment recurrence around it.

  Attributes:
    backbone: the wrapped LM; it must be causal (no prefix mixers) and, with
      learned positions, have ``max_len ≥ segment_len + prev_tokens + 2``.
    segment_len: L, tokens per segment.
    summary_len: j ≤ L, tokens of the previous segment (its last ones) the
      summary ``S_n`` encodes (the reference's L/2).
    num_memories: N, memory embeddings the recall attends over (FIFO).
    prev_tokens: k ≤ L, last tokens of the previous segment put before the
      segment (the paper's sensory memory; 0 for none).
    bptt_segments: b, segments per BPTT block (module docstring).
    recall_dim: R, width of the recall's queries and keys; ``d_model`` if None.
  """
  backbone: lm.ModelConfig
  segment_len: int = 256
  summary_len: int = 128
  num_memories: int = 100
  prev_tokens: int = 32
  bptt_segments: int = 2
  recall_dim: int | None = None

  def __post_init__(self):
    if not isinstance(self.backbone, lm.ModelConfig):
      raise ValueError(f"hmt.backbone is a {type(self.backbone).__name__}; expected a ModelConfig")
    for field, low in (("segment_len", 1), ("summary_len", 1), ("num_memories", 1),
                       ("prev_tokens", 0), ("bptt_segments", 1)):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"hmt.{field}={value!r}; expected an int >= {low}")
    if self.recall_dim is not None and (not isinstance(self.recall_dim, int)
                                        or isinstance(self.recall_dim, bool)
                                        or self.recall_dim < 1):
      raise ValueError(f"hmt.recall_dim={self.recall_dim!r}; expected a positive int or None")
    for field in ("summary_len", "prev_tokens"):
      if getattr(self, field) > self.segment_len:
        raise ValueError(f"hmt.{field}={getattr(self, field)} exceeds hmt.segment_len="
                         f"{self.segment_len}; expected at most segment_len")
    if self.backbone.mlp == "moe":
      raise ValueError("hmt.backbone.mlp='moe'; expected a dense MLP (HMT does not collect "
                       "the experts' load-balance statistics)")
    prefix = lm.prefix_len(self.backbone)
    if prefix is not None:
      raise ValueError(f"hmt.backbone has prefix mixers (prefix_len={prefix}) that read "
                       "their prefix non-causally; expected a causal backbone")
    run = self.segment_len + self.prev_tokens + 2
    if self.backbone.positions == "learned" and self.backbone.max_len < run:
      raise ValueError(
          f"hmt.backbone.max_len={self.backbone.max_len} is shorter than a segment's run "
          f"segment_len + prev_tokens + 2 = {run}; expected a position table of >= {run} rows")

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "HMTConfig":
    """From plain data: ``backbone`` is a ``ModelConfig`` dict."""
    config = dict(config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(f"unknown hmt config field(s) {unknown}; expected some of {sorted(known)}")
    if "backbone" not in config:
      raise ValueError("hmt config has no 'backbone'; expected a model config dict")
    backbone = config["backbone"]
    if not isinstance(backbone, lm.ModelConfig):
      config["backbone"] = lm.ModelConfig.from_dict(backbone)
    return cls(**config)

  @property
  def vocab_size(self) -> int:
    return self.backbone.vocab_size

  def to_dict(self) -> dict[str, Any]:
    config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    config["backbone"] = self.backbone.to_dict()
    return config


def memory_recall(summary, memory, num_memories, w_query, w_key):
  """HMT's memory recall: attention of one summary over the cached memories.

      P = Σ_i a_i M_i ,   a = softmax_i((S W_q)·(M_i W_k) / √R)   over filled slots i

  Only the last ``num_memories`` slots of the cache are filled (the cache is
  oldest first); the others get weight exactly 0, and an empty cache recalls 0.

  Args:
    summary: ``[B, D]`` the summary S.
    memory: ``[B, N, D]`` the cache M.
    num_memories: ``[B]`` int, filled slots (≤ N).
    w_query, w_key: ``[D, R]``.

  Returns:
    ``(recalled, weights)``: ``[B, D]`` float32 and ``[B, N]``.
  """
  query = jnp.einsum("bd,dr->br", summary.astype(jnp.float32), w_query.astype(jnp.float32))
  keys = jnp.einsum("bnd,dr->bnr", memory.astype(jnp.float32), w_key.astype(jnp.float32))
  scores = jnp.einsum("br,bnr->bn", query, keys) / jnp.sqrt(jnp.float32(w_key.shape[-1]))
  slots = memory.shape[1]
  filled = jnp.arange(slots)[None, :] >= slots - num_memories[:, None]
  # A finite fill keeps an empty cache free of NaN (and its gradients too).
  weights = jax.nn.softmax(jnp.where(filled, scores, -1e30), axis=-1)
  weights = jnp.where(filled, weights, 0.0)
  return jnp.einsum("bn,bnd->bd", weights, memory.astype(jnp.float32)), weights


def _layout(config: HMTConfig, tokens, state, segment_ids):
  """Where every run of the call goes in the frames of its windows.

  Returns ``(sizes, per_window, summary_ids, new_tokens, new_position)``:
  ``per_window`` holds ``[B, W, …]`` arrays (module docstring for the frame).
  Frame coordinates: the window's tokens sit at ``[H, H + V)`` with
  ``H = k + L``, the trailing slot at ``H + V``.
  """
  L, j, k = config.segment_len, config.summary_len, config.prev_tokens
  batch, time = tokens.shape
  head = k + L
  width = min(L, time)                      # V
  num_windows = -(-time // width)           # W
  frame = head + width + 1                  # F
  pad = num_windows * width - time

  q = _checks.document_positions(state["position"], segment_ids, time)
  starts = (jnp.zeros((batch, time), bool) if segment_ids is None
            else _checks.segment_starts(segment_ids))
  p, n = q % L, q // L
  t = jnp.arange(time)
  run_start = (p == 0) & (t > 0)[None]
  run_id = jnp.cumsum(run_start, axis=1, dtype=jnp.int32)   # the run holding t = 0 is run 0
  continues = jnp.concatenate([~starts[:, 1:], jnp.ones((batch, 1), bool)], axis=1)
  writes = (p == L - 1) & continues          # a segment completes and its document goes on
  mid = run_start & ~starts & (t % width != 0)[None]   # a segment starts inside a window

  def windows(x, fill):
    return jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill).reshape(batch, num_windows, width)

  def at(x, index):
    return jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0]

  valid = windows(jnp.ones((batch, time), bool), False)
  p_w, n_w, rid_w = windows(p, 0), windows(n, 0), windows(run_id, -1)
  writes_w, mid_w, starts_w = windows(writes, False), windows(mid, False), windows(starts, False)

  first_p, first_rid = p_w[..., 0], rid_w[..., 0]
  has_read = n_w[..., 0] >= 1                       # the run carried in reads P
  has_write = writes_w.any(-1)
  write_at = jnp.argmax(writes_w, axis=-1)
  has_mid = mid_w.any(-1)
  mid_at = jnp.argmax(mid_w, axis=-1)
  second = has_mid[..., None] & valid & (rid_w == at(rid_w, mid_at)[..., None])

  f = jnp.arange(frame)
  junk = jnp.broadcast_to(-1 - f, (batch, num_windows, frame))   # one document per junk slot
  in_window = lambda x, fill: jnp.pad(x, ((0, 0), (0, 0), (head, 1)), constant_values=fill)
  # Call A: the run carried in (from its read slot, through its earlier tokens,
  # to its trailing slot when it completes), and the window's other runs but
  # the one of call B.
  run_from = head - first_p - jnp.where(has_read, k + 1, 0)
  label_a = jnp.where(in_window(valid & ~second, False), in_window(rid_w + 1, 0), junk)
  label_a = jnp.where((f >= run_from[..., None]) & (f < head), first_rid[..., None] + 1, label_a)
  write_pos = head + write_at + 1
  write_mask = has_write[..., None] & (f == write_pos[..., None])
  label_a = jnp.where(write_mask, first_rid[..., None] + 1, label_a)
  read_mask_a = has_read[..., None] & (f == (L - 1 - first_p)[..., None])
  # Call B: the segment starting inside the window, after its previous tokens and P.
  read_pos_b = head + mid_at - k - 1
  before_b = has_mid[..., None] & (f >= read_pos_b[..., None]) & (f < (head + mid_at)[..., None])
  label_b = jnp.where(in_window(second, False) | before_b, 0, junk)
  read_mask_b = has_mid[..., None] & (f == read_pos_b[..., None])

  def segments(label):
    changed = (label[..., 1:] != label[..., :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros_like(changed[..., :1]), jnp.cumsum(changed, -1)], -1)

  # The call's tokens after the document's buffered ones, in frame-index space.
  ids = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), state["tokens"].astype(jnp.int32),
                         tokens.astype(jnp.int32), jnp.zeros((batch, pad + 1), jnp.int32)], 1)
  starts_at = jnp.arange(num_windows) * width
  frames = ids[:, starts_at[:, None] + f[None, :]]                         # [B, W, F]
  last = head + starts_at[None] + write_at                                 # where the write happens
  summary_ids = jnp.take_along_axis(
      ids, (last[..., None] - j + 1 + jnp.arange(j)).reshape(batch, -1), axis=1)
  per_window = dict(
      ids=frames, segments_a=segments(label_a), segments_b=segments(label_b),
      read_mask_a=read_mask_a, write_mask=write_mask, read_mask_b=read_mask_b,
      write_pos=write_pos, has_read=has_read, has_write=has_write,
      write_segment=at(n_w, write_at), second=second,
      reset_before=starts_w[..., 0], reset_after=starts_w[..., 1:].any(-1))
  sizes = dict(head=head, width=width, num_windows=num_windows)
  new_tokens = ids[:, time + 1:time + head]
  return (sizes, per_window, summary_ids.reshape(batch, num_windows, j), new_tokens,
          q[:, -1] + 1)


class HMT(nn.Module):
  """HMT around ``config.backbone`` (module docstring for the equations).

  ``logits, state = model.apply(params, tokens, state=None, segment_ids=None)``
  as for :class:`~recurrent_lm.models.lm.LanguageModel`. The parameters are
  ``backbone`` (a LanguageModel's, so a trained one drops in), ``summary_token``
  T, ``first_memory_token`` E_0 ``[D]``, ``recall_query`` W_q and
  ``recall_key`` W_k ``[D, R]``.
  """
  config: HMTConfig

  def init_state(self, batch_size: int, dtype=None) -> dict[str, Any]:
    """The state of ``batch_size`` fresh sequences (module docstring); needs no params.

    ``dtype`` is that of the memory (float32 if None).
    """
    config = self.config
    dim = config.backbone.d_model
    dtype = jnp.float32 if dtype is None else dtype
    return {
        "position": jnp.zeros((batch_size,), jnp.int32),
        "tokens": jnp.zeros((batch_size, config.prev_tokens + config.segment_len - 1), jnp.int32),
        "memory": jnp.zeros((batch_size, config.num_memories, dim), dtype),
        "num_memories": jnp.zeros((batch_size,), jnp.int32),
        "read": jnp.zeros((batch_size, dim), dtype),
    }

  @nn.compact
  def __call__(self, tokens, state=None, segment_ids=None):
    """Next-token logits.

    Args:
      tokens: ``[B, T]`` int token ids, any ``T ≥ 1``.
      state: from ``init_state`` or a previous call; None starts every row.
      segment_ids: ``[B, T]`` document ids of a packed row.

    Returns:
      ``(logits, state)``: ``logits`` ``[B, T, V]`` float32 and the state after
      the last token.
    """
    config = self.config
    backbone_config = config.backbone
    if tokens.ndim != 2 or tokens.shape[1] < 1:
      raise ValueError(f"tokens have shape {list(tokens.shape)}; expected [B, T] with T >= 1")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"tokens have dtype {tokens.dtype}; expected an integer dtype")
    batch, time = tokens.shape
    _checks.check_segment_ids(segment_ids, batch, time)
    # Fresh unpacked rows start segments at window starts only; so do windows of one token.
    second_call = min(config.segment_len, time) > 1 and not (state is None and segment_ids is None)
    if state is None:
      state = self.init_state(batch)
    dim, slots, bptt = backbone_config.d_model, config.num_memories, config.bptt_segments
    param_dtype = jnp.dtype(backbone_config.param_dtype)

    backbone = lm.LanguageModel(backbone_config, parent=None)
    backbone_params = self.param(
        "backbone", lambda rng: backbone.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
    vector_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",))
    summary_token = self.param("summary_token", vector_init, (dim,), param_dtype)
    first_memory_token = self.param("first_memory_token", vector_init, (dim,), param_dtype)
    recall_dim = config.recall_dim or dim
    matrix_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None))
    w_query = self.param("recall_query", matrix_init, (dim, recall_dim), param_dtype)
    w_key = self.param("recall_key", matrix_init, (dim, recall_dim), param_dtype)
    if self.is_initializing():     # the parameters exist: init need not trace the recurrence
      return (jnp.zeros((batch, time, backbone_config.vocab_size), jnp.float32),
              self.init_state(batch))

    def run(ids, segments, vectors, mask):
      logits, _, hidden = backbone.apply(
          {"params": backbone_params}, jnp.where(mask, 0, ids), None, segments,
          embeddings=vectors, embedding_mask=mask, return_hidden=True)
      return logits, hidden.astype(jnp.float32)

    def place(mask, vector):       # [B, F] mask, [B, D] vector → [B, F, D]
      return jnp.where(mask[..., None], vector[:, None, :].astype(jnp.float32), 0.0)

    sizes, per_window, summary_ids, new_tokens, new_position = _layout(
        config, tokens, state, segment_ids)
    head, width, num_windows = sizes["head"], sizes["width"], sizes["num_windows"]

    # S for every window's completing segment, in one batched call:
    # [T ‖ last j tokens ‖ T], read at the trailing T.
    j = config.summary_len
    flat = summary_ids.reshape(batch * num_windows, j)
    ids = jnp.pad(flat, ((0, 0), (1, 1)))
    mask = jnp.zeros((j + 2,), bool).at[jnp.array([0, j + 1])].set(True)
    mask = jnp.broadcast_to(mask, ids.shape)
    _, hidden = run(ids, None, place(mask, jnp.broadcast_to(summary_token, (ids.shape[0], dim))),
                    mask)
    per_window["summary"] = hidden[:, -1].reshape(batch, num_windows, dim)

    def reset(flag, memory, count, read):
      return (jnp.where(flag[:, None, None], 0.0, memory), jnp.where(flag, 0, count),
              jnp.where(flag[:, None], 0.0, read))

    def window(carry, x):
      memory, count, read = reset(x["reset_before"], *carry)
      # Call A: the carried-in run reads P (if it is not a first segment) and,
      # when it completes, writes at its trailing slot (P again, or E_0).
      write_vector = jnp.where(x["has_read"][:, None], read,
                               first_memory_token[None].astype(jnp.float32))
      vectors = place(x["read_mask_a"], read) + place(x["write_mask"], write_vector)
      logits_a, hidden_a = run(x["ids"], x["segments_a"], vectors,
                               x["read_mask_a"] | x["write_mask"])
      written = jnp.take_along_axis(hidden_a, x["write_pos"][:, None, None], axis=1)[:, 0]
      has_write = x["has_write"]
      pushed = jnp.concatenate([memory[:, 1:], written[:, None].astype(memory.dtype)], axis=1)
      memory = jnp.where(has_write[:, None, None], pushed, memory)
      count = jnp.where(has_write, jnp.minimum(count + 1, slots), count)
      cut = has_write & ((x["write_segment"] + 1) % bptt == 0)   # a BPTT block begins
      memory = jnp.where(cut[:, None, None], jax.lax.stop_gradient(memory), memory)
      recalled, _ = memory_recall(x["summary"], memory, count, w_query, w_key)
      read = jnp.where(has_write[:, None], recalled.astype(read.dtype), read)

      logits = logits_a[:, head:head + width]
      if second_call:
        logits_b, _ = run(x["ids"], x["segments_b"], place(x["read_mask_b"], read),
                          x["read_mask_b"])
        logits = jnp.where(x["second"][..., None], logits_b[:, head:head + width], logits)
      return reset(x["reset_after"], memory, count, read), logits

    xs = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 1, 0), per_window)
    carry = (state["memory"], state["num_memories"], state["read"])
    (memory, count, read), logits = jax.lax.scan(window, carry, xs)
    logits = jnp.moveaxis(logits, 0, 1).reshape(batch, num_windows * width, -1)[:, :time]
    return logits, {"position": new_position, "tokens": new_tokens, "memory": memory,
                    "num_memories": count, "read": read}


def state_bytes(config: HMTConfig, batch_size: int = 1) -> int:
  """Bytes of the state HMT carries for ``batch_size`` sequences.

  ``(k + L − 1 + 2) · 4 + (N + 1) · D · 4`` per sequence: the buffered
  tokens, the memory cache and the current recall (like
  :func:`recurrent_lm.models.lm.state_bytes`).
  """
  state = jax.eval_shape(lambda: HMT(config).init_state(batch_size))
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))


def hmt_cpu_small(vocab_size: int = 16384, max_len: int = 512,
                  backbone: str = "qlstm") -> HMTConfig:
  """HMT around the ``qlstm_cpu_small`` (or ``gpt_cpu_small``) preset.

  ``max_len`` is the training length: segments of L = max_len / 4 tokens (a
  training row holds four, two BPTT blocks of two), summaries of L/2 tokens,
  k = L/8 previous tokens and N = 32 memories. The backbone is built for one
  segment's run (``max_len = L + k + 2``): its context is a segment, HMT's
  is unbounded.
  """
  from recurrent_lm.models import presets   # here: presets may list this preset
  if backbone not in ("qlstm", "gpt"):
    raise ValueError(f"hmt backbone {backbone!r}; expected 'qlstm' or 'gpt'")
  segment_len = max(max_len // 4, 1)
  prev_tokens = segment_len // 8
  return HMTConfig(
      backbone=presets.get(f"{backbone}_cpu_small", vocab_size,
                           max_len=segment_len + prev_tokens + 2),
      segment_len=segment_len, summary_len=max(segment_len // 2, 1), num_memories=32,
      prev_tokens=prev_tokens, bptt_segments=2)
