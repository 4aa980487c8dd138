"""``ops.neural_memory`` against a token-by-token reference of its equations.

The reference walks every (row, head) token by token: at a document start it
loads ``A_0``; at every chunk start (document position ≡ 0 mod C) the gradient
memory becomes the current memory; then ``g = ∇ℓ(G; k, v)``, ``S = ηS − θg``,
``A = rA + S``, ``y = M_{φ(A)}(q)``. With ``C = 1`` that is the plain
recurrent form. Both run in float64, where the op must agree to 1e-9 of the
largest magnitude (the op sums a chunk's affine maps in a tree, the reference
one by one); the mixer template checks the float32 path's consistency.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops._close import assert_close

# The module: ``recurrent_lm.ops.neural_memory`` as an attribute is the op.
nm = importlib.import_module("recurrent_lm.ops.neural_memory")
B, T, H, K = 2, 19, 2, 4
TOL = 1e-9

# (memory, objective, retention, momentum): Titans linear and deep, Moneta, Yaad, Memora.
VARIANTS = {
    "titans_linear": ("linear", "l2", "decay", True),
    "titans_mlp": ("mlp", "l2", "decay", True),
    "lp_decay": ("linear", "lp", "decay", True),
    "moneta": ("mlp", "lp", "lq", False),
    "yaad": ("mlp", "huber", "decay", False),
    "memora": ("mlp", "l2", "kl", False),
}


def _init_memory(memory, seed, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(seed))
  if memory == "linear":
    return {"w": 0.3 * jax.random.normal(k1, (H, K, K), dtype)}
  return {"w1": jax.random.normal(k1, (H, K, 2 * K), dtype) / np.sqrt(K),
          "w2": 0.3 * jax.random.normal(k2, (H, 2 * K, K), dtype)}


def _inputs(variant, seed=0, time=T, dtype=jnp.float32):
  memory, objective, retention, use_momentum = VARIANTS[variant]
  keys = jax.random.split(jax.random.key(seed), 8)
  normal = lambda key, shape: jax.random.normal(key, shape, dtype)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k = unit(normal(keys[0], (B, time, H, K))), unit(normal(keys[1], (B, time, H, K)))
  v = normal(keys[2], (B, time, H, K))
  args = {"q": q, "k": k, "v": v,
          "lr": 0.3 * jax.nn.sigmoid(normal(keys[3], (B, time, H))),
          "retain": jax.nn.sigmoid(2.0 + normal(keys[4], (B, time, H)))}
  if use_momentum:
    args["momentum"] = jax.nn.sigmoid(normal(keys[5], (B, time, H)))
  if objective == "huber":
    args["delta"] = 0.2 + jax.nn.softplus(normal(keys[6], (B, time, H)))
  # Clipping at 1.5 binds on some tokens of these inputs (gradient norms ~0.3–4).
  options = dict(init_memory=_init_memory(memory, seed + 1, dtype), objective=objective,
                 retention=retention, max_grad_norm=None if variant == "titans_linear" else 1.5)
  return args, options


def _reference(args, options, chunk, segment_ids):
  """Token by token, one (row, head) at a time (module docstring)."""
  objective, retention = options["objective"], options["retention"]
  clip = options.get("max_grad_norm")

  @jax.jit
  def grad(w, k, v, d):
    g = jax.grad(nm.attentional_bias)(w, k, v, d, objective)
    if clip is None:
      return g
    norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in g.values()))
    return {n: x * jnp.minimum(1.0, clip / norm) for n, x in g.items()}

  phi = lambda a: nm.retention_map(a, retention)
  args = jax.tree_util.tree_map(np.asarray, args)
  ys = np.zeros(args["v"].shape, np.float64)
  for b in range(B):
    for h in range(H):
      position = 0
      for t in range(args["q"].shape[1]):
        if t > 0 and segment_ids is not None and segment_ids[b, t] != segment_ids[b, t - 1]:
          position = 0
        if position == 0:
          acc = {n: w[h] for n, w in options["init_memory"].items()}
          mom = jax.tree_util.tree_map(jnp.zeros_like, acc)
        if position % chunk == 0:
          grad_mem = phi(acc)
        delta = args["delta"][b, t, h] if "delta" in args else 1.0
        g = grad(grad_mem, args["k"][b, t, h], args["v"][b, t, h], delta)
        eta = args["momentum"][b, t, h] if "momentum" in args else 0.0
        mom = jax.tree_util.tree_map(lambda s, g_: eta * s - args["lr"][b, t, h] * g_, mom, g)
        acc = jax.tree_util.tree_map(lambda a, s: args["retain"][b, t, h] * a + s, acc, mom)
        ys[b, t, h] = nm.memory_apply(phi(acc), args["q"][b, t, h])
        position += 1
  return ys


_SEGMENTS = np.array([[0] * 7 + [1] * 3 + [2] * 9, [5] * 19], np.int32)


@functools.lru_cache(maxsize=None)
def _op(variant, chunk):
  _, options = _inputs(variant)
  static = {n: o for n, o in options.items() if n != "init_memory"}
  return jax.jit(functools.partial(nm.neural_memory, chunk_size=chunk, **static))


def _run(variant, chunk, args, options, **kwargs):
  return _op(variant, chunk)(**args, init_memory=options["init_memory"], **kwargs)


# Every variant chunked; the recurrent form (C = 1) for one of each read path
# (the dual form of decay retention, and the per-token memories of ℓq / KL).
@pytest.mark.parametrize("variant, chunk", [(v, 4) for v in sorted(VARIANTS)]
                         + [("titans_mlp", 1), ("yaad", 1), ("memora", 1)])
def test_chunked_form_equals_the_token_by_token_reference_on_packed_rows(variant, chunk):
  with jax.enable_x64(True):
    args, options = _inputs(variant, seed=3, dtype=jnp.float64)
    y, _ = _run(variant, chunk, args, options, segment_ids=jnp.asarray(_SEGMENTS))
    assert y.dtype == jnp.float64
    assert_close(y, _reference(args, options, chunk, _SEGMENTS), TOL, f"{variant} C={chunk}")


@pytest.mark.parametrize("variant", ["titans_mlp", "moneta"])
def test_pieces_with_carried_state_equal_one_call(variant):
  """Pieces start and end inside chunks (lengths 5 and 1 against C = 4); float32, 2e-5."""
  args, options = _inputs(variant, seed=4)
  y_full, state_full = _run(variant, 4, args, options)
  state, ys, start = None, [], 0
  for length in [5, 1, 1, 5, 1, 5, 1]:
    piece = jax.tree_util.tree_map(lambda a: a[:, start:start + length], args)
    y, state = _run(variant, 4, piece, options, initial_state=state)
    ys.append(y)
    start += length
  assert start == T
  assert_close(jnp.concatenate(ys, 1), y_full, 2e-5, "pieces y")
  assert_close(state, state_full, 2e-5, "pieces state")


def test_chunk_size_changes_the_result_only_through_the_gradient_memory():
  """C = 4 differs from C = 1 (gradients at the chunk start), on the same inputs."""
  args, options = _inputs("titans_linear", seed=5)
  y1, _ = _run("titans_linear", 1, args, options)
  y4, _ = _run("titans_linear", 4, args, options)
  np.testing.assert_allclose(y1[:, :1], y4[:, :1], rtol=1e-6, atol=1e-7)   # token 0: same G
  assert float(jnp.max(jnp.abs(y1 - y4))) > 1e-3


# One per read path in `make test`; Moneta's and Yaad's biases in `make test-slow`.
@pytest.mark.parametrize("variant", ["titans_mlp", "memora",
                                     pytest.param("moneta", marks=pytest.mark.slow),
                                     pytest.param("yaad", marks=pytest.mark.slow)])
def test_gradients_match_central_differences_in_float64(variant):
  with jax.enable_x64(True):
    args, options = _inputs(variant, seed=6, time=7, dtype=jnp.float64)
    probe = jax.random.normal(jax.random.key(8), args["v"].shape, jnp.float64)
    static = {n: o for n, o in options.items() if n != "init_memory"}

    @jax.jit
    def loss(args, init_memory):
      y, state = nm.neural_memory(**args, init_memory=init_memory, chunk_size=3, **static)
      return jnp.sum(y * probe) + 0.1 * sum(jnp.sum(w) for w in state["memory"].values())

    grads = jax.grad(loss, argnums=(0, 1))(args, options["init_memory"])
    rng = np.random.default_rng(0)
    eps = 1e-6
    for tree, grad_tree, which in ((args, grads[0], 0), (options["init_memory"], grads[1], 1)):
      for name in sorted(tree):
        flat = np.asarray(tree[name]).ravel()
        for i in rng.choice(flat.size, 2, replace=False):
          def shifted(sign):
            new = dict(tree)
            step = np.zeros_like(flat)
            step[i] = sign * eps
            new[name] = jnp.asarray((flat + step).reshape(tree[name].shape))
            return (new, options["init_memory"]) if which == 0 else (args, new)
          numeric = (loss(*shifted(1)) - loss(*shifted(-1))) / (2 * eps)
          analytic = np.asarray(grad_tree[name]).ravel()[i]
          np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8,
                                     err_msg=f"{variant} d/d{name}[{i}]")


def test_bad_arguments_raise_one_clear_line():
  args, options = _inputs("yaad")
  with pytest.raises(ValueError, match="objective='l1'; expected one of l2, lp, huber"):
    nm.neural_memory(**args, **dict(options, objective="l1"))
  args.pop("delta")
  with pytest.raises(ValueError, match="needs delta"):
    nm.neural_memory(**args, **options)
  with pytest.raises(ValueError, match=r"lr has shape \[2, 18, 2\]"):
    nm.neural_memory(**dict(args, lr=args["lr"][:, 1:]), **dict(options, objective="l2"))
