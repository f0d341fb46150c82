"""AOT dry run of the real SFT train step: does a config fit a TPU slice, and how fast could it be?

As MaxText's `train_compile.py`: the train state is built abstractly (`jax.eval_shape`, nothing
allocated), the batch is a tree of `ShapeDtypeStruct`s at the config's resolution, and the step
that `sft.run` executes (`trainer.make_train_step` + `trainer.jit_train_step`, with the state and
batch shardings of `trainer.state_shardings` / `trainer.batch_shardings`) is lowered and compiled
for the devices of a TPU topology that is not there (`aot.topology_devices`, libtpu) or for N CPU
devices. The compiled program gives per-chip memory (arguments, outputs, temporaries; host memory
for offloaded remat) and the compiler's cost estimate.

FLOPs: `idcrafter.forward_flops` x 3 (forward + backward; model FLOPs, rematerialisation not
counted, as MFU is usually defined). XLA's `cost_analysis()` counts the body of a scanned layer
stack once, so its figure is printed next to the analytic one. The compiler's time estimate
(`optimal_seconds`, TPU only) costs the same program (bodies once); it is scaled to the whole step
by the ratio of analytic to counted FLOPs (`scaled_seconds`: the step at the rate the compiler
expects on what it counted), and the implied MFU is the step's model FLOPs at peak over that time.
Rematerialised FLOPs are not in the scale, so the MFU is an upper bound.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax import aot, sharding, trainer
from idcrafter_jax.config import WAN_VARIANTS
from idcrafter_jax.models import idcrafter

GiB = aot.GiB
VAE_TIME_STRIDE, VAE_SPACE_STRIDE = 4, 8  # Wan VAE: 1 + (T-1)/4 latent frames, 8x spatial


@dataclasses.dataclass(frozen=True)
class Shape:
  """The per-sample size of a train batch, in pixels (video, subject images) and tokens (text)."""
  batch: int
  frames: int
  height: int
  width: int
  text_len: int = 512
  num_subjects: int = 1
  subject_height: int = 480
  subject_width: int = 480

  def __post_init__(self):
    if self.batch < 1:
      raise ValueError(f"batch {self.batch} must be >= 1.")
    if self.frames < 1 or (self.frames - 1) % VAE_TIME_STRIDE:
      raise ValueError(f"frames {self.frames} must be 1 + 4k (the Wan VAE's temporal stride).")
    for name in ("height", "width", "subject_height", "subject_width"):
      v = getattr(self, name)
      if v < 16 or v % 16:
        raise ValueError(f"{name} {v} must be a positive multiple of 16 (VAE 8x, then 2x2 patches).")
    if self.text_len < 1:
      raise ValueError(f"text_len {self.text_len} must be >= 1.")
    if self.num_subjects < 1:
      raise ValueError(f"num_subjects {self.num_subjects} must be >= 1.")

  @property
  def latent_shape(self) -> tuple[int, int, int, int, int]:
    return (self.batch, 1 + (self.frames - 1) // VAE_TIME_STRIDE, self.height // VAE_SPACE_STRIDE,
            self.width // VAE_SPACE_STRIDE, 16)

  @property
  def subject_grid(self) -> tuple[int, int]:
    return self.subject_height // VAE_SPACE_STRIDE, self.subject_width // VAE_SPACE_STRIDE

  def tokens(self, patch=(1, 2, 2)) -> int:
    """Video tokens per sample after the DiT's patch embedding."""
    _, f, h, w, _ = self.latent_shape
    return (f // patch[0]) * (h // patch[1]) * (w // patch[2])

  def subject_tokens(self) -> int:
    h, w = self.subject_grid
    return (h // 2) * (w // 2)


def shape_from_config(config, *, batch: int, frames: int | None = None, height: int | None = None,
                      width: int | None = None, text_len: int = 512, num_subjects: int | None = None) -> Shape:
  """Defaults from the config: `sampling.{num_frames,height,width}`, `subjects.{height,width}`,
  `model.max_subjects` subjects (the most a batch can carry)."""
  s = config.sampling
  return Shape(batch=batch, frames=frames or s.num_frames, height=height or s.height, width=width or s.width,
               text_len=text_len, num_subjects=num_subjects or config.model.max_subjects,
               subject_height=config.subjects.height, subject_width=config.subjects.width)


def variant_name(config) -> str:
  """The `config.WAN_VARIANTS` name whose sizes `config.model` has ('14B'), else 'NL/Dd'."""
  m = config.model
  for name, v in WAN_VARIANTS.items():
    if all(m[k] == x for k, x in v.items()):
      return name
  return f"{m.num_layers}L/{m.num_heads * m.head_dim}d"


def abstract_batch(shape: Shape, text_dim: int, dtype=jnp.float32) -> dict:
  """`trainer.MODEL_INPUTS` as ShapeDtypeStructs: cached latents and VLM features, as `sft.run` feeds them."""
  b = shape.batch
  h, w = shape.subject_grid
  return {
      "latents": jax.ShapeDtypeStruct(shape.latent_shape, dtype),  # (B, 1+(T-1)/4, H/8, W/8, 16)
      "f_txt": jax.ShapeDtypeStruct((b, shape.text_len, text_dim), dtype),  # (B, L, 3584)
      "f_txt_mask": jax.ShapeDtypeStruct((b, shape.text_len), jnp.bool_),
      "subject_latents": jax.ShapeDtypeStruct((b, shape.num_subjects, 1, h, w, 16), dtype),  # (B, N, 1, h/8, w/8, 16)
      "subject_mask": jax.ShapeDtypeStruct((b, shape.num_subjects), jnp.bool_),
  }


def target_devices(topology: str | None = None, cpu_devices: int | None = None):
  """(devices, chip or None, label): the chips of a TPU topology (AOT, libtpu) or the first N CPU devices."""
  if (topology is None) == (cpu_devices is None):
    raise ValueError(f"give exactly one of topology ({topology!r}) and cpu_devices ({cpu_devices!r}).")
  if topology is not None:
    chip, _ = aot.parse_topology(topology)
    return list(aot.topology_devices(topology)), chip, topology
  cpus = jax.devices("cpu")
  if cpu_devices < 1 or cpu_devices > len(cpus):
    raise ValueError(f"cpu_devices={cpu_devices} but this process has {len(cpus)} CPU devices; set "
                     "jax.config.update('jax_num_cpu_devices', N) (or XLA_FLAGS="
                     "--xla_force_host_platform_device_count=N) before JAX starts.")
  return cpus[:cpu_devices], None, f"cpu:{cpu_devices}"


@dataclasses.dataclass
class Result:
  """One compiled (or failed) candidate. Bytes are per chip; FLOPs are per step over all chips
  (analytic) or per chip as XLA counts them (scanned bodies once)."""
  target: str
  chip: str | None
  num_devices: int
  mesh: dict
  remat_policy: str
  attention_impl: str
  variant: str
  params: int
  batch: int
  frames: int
  height: int
  width: int
  tokens: int
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  host_temp_bytes: int = 0
  hbm_bytes: int | None = None
  analytic_flops: float = math.nan
  xla_flops_per_chip: float = math.nan
  estimated_seconds: float | None = None
  compile_seconds: float = math.nan
  error: str | None = None
  error_detail: str | None = None  # the compiler's full message (e.g. its list of the largest buffers)
  program: str = "sft_step"  # or 'grpo_rollout', 'grpo_update' (`rl/dryrun.py`)
  resident_bytes: int = 0  # per chip: params of other networks that stay in HBM meanwhile

  @property
  def peak_bytes(self) -> int:
    """HBM the program needs on one chip: arguments + outputs - donated aliases + temps + code,
    plus the resident networks' params."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
            + self.resident_bytes)

  @property
  def fits(self) -> bool | None:
    if self.error is not None:
      return False
    return None if self.hbm_bytes is None else self.peak_bytes <= self.hbm_bytes

  @property
  def seconds_at_peak(self) -> float | None:
    """The step's model FLOPs at the chips' peak bf16 rate: a lower bound on the step time."""
    if self.chip is None:
      return None
    return self.analytic_flops / (self.num_devices * aot.TPU_CHIPS[self.chip]["bf16_flops"])

  @property
  def scaled_seconds(self) -> float | None:
    """The compiler's estimate scaled from the FLOPs it counted (scanned bodies once) to the step's
    model FLOPs per chip, at the same rate."""
    if self.estimated_seconds is None or not self.xla_flops_per_chip > 0:
      return None
    per_chip = self.analytic_flops / self.num_devices
    return self.estimated_seconds * max(1.0, per_chip / self.xla_flops_per_chip)

  @property
  def mfu(self) -> float | None:
    """Model FLOPs utilisation implied by the compiler's (scaled) time estimate; an upper bound."""
    if self.scaled_seconds is None or self.seconds_at_peak is None:
      return None
    return self.seconds_at_peak / self.scaled_seconds

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(peak_bytes=self.peak_bytes, fits=self.fits, seconds_at_peak=self.seconds_at_peak,
             scaled_seconds=self.scaled_seconds, mfu=self.mfu)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

  def row(self) -> str:
    g = lambda b: f"{b / GiB:.1f}"
    mesh = "x".join(str(self.mesh[a]) for a in sharding.MESH_AXES)
    prog = "" if self.program == "sft_step" else f"{self.program} "
    head = (f"{prog}{self.variant} {self.frames}x{self.height}x{self.width} B={self.batch} on {self.target} "
            f"mesh(d,f,s,t)={mesh} remat={self.remat_policy} attn={self.attention_impl}")
    if self.error is not None:
      return f"{head}: FAILED ({self.error})"
    cap = "" if self.hbm_bytes is None else f" / {g(self.hbm_bytes)}"
    verdict = {True: "FITS", False: "DOES NOT FIT", None: "n/a (CPU)"}[self.fits]
    est = "n/a" if self.estimated_seconds is None else f"{self.estimated_seconds:.3g} s"
    if self.scaled_seconds is not None:
      est += f" (bodies once; {self.scaled_seconds:.3g} s scaled to the step)"
    mfu = "n/a" if self.mfu is None else f"{self.mfu:.0%}"
    at_peak = "" if self.seconds_at_peak is None else f", {self.seconds_at_peak:.3g} s at peak"
    return (f"{head}: per chip args {g(self.argument_bytes)} + out {g(self.output_bytes)} - alias "
            f"{g(self.alias_bytes)} + temp {g(self.temp_bytes)}"
            + (f" + resident {g(self.resident_bytes)}" if self.resident_bytes else "")
            + f" = peak {g(self.peak_bytes)}{cap} GiB "
            f"(host temp {g(self.host_temp_bytes)} GiB): {verdict}; model FLOPs/step "
            f"{self.analytic_flops / 1e15:.3g} PFLOP (analytic){at_peak}; XLA "
            f"{self.xla_flops_per_chip / 1e12:.3g} TFLOP/chip (scan body once); compiler estimate {est}; "
            f"implied MFU {mfu}; compiled in {self.compile_seconds:.0f} s")


def _with(config, mesh: dict | None, remat_policy: str | None, attention_impl: str | None):
  c = config.copy_and_resolve_references()
  if mesh is not None:
    c.mesh.update(**{a: int(mesh.get(a, 1)) for a in sharding.MESH_AXES})
  if remat_policy is not None:
    c.model.remat_policy = remat_policy
  if attention_impl is not None:
    c.model.attention_impl = attention_impl
  return c


def abstract_train_state(config, module: idcrafter.IDCrafter, tx):
  """(boxed abstract params with logical axes, abstract TrainState): shapes only, nothing allocated."""
  boxed = jax.eval_shape(module.init, jax.random.key(0), *idcrafter.dummy_inputs(module.config))["params"]

  def init(params):
    return trainer.init_state(params, tx, jax.random.key(config.seed), ema=config.train.ema)
  return boxed, jax.eval_shape(init, nn.unbox(boxed))


def setup_program(config, shape: Shape, devices, *, batch: int, program: str, chip: str | None = None,
                  target: str = "", variant: str = "", batch_name: str = "batch"):
  """(mesh, model config, module, Result) for compiling `program` on `batch` samples of `shape`;
  raises ValueError, before anything is traced, when the batch, subjects, heads or tokens do not
  split over the mesh of `config.mesh`."""
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  dims = dict(zip(sharding.MESH_AXES, mesh.devices.shape))
  ways = dims["data"] * dims["fsdp"]
  if batch % ways:
    raise ValueError(f"{batch_name} {batch} is not divisible by data x fsdp = {ways} of mesh {dims}.")
  mcfg = idcrafter.IDCrafterConfig.from_config(config)
  if shape.num_subjects > mcfg.max_subjects:
    raise ValueError(f"num_subjects {shape.num_subjects} exceeds model.max_subjects={mcfg.max_subjects}.")
  if mcfg.wan.num_heads % dims["tensor"]:
    raise ValueError(f"{mcfg.wan.num_heads} heads do not split over tensor={dims['tensor']}.")
  tokens = shape.tokens(mcfg.wan.patch_size)
  if tokens % dims["sequence"]:
    raise ValueError(f"{tokens} video tokens do not split over sequence={dims['sequence']}.")
  result = Result(
      target=target or f"{len(devices)} devices", chip=chip, num_devices=len(devices), mesh=dims,
      remat_policy=mcfg.wan.remat_policy, attention_impl=mcfg.wan.attention_impl, variant=variant, params=0,
      batch=batch, frames=shape.frames, height=shape.height, width=shape.width, tokens=tokens,
      hbm_bytes=None if chip is None else int(aot.TPU_CHIPS[chip]["hbm"]), program=program)
  return mesh, mcfg, idcrafter.IDCrafter(mcfg, mesh=mesh), result


def compile_into(result: Result, lower: Callable[[], Any]) -> Result:
  """Compiles `lower()` and fills `result`; compile errors (e.g. out of memory) go into
  `result.error` instead of being raised."""
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # noqa: BLE001 -- XLA reports OOM and unsupported programs as runtime errors
    result.compile_seconds = time.perf_counter() - start
    result.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    result.error_detail = str(e)[:20000]
    return result
  result.compile_seconds = time.perf_counter() - start
  return read_compiled(result, compiled)


def compile_train_step(config, shape: Shape, devices, *, chip: str | None = None, target: str = "",
                       batch_dtype=jnp.float32, variant: str = "") -> Result:
  """Lowers and compiles `sft.run`'s train step for `config` (its `mesh`, `model.remat_policy`,
  `model.attention_impl`) over `devices`. Compile errors (e.g. out of memory) are returned in
  `Result.error`, not raised; bad configs raise before compiling."""
  mesh, mcfg, module, result = setup_program(config, shape, devices, batch=shape.batch, program="sft_step",
                                             chip=chip, target=target, variant=variant)
  tx = trainer.make_optimizer(config.train)
  boxed, state_abs = abstract_train_state(config, module, tx)
  result.params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(state_abs.params)))
  batch_abs = abstract_batch(shape, mcfg.wan.text_dim, batch_dtype)
  result.analytic_flops = 3 * idcrafter.forward_flops(mcfg, shape.latent_shape, shape.text_len, shape.num_subjects,
                                                      shape.subject_tokens())
  with trainer.with_mesh_rules(mesh):
    s_shard = trainer.state_shardings(state_abs, boxed, mesh)
    b_shard = trainer.batch_shardings(batch_abs, mesh)
    step = trainer.jit_train_step(trainer.make_train_step(module.apply, tx, config.train), s_shard, b_shard, mesh)
    return compile_into(result, lambda: step.lower(with_shardings(state_abs, s_shard),
                                                   with_shardings(batch_abs, b_shard)))


def with_shardings(tree, shardings):
  """Abstract arguments for `.lower()`: each leaf's shape and dtype with its sharding."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def read_compiled(result: Result, compiled) -> Result:
  """Fills `result`'s memory and cost fields from a compiled program."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  result.argument_bytes = int(mem.argument_size_in_bytes)
  result.output_bytes = int(mem.output_size_in_bytes)
  result.alias_bytes = int(mem.alias_size_in_bytes)
  result.temp_bytes = int(mem.temp_size_in_bytes)
  result.code_bytes = int(getattr(mem, "generated_code_size_in_bytes", 0))
  result.host_temp_bytes = int(getattr(mem, "host_temp_size_in_bytes", 0))
  result.xla_flops_per_chip = float(cost.get("flops", math.nan))
  est = cost.get("optimal_seconds")
  result.estimated_seconds = float(est) if est is not None and est > 0 else None
  return result


def candidate_meshes(num_devices: int, num_heads: int) -> list[dict]:
  """A few meshes worth trying: pure FSDP, FSDP x tensor 2 / 4, FSDP x sequence 2, FSDP x sequence 2 x tensor 2."""
  out = []
  for seq, ten in ((1, 1), (1, 2), (2, 1), (2, 2), (1, 4)):
    if num_devices % (seq * ten) or num_heads % ten:
      continue
    out.append(dict(data=1, fsdp=num_devices // (seq * ten), sequence=seq, tensor=ten))
  return out


def search(config, shape_fn, devices, *, chip=None, target="", variant="",
           meshes: Sequence[dict] | None = None, remat_policies: Sequence[str] = ("full", "offload_dots_no_batch"),
           attention_impls: Sequence[str] | None = None, log=print) -> tuple[Result | None, list[Result]]:
  """Compiles each (mesh, remat policy, attention impl) and returns (best that fits, all results).

  `shape_fn(mesh_dims) -> Shape` picks the batch for a mesh (e.g. one sample per batch shard).
  The best is the fitting candidate with the highest implied MFU (the compiler's estimate per
  sample) where an estimate exists, else the one with the lowest peak memory.
  """
  mcfg = idcrafter.IDCrafterConfig.from_config(config)
  meshes = list(meshes) if meshes is not None else candidate_meshes(len(devices), mcfg.wan.num_heads)
  if attention_impls is None:
    attention_impls = ("pallas",) if chip is not None else ("xla",)
  results = []
  for mesh, remat, impl in itertools.product(meshes, remat_policies, attention_impls):
    c = _with(config, mesh, remat, impl)
    try:
      shape = shape_fn(mesh)
      r = compile_train_step(c, shape, devices, chip=chip, target=target, variant=variant)
    except ValueError as e:
      log(f"skip mesh {mesh} remat={remat} attn={impl}: {e}")
      continue
    log(r.row())
    results.append(r)
  ok = [r for r in results if r.fits or (r.fits is None and r.error is None)]
  if not ok:
    return None, results
  if all(r.mfu is not None for r in ok):
    return max(ok, key=lambda r: r.mfu), results
  return min(ok, key=lambda r: r.peak_bytes), results
