"""The one place config rules are written with: value rules, the problem line, strict dataclass
construction from plain dicts, and the registry of names a config setting may take.

A rule is (predicate, what is expected); predicates never raise. Each config section's rules
live beside the dataclass or module that owns the section, which returns its problems as lines
`f"{prefix}{key}={value!r}: expected {expected}."` (`problem`); `validation.py` gathers them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar

Rule = tuple[Callable[[Any], bool], str]
T = TypeVar("T")


# --------------------------------------------------------------------------- value rules


def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
  text = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" <= {hi}" if hi is not None else "")
  return (lambda v: is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)), text


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
  """A finite number in the interval; `lo_open` / `hi_open` exclude the ends."""
  parts = [f"{'>' if lo_open else '>='} {lo}" if lo is not None else "",
           f"{'<' if hi_open else '<='} {hi}" if hi is not None else ""]
  text = "a finite number" + "".join(f" {p}" for p in parts if p).replace("  ", " ")

  def ok(v):
    if not is_num(v):
      return False
    if lo is not None and (v <= lo if lo_open else v < lo):
      return False
    return hi is None or (v < hi if hi_open else v <= hi)
  return ok, text


def one_of(options) -> Rule:
  return (lambda v: v in tuple(options)), f"one of {tuple(options)}"


def optional(rule: Rule) -> Rule:
  pred, text = rule
  return (lambda v: v is None or pred(v)), f"None or {text}"


def why(rule: Rule, reason: str) -> Rule:
  """`rule` with the reason for it appended to what is expected."""
  return rule[0], f"{rule[1]} ({reason})"


BOOL: Rule = ((lambda v: isinstance(v, bool)), "True or False")
STRING: Rule = ((lambda v: isinstance(v, str)), "a string")
NAME: Rule = ((lambda v: isinstance(v, str) and bool(v)), "a non-empty string")
PAIR: Rule = ((lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(is_num(x) for x in v) and v[0] < v[1]),
              "a pair (low, high) of finite numbers with low < high")


# --------------------------------------------------------------------------- problems


def problem(key: str, value: Any, expected: str, prefix: str = "") -> str:
  """The line naming one bad value: `{prefix}{key}={value!r}: expected {expected}.`"""
  return f"{prefix}{key}={value!r}: expected {expected}."


MISSING = object()  # a key a section lacks


def lookup(section: Mapping, key: str, default: Any = None) -> Any:
  """`section[a][b]` for a dotted key 'a.b' (`default` where a part is missing)."""
  node = section
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return default
    node = node[part]
  return node


def broken(section: Mapping, rules: Mapping[str, Rule]) -> list[tuple[str, Any, str]]:
  """(key, value, expected) of each key of `section` that is missing (value `MISSING`) or breaks
  its rule; dotted keys reach into subsections."""
  out = []
  for key, (pred, expected) in rules.items():
    value = lookup(section, key, MISSING)
    if value is MISSING or not pred(value):
      out.append((key, value, expected))
  return out


def rule_problems(section: Mapping, rules: Mapping[str, Rule], prefix: str = "") -> list[str]:
  """The keys of `section` that are missing or break their rule, one line each (`broken`)."""
  return [f"{prefix}{key} is missing: expected {expected}." if value is MISSING
          else problem(key, value, expected, prefix) for key, value, expected in broken(section, rules)]


def fields_of(obj) -> dict[str, Any]:
  """{field: value} of a dataclass instance (not copied, unlike `dataclasses.asdict`)."""
  return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def check(problems: Iterable[str], error: type[Exception] = ValueError) -> None:
  """Raises `error` listing `problems` ('; '-joined), if there are any."""
  problems = list(problems)
  if problems:
    raise error("; ".join(problems))


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


# --------------------------------------------------------------------------- registries


class Registry(Generic[T]):
  """name -> value for the config setting `setting` (e.g. 'subjects.detector'). A name is
  registered once: registering it again is an error (a silently replaced entry would change what
  a config means). `hint` names the public register function, quoted when a name is unknown."""

  def __init__(self, setting: str, hint: str):
    self.setting, self.hint = setting, hint
    self._entries: dict[str, T] = {}

  def register(self, name: str, value: T | None = None):
    """`register(name, value)`, or `@register(name)` over the value."""
    if value is None:
      return lambda v: self.register(name, v)
    if name in self._entries:
      raise ValueError(f"{self.setting} {name!r} is already registered; register each name once.")
    self._entries[name] = value
    return value

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)

  def check(self, name: str) -> None:
    """Raises ValueError naming `name` and the registered names unless `name` is registered."""
    if name not in self._entries:
      raise ValueError(f"{self.setting} = {name!r} is not registered; registered: {self.names()} "
                       f"(register one with {self.hint}).")

  def get(self, name: str) -> T:
    self.check(name)
    return self._entries[name]

  def make(self, name: str, **kwargs):
    """The registered factory `name`, called with `kwargs`."""
    return self.get(name)(**kwargs)
