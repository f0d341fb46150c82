r"""Qwen2.5-VL encoder: speed against transformers on the same weights, and the 7B memory dry-run.

  JAX_PLATFORMS=cpu python launch/bench/vlm.py                       # all sections
  JAX_PLATFORMS=cpu python launch/bench/vlm.py --sections=memory --mesh=fsdp=2,tensor=4

Sections:
  forward  jitted forward (vision tower + LLM, last hidden states) vs transformers
           `Qwen2_5_VLModel` (torch, sdpa, 2 threads), same weights, float32.
  memory   the 7B config (Qwen2.5-VL-7B-Instruct) in bfloat16 sharded over 8 simulated CPU
           devices: abstract params only (jax.eval_shape), per-device parameter bytes from the
           NamedShardings the loader uses, then the forward AOT-compiled on those devices for
           XLA's per-device memory estimate. Nothing of 7B size is allocated.
  tpu      the same 7B forward AOT-compiled for a TPU topology (needs libtpu).
Bench config (forward): LLM 4 layers, hidden 512 (8 q / 2 kv heads x 64), MLP 1536, vocab 8192;
ViT 4 layers, hidden 256 (4 heads x 64), MLP 512, full attention at blocks 1 and 3; batch 2,
two 224x224 images (2 x 256 patches, 2 x 64 image tokens) in sample 0, 256 tokens a sample.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from idcrafter_jax import convert, sharding  # noqa: E402
from idcrafter_jax.aot import report, tpu  # noqa: E402
from idcrafter_jax.models import qwen2_5_vl as qv  # noqa: E402
from idcrafter_jax.models.qwen2_5_vl import convert as vlm_convert  # noqa: E402

SECTIONS = flags.DEFINE_list("sections", ["forward", "memory", "tpu"], "Sections to run.")
REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median reported).")
THREADS = flags.DEFINE_integer("threads", 2, "torch threads (the CPU has 2 cores).")
MESH = flags.DEFINE_string("mesh", "fsdp=8", "Mesh for the memory section, e.g. 'fsdp=2,tensor=4'.")
TOKENS = flags.DEFINE_integer("tokens", 1024, "Sequence length of the memory / tpu sections.")
IMAGE = flags.DEFINE_integer("image", 448, "Side of the 2 subject images of the memory / tpu sections.")
TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology for the tpu section.")

IMG, VSTART, VEND = 8000, 7998, 7999


def median_time(fn, repeats):
  fn()  # warm-up (compile / allocator)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def make_reference(folder):
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12],
                                        "rope_theta": 1000000.0}),
      vision_config=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=512,
                         window_size=112, fullatt_block_indexes=[1, 3], patch_size=14),
      image_token_id=IMG, video_token_id=8001, vision_start_token_id=VSTART, vision_end_token_id=VEND,
      bos_token_id=None, eos_token_id=None)
  model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
  model.save_pretrained(folder)
  return model, sum(p.numel() for p in model.parameters())


def bench_inputs(rng, length=256):
  grid = np.array([[1, 16, 16], [1, 16, 16]])
  ids = rng.integers(0, 7990, (2, length))
  pos = 4
  for g in grid:
    n = int(np.prod(g)) // 4
    ids[0, pos] = VSTART
    ids[0, pos + 1:pos + 1 + n] = IMG
    ids[0, pos + 1 + n] = VEND
    pos += n + 6
  mask = np.ones((2, length), np.int64)
  mask[1, 200:] = 0
  pixels = rng.standard_normal((int(np.prod(grid, 1).sum()), 1176)).astype(np.float32)
  return ids, mask, pixels, grid


def bench_forward(repeats):
  import torch
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as folder:
    ref, n = make_reference(folder)
    vlm, params = convert.load_qwen2_5_vl(folder)
  ids, mask, pixels, grid = bench_inputs(rng)
  print(f"forward bench config: {n / 1e6:.1f}M params, batch 2 x {ids.shape[1]} tokens, "
        f"{len(grid)} images of {pixels.shape[0] // len(grid)} patches")
  t_args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))

  def torch_fwd():
    with torch.no_grad():
      return ref.model(**t_args).last_hidden_state

  fwd = jax.jit(lambda p, i, m, x: vlm.apply({"params": p}, i, m, x, grid))
  args = (params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))

  def jax_fwd():
    return fwd(*args).block_until_ready()

  err = float(np.abs(np.asarray(jax_fwd()) - torch_fwd().numpy())[mask.astype(bool)].max())
  t_torch = median_time(torch_fwd, repeats)
  t_jax = median_time(jax_fwd, repeats)
  print(f"forward: transformers {t_torch * 1e3:.1f} ms, jax {t_jax * 1e3:.1f} ms, "
        f"speed-up {t_torch / t_jax:.2f}x (max abs diff {err:.1e})")
  # The shared CPU's state in this run: a float32 1024^3 matmul on each side.
  a = rng.standard_normal((1024, 1024)).astype(np.float32)
  ta, ja = torch.tensor(a), jnp.asarray(a)
  mm = jax.jit(lambda x: x @ x)
  flops = 2 * 1024 ** 3
  print(f"calibration: float32 1024^3 matmul torch {flops / median_time(lambda: ta @ ta, repeats) / 1e9:.0f} "
        f"GFLOP/s, jax {flops / median_time(lambda: mm(ja).block_until_ready(), repeats) / 1e9:.0f} GFLOP/s")


def parse_mesh(spec: str) -> dict:
  try:
    return {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
  except ValueError:
    raise ValueError(f"--mesh {spec!r} is not of the form 'fsdp=2,tensor=4'.") from None


def abstract_7b(mesh):
  """7B module in bfloat16 and its abstract params with the loader's shardings on `mesh`."""
  module = qv.Qwen2_5_VL(qv.VARIANTS["7B"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  boxed = qv.abstract_params(module)
  unboxed = nn.unbox(boxed)
  shards = vlm_convert.fit_shardings(sharding.param_shardings(boxed, mesh), unboxed)
  params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  unboxed, shards)
  return module, params


def compile_forward(module, params, mesh, tokens, side):
  """AOT-compiles the forward for 1 sample: 2 subject images of side x side + `tokens` tokens."""
  cfg = module.cfg
  g = side // cfg.vision.patch_size
  grid = np.array([[1, g, g], [1, g, g]])
  n_img = int(np.prod(grid, 1).sum()) // cfg.vision.spatial_merge_size ** 2
  if n_img + 16 > tokens:
    raise ValueError(f"--tokens {tokens} is too short for 2 images of {side}px ({n_img} image tokens).")
  ids = np.zeros((1, tokens), np.int32)
  ids[0, 8:8 + n_img] = cfg.image_token_id
  ids = jnp.asarray(ids)  # concrete token ids are closed over; their values do not change the program
  rep = sharding.replicated(mesh)
  pixels = jax.ShapeDtypeStruct((int(np.prod(grid, 1).sum()), cfg.vision.patch_dim), jnp.bfloat16,
                                sharding=rep)
  mask = jax.ShapeDtypeStruct((1, tokens), jnp.int32, sharding=rep)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    start = time.perf_counter()
    compiled = jax.jit(lambda p, m, x: module.apply({"params": p}, ids, m, x, grid)).lower(
        params, mask, pixels).compile()
  return compiled, time.perf_counter() - start, n_img


def bench_memory(mesh_spec, tokens, side):
  mesh = sharding.make_mesh(parse_mesh(mesh_spec))
  module, params = abstract_7b(mesh)
  leaves = jax.tree_util.tree_leaves(params)
  total = sum(int(np.prod(x.shape)) for x in leaves)
  whole = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
  per_dev = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves)
  vis = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params["visual"]))
  gib = tpu.GiB
  print(f"memory: 7B config {total / 1e9:.3f}B params ({vis / 1e9:.3f}B vision), bfloat16 "
        f"{whole / gib:.2f} GiB whole; mesh {dict(mesh.shape)}: {per_dev / gib:.2f} GiB params per device")
  compiled, secs, n_img = compile_forward(module, params, mesh, tokens, side)
  r = report.compile_report(compiled)
  print(f"memory: 7B forward, 1 sample x {tokens} tokens with 2 images {side}px ({n_img} image tokens), "
        f"8 CPU devices: {r.row()} per device (XLA CPU estimate); compiled in {secs:.0f} s")


def bench_tpu(topology, tokens, side):
  if not tpu.have_libtpu():
    print("tpu: skipped (libtpu absent; pip install -e '.[tpu]')")
    return
  chip, mesh = tpu.topology_mesh(topology)
  module, params = abstract_7b(mesh)
  compiled, secs, n_img = compile_forward(module, params, mesh, tokens, side)
  r = report.compile_report(compiled)
  print(f"tpu {topology} 7B forward, 1 sample x {tokens} tokens, 2 images {side}px, fsdp={mesh.devices.size}: "
        f"{r.row()} per chip; fits {chip} HBM: {r.fits_on(chip)}; compiled in {secs:.0f} s")


def main(argv):
  del argv
  import torch
  torch.set_num_threads(THREADS.value)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} devices), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs")
  if "forward" in SECTIONS.value:
    bench_forward(REPEATS.value)
  if "memory" in SECTIONS.value:
    bench_memory(MESH.value, TOKENS.value, IMAGE.value)
  if "tpu" in SECTIONS.value:
    bench_tpu(TOPOLOGY.value, TOKENS.value, IMAGE.value)
  sys.stdout.flush()


if __name__ == "__main__":
  cli.run(main)
