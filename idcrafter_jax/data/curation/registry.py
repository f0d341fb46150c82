"""Named backend factories (detectors, captioners, image editors), one `Registry` per kind.

A factory is registered under a name and called in each worker that needs the backend (backends
such as models are built where they run, not pickled). Registering a name again replaces it.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """name -> factory, for the config setting `setting` (e.g. 'subjects.detector').

  `hint` names the public register function, quoted in the error for an unknown name.
  """

  def __init__(self, setting: str, hint: str):
    self.setting, self.hint = setting, hint
    self._factories: dict[str, Callable[..., T]] = {}

  def register(self, name: str, factory: Callable[..., T] | None = None):
    """`register(name, factory)`, or `@register(name)` over the factory."""
    if factory is not None:
      self._factories[name] = factory
      return factory
    return lambda fn: self.register(name, fn)

  def names(self) -> list[str]:
    return sorted(self._factories)

  def __contains__(self, name: str) -> bool:
    return name in self._factories

  def check(self, name: str) -> None:
    """Raises ValueError naming `name` and the registered names unless `name` is registered."""
    if name not in self._factories:
      raise ValueError(f"{self.setting} = {name!r} is not registered; registered: {self.names()} "
                       f"(register one with {self.hint}(name, factory)).")

  def make(self, name: str, **kwargs) -> T:
    """The backend `name`, built with `factory(**kwargs)`."""
    self.check(name)
    return self._factories[name](**kwargs)
