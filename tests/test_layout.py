"""The package's imports point one way (DESIGN.md, "One direction of dependency") and form no cycle.

kernels <- (sharding, distributed, weights, video) <- attention <- models <- sampling <- inference
<- data <- training <- rl <- (aot, eval, config / validation) <- launch.
Each library module is given its layer below; a module may import its own layer or lower ones,
never a higher one, and nothing in the library imports `configs/` or `launch/`. Imports inside
functions count too: a lazy import is still a dependency.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (layer, module prefixes), lowest first. A module belongs to the longest prefix that matches it.
LAYERS = (
    (0, ("idcrafter_jax.kernels",)),
    (1, ("idcrafter_jax.sharding", "idcrafter_jax.distributed", "idcrafter_jax.host_watch", "idcrafter_jax.memory",
         "idcrafter_jax.weights", "idcrafter_jax.video")),
    (2, ("idcrafter_jax.attention",)),
    (3, ("idcrafter_jax.models", "idcrafter_jax.convert")),
    (4, ("idcrafter_jax.sampling",)),
    (5, ("idcrafter_jax.inference",)),
    (6, ("idcrafter_jax.data",)),
    (7, ("idcrafter_jax.training",)),
    (8, ("idcrafter_jax.rl",)),
    (9, ("idcrafter_jax.aot", "idcrafter_jax.eval", "idcrafter_jax.config", "idcrafter_jax.validation")),
)


def layer_of(module: str) -> int:
  if module == "idcrafter_jax":  # the package root imports nothing
    return 0
  best = None
  for layer, prefixes in LAYERS:
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
        best = (layer, p)
  if best is None:
    raise AssertionError(f"module {module} has no layer in tests/test_layout.py: give it one.")
  return best[0]


def library_modules() -> dict[str, pathlib.Path]:
  out = {}
  for pkg in ("idcrafter_jax",):
    for path in (ROOT / pkg).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      out[name] = path
  return out


def imports_of(path: pathlib.Path, module: str, known: set[str]) -> set[str]:
  """Library modules `path` imports (`from pkg import mod` resolves to pkg.mod where that is a module)."""
  found = set()
  is_pkg = path.name == "__init__.py"
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".") if is_pkg else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    for n in names:
      if n.split(".")[0] in ("configs", "launch"):
        found.add(n)
      while n and n not in known:
        n = n.rpartition(".")[0]
      if n and n != module:
        found.add(n)
  return found


def import_graph() -> dict[str, set[str]]:
  mods = library_modules()
  return {m: imports_of(p, m, set(mods)) for m, p in mods.items()}


def test_every_library_module_has_a_layer():
  for m in library_modules():
    layer_of(m)


def test_no_library_module_imports_a_higher_layer_or_configs_or_launch():
  upward = []
  for m, deps in sorted(import_graph().items()):
    for d in sorted(deps):
      if d.split(".")[0] in ("configs", "launch"):
        upward.append(f"{m} imports {d} (the library never imports configs/ or launch/)")
      elif layer_of(d) > layer_of(m):
        upward.append(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})")
  assert not upward, "imports that point upward:\n" + "\n".join(upward)


def test_library_imports_form_no_cycle():
  graph = import_graph()
  # only the edges between modules: a package's __init__ importing its own submodules is no cycle
  edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(edges.get(m, ())):
      if state.get(d) == "open":
        cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(edges):
    if m not in state:
      visit(m)
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("upward", [("idcrafter_jax.models.wan_dit", "idcrafter_jax.training.sft"),
                                    ("idcrafter_jax.kernels.ring_attention", "idcrafter_jax.attention")])
def test_the_layer_check_sees_an_upward_import(upward):
  low, high = upward
  assert layer_of(high) > layer_of(low)
