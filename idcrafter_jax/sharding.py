"""Device meshes and the one table that maps logical axis names onto mesh axes.

Models name axes logically (`nn.with_logical_partitioning(init, ('embed', 'mlp'))`,
`nn.with_logical_constraint(x, ('activation_batch', 'activation_length', 'activation_embed'))`);
this file owns the mesh axes (`MESH_AXES`, `BATCH_AXES`) and the rules table; library code above
it never names a mesh axis (the kernels below it take a mesh and read the same names).
"""
from __future__ import annotations

import contextlib
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes a batch is split over (`batch_sharding`)
# An entry of the run config's `mesh` section: the axis size, or -1 for the devices left.
MESH_DIM = ((lambda v: isinstance(v, int) and not isinstance(v, bool) and (v == -1 or v >= 1)),
            "an integer >= 1, or -1 (the remaining devices)")

# (logical name, mesh axis or axes). Params are FSDP-sharded on their model dimension over
# 'fsdp' and 'sequence' (as MaxText does: chips that split a sample's tokens still split the
# weights, so sequence parallelism does not cost parameter sharding) and tensor-parallel on
# heads / MLP; activations are data+fsdp parallel on batch and sequence-parallel on tokens.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", ("fsdp", "sequence")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", None),
    ("text_embed", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_kv_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
)


def _problem(key: str, value, expected: str) -> str:
  # `models.config_utils.problem`'s line (this module sits below models/)
  return f"{key}={value!r}: expected {expected}."


def mesh_problems(shape: Mapping, devices: int | None = None, prefix: str = "mesh.") -> list[str]:
  """Every problem of a mesh shape ({axis: size}, the run config's `mesh` section; a missing axis
  is 1), one line each: bad sizes, more than one -1, a shape that does not fit `devices` (when
  given: a -1 axis must divide them, an explicit shape may use the first of them)."""
  dims = {a: shape.get(a, 1) for a in MESH_AXES}
  out = [_problem(f"{prefix}{a}", v, MESH_DIM[1]) for a, v in dims.items() if not MESH_DIM[0](v)]
  if out:
    return out
  section = prefix.rstrip(".") or "mesh"
  if list(dims.values()).count(-1) > 1:
    return [_problem(section, dims, "at most one axis -1")]
  rest = math.prod(d for d in dims.values() if d != -1)
  if devices is not None and ((-1 in dims.values() and devices % rest) or (-1 not in dims.values() and rest > devices)):
    return [_problem(section, dims, f"a shape that fits the {devices} devices")]
  return []


def batch_shards(shape: Mapping, devices: int | None) -> int | None:
  """How many ways a batch is split (the product of `BATCH_AXES`) on the mesh of `shape` over
  `devices` devices; None when not known (a -1 axis and no device count, or a bad shape)."""
  if mesh_problems(shape, devices):
    return None
  dims = {a: shape.get(a, 1) for a in MESH_AXES}
  if -1 in dims.values():
    if devices is None:
      return None
    axis = next(a for a, d in dims.items() if d == -1)
    dims[axis] = devices // math.prod(d for d in dims.values() if d != -1)
  return math.prod(dims[a] for a in BATCH_AXES)


def batch_shards_text(ways: int) -> str:
  """'the mesh's N batch shards (mesh.data x mesh.fsdp)', for the batch rules' problem lines."""
  return f"the mesh's {ways} batch shards ({' x '.join(f'mesh.{a}' for a in BATCH_AXES)})"


def make_mesh(shape: dict | Sequence[int] | None = None, devices=None) -> Mesh:
  """A mesh over ('data', 'fsdp', 'sequence', 'tensor'); one entry may be -1 (all the rest).

  A fully explicit shape smaller than the device count uses the first devices (e.g. the tiny
  config's 1-device mesh on a host with 8).
  """
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    shape = {"data": -1}
  if isinstance(shape, dict):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh axes {sorted(unknown)} are unknown; expected a subset of {MESH_AXES}.")
    dims = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    dims = [int(x) for x in shape]
    if len(dims) != len(MESH_AXES):
      raise ValueError(f"mesh shape {dims} must have {len(MESH_AXES)} entries {MESH_AXES}.")
  problems = mesh_problems(dict(zip(MESH_AXES, dims)), len(devices))
  if problems:
    raise ValueError("; ".join(problems))
  if -1 in dims:
    dims[dims.index(-1)] = len(devices) // math.prod(d for d in dims if d != -1)
  else:
    devices = devices[:math.prod(dims)]  # an explicit smaller mesh uses the first devices
  return Mesh(np.asarray(devices, dtype=object).reshape(dims), MESH_AXES)


def logical_to_mesh_sharding(logical_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """A tree of PartitionSpecs in logical names -> a tree of NamedShardings on `mesh`."""
  specs = nn.logical_to_mesh(logical_tree, rules)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def param_shardings(abstract_variables, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree returned by `jax.eval_shape(model.init, ...)` (boxed, logical)."""
  logical = nn.get_partition_spec(abstract_variables)
  return logical_to_mesh_sharding(logical, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
  """The batch axis (`axis`, default the leading one) over ('data', 'fsdp'), the rest replicated."""
  spec = [None] * ndim
  spec[axis] = BATCH_AXES
  return NamedSharding(mesh, P(*spec))


def fit_shardings(shardings, expected):
  """Drops the mesh axes a dimension does not divide evenly (that dimension is replicated).

  E.g. the Qwen2.5-VL 7B vision MLP width 3420 over tensor=8, or 4 kv heads over tensor=8: the
  rules table stays one for all sizes, and such a param is replicated on that axis instead of
  failing to place.
  """
  def fit(s, leaf):
    if not isinstance(s, NamedSharding):
      return s
    spec = []
    for i, axes in enumerate(tuple(s.spec) + (None,) * (len(leaf.shape) - len(s.spec))):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = int(np.prod([s.mesh.shape[a] for a in names])) if names else 1
      spec.append(axes if leaf.shape[i] % size == 0 else None)
    return NamedSharding(s.mesh, P(*spec))
  return jax.tree_util.tree_map(fit, shardings, expected)


@contextlib.contextmanager
def with_mesh_rules(mesh: Mesh):
  """Context: the mesh and the logical-axis rules, under which models trace their constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield
