"""One place to choose how a recurrence runs.

Each op owns a :class:`Registry` of equivalent implementations. A call names
one (``impl="chunked"``) or asks for ``impl="auto"``, which walks the op's
preference list for the current backend and takes the first implementation
whose ``supports`` predicate accepts the call. The preference lists are
measurements, not guesses: see ``experiments/op_bench.py`` and BUILD.md.

Dispatch fails closed: an implementation that does not support a call is
never picked by ``auto``, and naming it explicitly raises.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax


def _always(**call: Any) -> bool:
  del call
  return True


def kernel_predicate(supports: Callable[..., bool]) -> Callable[..., bool]:
  """A Pallas kernel's ``supports`` as the registry uses it.

  On CPU an explicit ``impl="pallas"`` runs the kernel's GPU blocks in
  interpret mode (slow: for tests), so the call is checked against the GPU
  layout there. ``auto`` never reaches it on CPU: no CPU preference list
  names ``"pallas"``.
  """
  def predicate(*, backend: str, **call: Any) -> bool:
    return supports(backend="gpu" if backend == "cpu" else backend, **call)
  return predicate


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to run an op; ``supports(backend=..., **call)`` says whether
  it computes this call correctly."""
  name: str
  fn: Callable[..., Any]
  supports: Callable[..., bool] = _always


class Registry:
  """The implementations of one op and the order ``auto`` tries them in."""

  def __init__(self, op_name: str, auto_order: Mapping[str, Sequence[str]]):
    self.op_name = op_name
    self._impls: dict[str, Implementation] = {}
    self._auto_order = {k: tuple(v) for k, v in auto_order.items()}

  def register(self, name: str, fn: Callable[..., Any],
               supports: Callable[..., bool] = _always) -> None:
    self._impls[name] = Implementation(name, fn, supports)

  def set_auto_order(self, backend: str, order: Sequence[str]) -> None:
    self._auto_order[backend] = tuple(order)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self._impls)

  def auto_order(self, backend: str | None = None) -> tuple[str, ...]:
    backend = backend or jax.default_backend()
    return self._auto_order.get(backend, self._auto_order["default"])

  def resolve(self, impl: str, **call: Any) -> Implementation:
    """Returns the implementation to run for ``call`` (keyword description)."""
    backend = jax.default_backend()
    if impl == "auto":
      for name in self.auto_order(backend):
        candidate = self._impls.get(name)
        if candidate is not None and candidate.supports(backend=backend, **call):
          return candidate
      raise ValueError(
          f"{self.op_name}: no implementation supports this call on backend "
          f"{backend!r} (tried {self.auto_order(backend)}); call={call}")
    if impl not in self._impls:
      raise ValueError(
          f"{self.op_name}: impl={impl!r} is not one of "
          f"{('auto',) + self.names}")
    chosen = self._impls[impl]
    if not chosen.supports(backend=backend, **call):
      raise ValueError(
          f"{self.op_name}: impl={impl!r} does not support this call on "
          f"backend {backend!r}; call={call}")
    return chosen
