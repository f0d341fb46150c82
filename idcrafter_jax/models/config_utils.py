"""Frozen config dataclasses from plain dicts (run-config sections, checkpoint config.json files)."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping


def from_dict(cls, d: Mapping[str, Any], *, what: str, ignored: Iterable[str] = (),
              error: type[Exception] = ValueError):
  """`cls(**d)` with lists turned into tuples (frozen, hashable fields) and the keys in `ignored`
  dropped; any other key that is not a field of `cls` raises `error` naming it."""
  names = {f.name for f in dataclasses.fields(cls)}
  allowed = names | set(ignored)
  unknown = sorted(set(d) - allowed)
  if unknown:
    raise error(f"unknown {what} config keys {unknown}; expected a subset of {sorted(allowed)}.")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})
