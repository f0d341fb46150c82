"""What every dry run shares: the batch size (`Shape`), the target devices, the result of one
compiled candidate (`Result`, a `report.CompileReport` plus what was compiled and the FLOP
figures), setting a program up on a mesh and compiling it, and the candidate meshes of a search.

Model FLOPs come from `idcrafter.forward_flops` (rematerialisation not counted, as MFU is usually
defined). XLA's `cost_analysis()` counts the body of a scanned layer stack once; the compiler's
time estimate (`optimal_seconds`, TPU only) costs that same program, so it is scaled to the whole
step by the ratio of model to counted FLOPs (`scaled_seconds`), and the implied MFU is the step's
model FLOPs at peak over that time: an upper bound, rematerialised FLOPs not being in the scale.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from idcrafter_jax import sharding
from idcrafter_jax.aot import report, tpu
from idcrafter_jax.inference import loading
from idcrafter_jax.models.wan_dit import WAN_VARIANTS
from idcrafter_jax.models import idcrafter, wan_vae
from idcrafter_jax.sampling import config as sampling_config


@dataclasses.dataclass(frozen=True)
class Shape:
  """The per-sample size of a batch, in pixels (video, subject images) and tokens (text)."""
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
    frames_ok, frames = sampling_config.FRAMES
    if not frames_ok(self.frames):
      raise ValueError(f"frames {self.frames} must be {frames}.")
    pixels_ok, pixels = sampling_config.PIXELS
    for name in ("height", "width", "subject_height", "subject_width"):
      v = getattr(self, name)
      if not pixels_ok(v):
        raise ValueError(f"{name} {v} must be {pixels}.")
    if self.text_len < 1:
      raise ValueError(f"text_len {self.text_len} must be >= 1.")
    if self.num_subjects < 1:
      raise ValueError(f"num_subjects {self.num_subjects} must be >= 1.")

  @property
  def latent_shape(self) -> tuple[int, int, int, int, int]:
    return sampling_config.latent_shape(self.batch, self.frames, self.height, self.width)

  @property
  def subject_grid(self) -> tuple[int, int]:
    return self.subject_height // wan_vae.SPACE_STRIDE, self.subject_width // wan_vae.SPACE_STRIDE

  def tokens(self, patch=(1, 2, 2)) -> int:
    """Video tokens per sample after the DiT's patch embedding."""
    _, f, h, w, _ = self.latent_shape
    return (f // patch[0]) * (h // patch[1]) * (w // patch[2])

  def subject_tokens(self) -> int:
    h, w = self.subject_grid
    return (h // 2) * (w // 2)


def shape_from_config(config, *, batch: int, frames: int | None = None, height: int | None = None,
                      width: int | None = None, text_len: int | None = None,
                      num_subjects: int | None = None) -> Shape:
  """Defaults from the config: `sampling.{num_frames,height,width}`, `subjects.{height,width}`,
  `model.max_subjects` subjects (the most a batch can carry), `vlm.text_length` text tokens
  (512 when unset)."""
  s = config.sampling
  return Shape(batch=batch, frames=frames or s.num_frames, height=height or s.height, width=width or s.width,
               text_len=text_len or config.vlm.get("text_length") or 512, num_subjects=num_subjects or config.model.max_subjects,
               subject_height=config.subjects.height, subject_width=config.subjects.width)


def variant_name(config) -> str:
  """The `wan_dit.WAN_VARIANTS` name whose sizes `config.model` has ('14B'), else 'NL/Dd'."""
  m = config.model
  for name, v in WAN_VARIANTS.items():
    if all(m[k] == x for k, x in v.items()):
      return name
  return f"{m.num_layers}L/{m.num_heads * m.head_dim}d"


def target_devices(topology: str | None = None, cpu_devices: int | None = None):
  """(devices, chip or None, label): the chips of a TPU topology (AOT, libtpu) or the first N CPU devices."""
  if (topology is None) == (cpu_devices is None):
    raise ValueError(f"give exactly one of topology ({topology!r}) and cpu_devices ({cpu_devices!r}).")
  if topology is not None:
    chip, _ = tpu.parse_topology(topology)
    return tpu.topology_devices(topology), chip, topology
  cpus = jax.devices("cpu")
  if cpu_devices < 1 or cpu_devices > len(cpus):
    raise ValueError(f"cpu_devices={cpu_devices} but this process has {len(cpus)} CPU devices; set "
                     "jax.config.update('jax_num_cpu_devices', N) (or XLA_FLAGS="
                     "--xla_force_host_platform_device_count=N) before JAX starts.")
  return cpus[:cpu_devices], None, f"cpu:{cpu_devices}"


@dataclasses.dataclass(kw_only=True)
class Result(report.CompileReport):
  """One compiled (or failed) candidate: its CompileReport (bytes per chip, XLA's FLOPs per chip
  with scanned bodies once), what was compiled, and the model FLOPs per step over all chips."""
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
  hbm_bytes: int | None = None
  analytic_flops: float = math.nan
  compile_seconds: float = math.nan
  error: str | None = None
  error_detail: str | None = None  # the compiler's full message (e.g. its list of the largest buffers)
  program: str = "sft_step"  # or 'sft_state', 'grpo_rollout', 'grpo_update' (`grpo_dryrun.py`), 'generate'
  resident_bytes: int = 0  # per chip: params of other networks that stay in HBM meanwhile

  @property
  def peak_bytes(self) -> int:
    """The program's peak (`CompileReport.peak_bytes`) plus the resident networks' params."""
    return super().peak_bytes + self.resident_bytes

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
    return self.analytic_flops / (self.num_devices * tpu.TPU_CHIPS[self.chip]["bf16_flops"])

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

  def head(self) -> str:
    """What was compiled, on what: the start of `row()`."""
    mesh = "x".join(str(self.mesh[a]) for a in sharding.MESH_AXES)
    prog = "" if self.program == "sft_step" else f"{self.program} "
    return (f"{prog}{self.variant} {self.frames}x{self.height}x{self.width} B={self.batch} on {self.target} "
            f"mesh(d,f,s,t)={mesh} remat={self.remat_policy} attn={self.attention_impl}")

  def row(self) -> str:
    """One line: per-chip memory against the chip's HBM, FLOPs, the compiler's estimate, implied MFU."""
    if self.error is not None:
      return f"{self.head()}: FAILED ({self.error})"
    g = lambda b: f"{b / tpu.GiB:.1f}"
    cap = "" if self.hbm_bytes is None else f" / {g(self.hbm_bytes)}"
    verdict = {True: "FITS", False: "DOES NOT FIT", None: "n/a (CPU)"}[self.fits]
    est = "n/a" if self.estimated_seconds is None else f"{self.estimated_seconds:.3g} s"
    if self.scaled_seconds is not None:
      est += f" (bodies once; {self.scaled_seconds:.3g} s scaled to the step)"
    mfu = "n/a" if self.mfu is None else f"{self.mfu:.0%}"
    at_peak = "" if self.seconds_at_peak is None else f", {self.seconds_at_peak:.3g} s at peak"
    return (f"{self.head()}: per chip args {g(self.argument_bytes)} + out {g(self.output_bytes)} - alias "
            f"{g(self.alias_bytes)} + temp {g(self.temp_bytes)}"
            + (f" + resident {g(self.resident_bytes)}" if self.resident_bytes else "")
            + f" = peak {g(self.peak_bytes)}{cap} GiB "
            f"(host temp {g(self.host_temp_bytes)} GiB): {verdict}; model FLOPs/step "
            f"{self.analytic_flops / 1e15:.3g} PFLOP (analytic){at_peak}; XLA "
            f"{self.xla_flops_per_chip / 1e12:.3g} TFLOP/chip (scan body once); compiler estimate {est}; "
            f"implied MFU {mfu}; compiled in {self.compile_seconds:.0f} s")


def check_split(config, shape: Shape, mesh, *, batch: int, batch_name: str = "batch"):
  """(mesh dims, model config, video tokens); raises ValueError when the batch, subjects, heads or
  tokens do not split over `mesh` or the model."""
  dims = dict(zip(sharding.MESH_AXES, mesh.devices.shape))
  ways = dims["data"] * dims["fsdp"]
  if batch % ways:
    raise ValueError(f"{batch_name} {batch} is not divisible by data x fsdp = {ways} of mesh {dims}.")
  mcfg = loading.idcrafter_config(config)
  if shape.num_subjects > mcfg.max_subjects:
    raise ValueError(f"num_subjects {shape.num_subjects} exceeds model.max_subjects={mcfg.max_subjects}.")
  if mcfg.wan.num_heads % dims["tensor"]:
    raise ValueError(f"{mcfg.wan.num_heads} heads do not split over tensor={dims['tensor']}.")
  tokens = shape.tokens(mcfg.wan.patch_size)
  if tokens % dims["sequence"]:
    raise ValueError(f"{tokens} video tokens do not split over sequence={dims['sequence']}.")
  return dims, mcfg, tokens


def setup_program(config, shape: Shape, devices, *, batch: int, program: str, chip: str | None = None,
                  target: str = "", variant: str = "", batch_name: str = "batch"):
  """(mesh, model config, module, Result) for compiling `program` on `batch` samples of `shape`
  over the mesh of `config.mesh`; raises ValueError, before anything is traced, when they do not
  split over it (`check_split`)."""
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  dims, mcfg, tokens = check_split(config, shape, mesh, batch=batch, batch_name=batch_name)
  result = Result(
      target=target or f"{len(devices)} devices", chip=chip, num_devices=len(devices), mesh=dims,
      remat_policy=mcfg.wan.remat_policy, attention_impl=mcfg.wan.attention_impl, variant=variant, params=0,
      batch=batch, frames=shape.frames, height=shape.height, width=shape.width, tokens=tokens,
      hbm_bytes=None if chip is None else int(tpu.TPU_CHIPS[chip]["hbm"]), program=program)
  return mesh, mcfg, idcrafter.IDCrafter(mcfg, mesh=mesh), result


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def condition_flops(mcfg: idcrafter.IDCrafterConfig, shape: Shape, batch: int) -> float:
  """The part of `model_flops` the exact per-condition cache computes once per condition
  (`idcrafter.condition_flops`)."""
  return idcrafter.condition_flops(mcfg, batch, shape.text_len, shape.num_subjects, shape.subject_tokens())


def model_flops(mcfg: idcrafter.IDCrafterConfig, shape: Shape, batch: int) -> float:
  """One forward of the model on `batch` samples of `shape` (`idcrafter.forward_flops`)."""
  latents = (batch,) + shape.latent_shape[1:]
  return idcrafter.forward_flops(mcfg, latents, shape.text_len, shape.num_subjects, shape.subject_tokens())


def with_shardings(tree, shardings):
  """Abstract arguments for `.lower()`: each leaf's shape and dtype with its sharding."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_into(result: Result, lower: Callable[[], Any]) -> Result:
  """`result` with the CompileReport of `lower().compile()`; compile errors (e.g. out of memory)
  go into `result.error` instead of being raised."""
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # noqa: BLE001 -- XLA reports OOM and unsupported programs as runtime errors
    return dataclasses.replace(result, compile_seconds=time.perf_counter() - start,
                               error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                               error_detail=str(e)[:20000])
  seconds = time.perf_counter() - start
  return dataclasses.replace(result, compile_seconds=seconds, **dataclasses.asdict(report.compile_report(compiled)))


def config_with(config, mesh: dict | None, remat_policy: str | None, attention_impl: str | None):
  """A resolved copy of `config` with another mesh, remat policy and / or attention impl."""
  c = config.copy_and_resolve_references()
  if mesh is not None:
    c.mesh.update(**{a: int(mesh.get(a, 1)) for a in sharding.MESH_AXES})
  if remat_policy is not None:
    c.model.remat_policy = remat_policy
  if attention_impl is not None:
    c.model.attention_impl = attention_impl
  return c


def candidate_meshes(num_devices: int, num_heads: int) -> list[dict]:
  """A few meshes worth trying: pure FSDP, FSDP x tensor 2 / 4, FSDP x sequence 2, FSDP x sequence 2 x tensor 2."""
  out = []
  for seq, ten in ((1, 1), (1, 2), (2, 1), (2, 2), (1, 4)):
    if num_devices % (seq * ten) or num_heads % ten:
      continue
    out.append(dict(data=1, fsdp=num_devices // (seq * ten), sequence=seq, tensor=ten))
  return out


def best_of(results: Sequence[Result]) -> Result | None:
  """The fitting result with the highest implied MFU where every fitting one has an estimate,
  else the one with the lowest peak memory; None if none fits."""
  ok = [r for r in results if r.fits or (r.fits is None and r.error is None)]
  if not ok:
    return None
  if all(r.mfu is not None for r in ok):
    return max(ok, key=lambda r: r.mfu)
  return min(ok, key=lambda r: r.peak_bytes)
