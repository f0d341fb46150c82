"""Counts XLA compiles by program name (tests/test_compile_once.py, tests/multihost.py)."""
import collections
import logging
import re


class CompileCounter(logging.Handler):
  """Counts XLA compiles by program name (`jit(step)`) while entered: each is one call that had to
  build an executable, whether the backend compiled it or the persistent cache supplied it; a
  call that reuses an executable in memory counts nothing."""

  PATTERN = re.compile(r"Finished XLA compilation of (\S+) in ")

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.counts = collections.Counter()

  def emit(self, record):
    m = self.PATTERN.match(record.getMessage())
    if m:
      self.counts[m.group(1)] += 1

  def __enter__(self):
    import jax
    self._logs = jax.log_compiles(True)
    self._logs.__enter__()
    logging.getLogger("jax").addHandler(self)
    return self.counts

  def __exit__(self, *exc):
    logging.getLogger("jax").removeHandler(self)
    return self._logs.__exit__(*exc)
