r"""Training-step benchmark: compiles the real train step and times it on synthetic images.

  python -m vae_scale.bench step --config=configs/ldm_f8.py --batch_per_device=8 --steps=20 \
      [--config.model.dtype=bfloat16] [--config.model.remat=block] [--adversarial=both|ae|gan] \
      [--find_max_batch] [--json_out=PATH]

For each variant — `ae`, the autoencoder-only step that runs before `disc.start_step`, and `gan`, the
autoencoder + discriminator step after it — the step is built exactly as the train loop builds it
(optimizer, StepConfig, sharded TrainState, `jax.jit` with shardings and the state donated), lowered
and compiled once (timed), then run `--warmup` times and `--steps` times, each step ended by
`block_until_ready`. Reported per variant: step time (median, mean, min), images/s per device and in
all, lower and compile time, FLOPs per image from XLA's cost analysis of the compiled program, model
FLOPs per image (the same step without rematerialization, so recomputation earns no credit), MFU
against the device's peak, XLA's buffer sizes for the program and the device's peak memory where the
runtime reports it (GPU, TPU; not CPU). `--find_max_batch` searches the largest per-device batch that
compiles and runs (or, with `--memory_limit_gb`, whose XLA buffer estimate fits that limit).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from vae_scale.tools import bench_costs
from vae_scale import cli
from vae_scale.config import schema
from vae_scale import errors
from vae_scale.training import programs
from vae_scale.training import sharding
from vae_scale.models import AutoencoderConfig
from vae_scale.models import frozen_weights

VARIANTS = ("ae", "gan")

# --------------------------------------------------------------------------- the step


@dataclasses.dataclass
class StepProgram:
  """A compiled train step and what it needs to run."""

  compiled: Any
  init: Any  # jitted () -> sharded TrainState.
  batch_sharding: Any
  global_batch: int
  lower_s: float
  compile_s: float


def _with_batch(config: ml_collections.ConfigDict, global_batch: int):
  config = config.copy_and_resolve_references()
  config.global_batch_size = global_batch
  config.data.source = "synthetic"  # The benchmark feeds random images; no data is read.
  return config


def lower_step(config: ml_collections.ConfigDict, variant: str, global_batch: int, devices: Sequence[Any]):
  """Lowers `variant`'s train step for `global_batch` images over `devices`, as train.py builds it.

  Returns:
    (lowered, init, batch_sharding): the `jax.stages.Lowered` step, the jitted state initializer
    and the images' sharding.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant {variant!r}: use one of {VARIANTS}")
  config = _with_batch(config, global_batch)
  schema.validate(config, num_devices=len(devices))
  mesh = sharding.create_mesh(list(devices))
  # The AE step carries the discriminator's state when the run has one (as in train.py); the GAN
  # step always needs it, even for configs (demo) whose runs disable it.
  nets = frozen_weights.load_feature_nets(
      lpips_weights=config.loss.lpips_weights if config.loss.perceptual_weight > 0 else "")
  progs = programs.build(config, mesh, with_disc=config.disc.enabled or variant == "gan",
                         lpips_params=nets.get("lpips"),
                         dinov2=frozen_weights.load_vf_dinov2(config))
  step = progs.gan_step if variant == "gan" else progs.ae_step
  size = config.image_size
  images = jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32, sharding=progs.batch_sharding)
  lowered = step.lower(progs.abstract_state, {"image": images})
  return lowered, progs.init, progs.batch_sharding


def compile_step(config: ml_collections.ConfigDict, variant: str, global_batch: int, devices: Sequence[Any]) -> StepProgram:
  """Lowers and compiles `variant`'s train step, timing both."""
  start = time.perf_counter()
  lowered, init, batch_sh = lower_step(config, variant, global_batch, devices)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  return StepProgram(compiled, init, batch_sh, global_batch, lower_s, time.perf_counter() - start)


def synthetic_batch(program: StepProgram, image_size: int, seed: int) -> dict[str, jax.Array]:
  """Uniform random images in [-1, 1], sharded as the step expects: {'image': [B, H, W, 3]}."""
  shape = (program.global_batch, image_size, image_size, 3)
  make = jax.jit(lambda key: jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0),
                 out_shardings=program.batch_sharding)
  return {"image": make(jax.random.key(seed))}


def time_steps(program: StepProgram, config: ml_collections.ConfigDict, num_steps: int, warmup: int
               ) -> tuple[list[float], float]:
  """Runs warm-up steps, then `num_steps` timed steps each ended by block_until_ready.

  Returns (seconds per timed step, the last step's loss)."""
  state = program.init()
  batch = synthetic_batch(program, config.image_size, config.seed + 1)
  metrics = None
  for _ in range(warmup):
    state, metrics = program.compiled(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(num_steps):
    start = time.perf_counter()
    state, metrics = program.compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  loss = float(metrics.compute()["loss"]) if metrics is not None else float("nan")
  del state, batch, metrics
  return times, loss


def benchmark_variant(config: ml_collections.ConfigDict, variant: str, *, batch_per_device: int, num_steps: int, warmup: int,
                      devices: Sequence[Any], peak: float | None) -> dict[str, Any]:
  """Compiles and times one variant; the result is one row of the report."""
  n = len(devices)
  program = compile_step(config, variant, batch_per_device * n, devices)
  flops_step = bench_costs.xla_flops(program.compiled)
  if config.model.remat == "none":
    model_flops_step = flops_step
  else:  # The same step without recomputation (lowered only: no second compile).
    plain = config.copy_and_resolve_references()
    plain.model.remat = "none"
    model_flops_step = bench_costs.xla_flops(lower_step(plain, variant, batch_per_device * n, devices)[0])
  model_flops_step, source = bench_costs.model_flops(model_flops_step, batch_per_device * (  # One device's.
      bench_costs.analytic_train_flops_per_image(AutoencoderConfig.from_config(config))))
  memory = bench_costs.xla_memory(program.compiled)
  times, loss = time_steps(program, config, num_steps, warmup)
  median = statistics.median(times) if times else float("nan")
  per_image = lambda f: f / batch_per_device if f is not None else None
  row = {
      "variant": variant, "batch_per_device": batch_per_device, "global_batch": batch_per_device * n,
      "lower_s": program.lower_s, "compile_s": program.compile_s,
      "step_time_median_s": median, "step_time_mean_s": statistics.fmean(times) if times else None,
      "step_time_min_s": min(times) if times else None,
      "images_per_s_per_device": batch_per_device / median,
      "images_per_s": batch_per_device * n / median,
      "xla_flops_per_image": per_image(flops_step),
      "model_flops_per_image": per_image(model_flops_step), "model_flops_source": source,
      "achieved_tflops_per_device": (model_flops_step / median / 1e12) if model_flops_step else None,
      "peak_tflops_per_device": peak,
      "mfu": (model_flops_step / median / (peak * 1e12)) if model_flops_step and peak else None,
      "hfu": (flops_step / median / (peak * 1e12)) if source == "xla" and peak else None,
      "xla_memory_bytes": memory, "device_peak_bytes": bench_costs.device_peak_bytes(devices[0]),
      "final_loss": loss, "finite": math.isfinite(loss),
  }
  del program
  gc.collect()
  return row


# --------------------------------------------------------------------------- largest batch


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "Resource exhausted", "OOM"))


def batch_fits(config: ml_collections.ConfigDict | None, variant: str, batch_per_device: int, devices: Sequence[Any], *,
               memory_limit_bytes: int | None, execute: bool) -> tuple[bool, dict[str, Any]]:
  """Whether `batch_per_device` compiles and (with `execute`) runs two steps without running out of
  memory, and (with `memory_limit_bytes`) XLA's buffer estimate fits that limit."""
  info: dict[str, Any] = {"batch_per_device": batch_per_device}
  try:
    program = compile_step(config, variant, batch_per_device * len(devices), devices)
    memory = bench_costs.xla_memory(program.compiled)
    info["xla_memory_total_bytes"] = memory["total"] if memory else None
    if memory_limit_bytes is not None and memory and memory["total"] > memory_limit_bytes:
      info["fits"] = False
      info["why"] = "XLA estimate over the memory limit"
      return False, info
    if execute:
      time_steps(program, config, num_steps=1, warmup=1)
    info["fits"] = True
    return True, info
  except Exception as e:  # pylint: disable=broad-except
    if not _is_oom(e):
      raise
    info["fits"] = False
    info["why"] = str(e).splitlines()[0][:200]
    return False, info
  finally:
    program = None
    gc.collect()
    jax.clear_caches()


def find_max_batch(config: ml_collections.ConfigDict | None, variant: str, devices: Sequence[Any], *, max_batch: int,
                   memory_limit_bytes: int | None = None, execute: bool = True) -> dict[str, Any]:
  """The largest per-device batch that fits (doubling from 1, then bisecting), and the trials."""
  trials = []

  def fits(b: int) -> bool:
    ok, info = batch_fits(config, variant, b, devices, memory_limit_bytes=memory_limit_bytes,
                          execute=execute)
    trials.append(info)
    return ok

  good, bad = 0, None
  b = 1
  while b <= max_batch:
    if not fits(b):
      bad = b
      break
    good, b = b, b * 2
  if bad is None:
    bad = min(b, max_batch + 1)
    if good == max_batch:
      return {"max_batch_per_device": good, "capped": True, "trials": trials}
  while bad - good > 1:
    mid = (good + bad) // 2
    if fits(mid):
      good = mid
    else:
      bad = mid
  return {"max_batch_per_device": good, "capped": bad > max_batch, "trials": trials}


# --------------------------------------------------------------------------- report


def run(config: ml_collections.ConfigDict, *, variants: Sequence[str] = VARIANTS, batch_per_device: int | None = None,
        num_steps: int = 10, warmup: int = 2, num_devices: int | None = None,
        peak: float | None = None, max_batch: int = 0, memory_limit_bytes: int | None = None,
        execute_max_batch: bool = True) -> dict[str, Any]:
  """Benchmarks the train step of `config`; the library form of the command line.

  Args:
    config: a run config (configs/*.py); its image_size, model and optimizer are used as they are.
    variants: 'ae' (autoencoder only) and/or 'gan' (autoencoder + discriminator).
    batch_per_device: images per device (default: the config's global batch over the devices).
    num_steps, warmup: timed steps and untimed steps before them.
    num_devices: use the first N devices (default all).
    peak: the device's dense peak TFLOP/s (default: from PEAK_TFLOPS by device kind).
    max_batch: > 0 also searches the largest per-device batch up to this, per variant.
    memory_limit_bytes, execute_max_batch: how the search decides that a batch fits.
  Returns:
    A JSON-serializable report.
  """
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  n = len(devices)
  if batch_per_device is None:
    batch_per_device = max(1, config.global_batch_size // n)
  dtype = config.model.dtype
  kind = devices[0].device_kind
  peak = peak or bench_costs.peak_tflops(kind, dtype)
  model_cfg = AutoencoderConfig.from_config(config)
  report: dict[str, Any] = {
      "device": {"platform": devices[0].platform, "device_kind": kind, "num_devices": n},
      "versions": bench_costs.versions(), "image_size": config.image_size, "dtype": dtype,
      "remat": config.model.remat, "batch_per_device": batch_per_device,
      "analytic_forward_gmac_per_image": bench_costs.analytic_forward_macs(model_cfg)["total"] / 1e9,
      "analytic_train_gflop_per_image": bench_costs.analytic_train_flops_per_image(model_cfg) / 1e9,
      "activation_bytes_per_image": bench_costs.activation_bytes_per_image(config),
      "results": [],
  }
  for variant in variants:
    if num_steps > 0:
      report["results"].append(benchmark_variant(
          config, variant, batch_per_device=batch_per_device, num_steps=num_steps, warmup=warmup,
          devices=devices, peak=peak))
    if max_batch > 0:
      report.setdefault("max_batch", {})[variant] = find_max_batch(
          config, variant, devices, max_batch=max_batch, memory_limit_bytes=memory_limit_bytes,
          execute=execute_max_batch)
  return report


def _fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
  if value is None:
    return "n/a"
  return f"{value / scale:.{digits}g}"


def format_report(report: dict[str, Any]) -> str:
  """A few human-readable lines and a table of the report."""
  d = report["device"]
  lines = [f"device: {d['num_devices']} x {d['device_kind']} ({d['platform']}); "
           + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
           f"image {report['image_size']}², dtype {report['dtype']}, remat {report['remat']}, "
           f"batch/device {report['batch_per_device']}; analytic forward "
           f"{report['analytic_forward_gmac_per_image']:.4g} GMAC/image, train ≈ "
           f"{report['analytic_train_gflop_per_image']:.4g} GFLOP/image; activations kept for the "
           f"backward {report['activation_bytes_per_image'] / 2**20:.4g} MiB/image"]
  header = ("variant", "img/s/dev", "step ms", "compile s", "XLA GFLOP/img", "model GFLOP/img",
            "TFLOP/s/dev", "MFU", "XLA MiB", "peak MiB", "loss")
  rows = [header]
  for r in report["results"]:
    mem = r["xla_memory_bytes"]
    rows.append((r["variant"], _fmt(r["images_per_s_per_device"]),
                 _fmt(r["step_time_median_s"], 1e-3), _fmt(r["lower_s"] + r["compile_s"]),
                 _fmt(r["xla_flops_per_image"], 1e9), _fmt(r["model_flops_per_image"], 1e9),
                 _fmt(r["achieved_tflops_per_device"]),
                 "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                 _fmt(mem["total"] if mem else None, 2**20, 4),
                 _fmt(r["device_peak_bytes"], 2**20, 4), _fmt(r["final_loss"], 1, 4)))
  widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
  lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
  for variant, found in report.get("max_batch", {}).items():
    cap = " (search cap reached)" if found["capped"] else ""
    lines.append(f"largest batch per device ({variant}): {found['max_batch_per_device']}{cap}; "
                 f"tried {[t['batch_per_device'] for t in found['trials']]}")
  return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str], prog: str = "vae_scale.bench step"):
  """Parses `--config=PATH[:ARG]`, `--config.FIELD=VALUE` overrides and the benchmark's flags.

  Returns:
    (flag values, the config, {field: value} overrides).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = [prog] + list(argv)
  fv = flags.FlagValues()
  config = config_flags.DEFINE_config_file(
      "config", None, "Run config, e.g. configs/ldm_f8.py; override fields with --config.X=Y.",
      flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_integer("steps", 10, "Timed steps per variant (0: compile only).", flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "Untimed steps before the timed ones.", flag_values=fv)
  flags.DEFINE_enum("adversarial", "both", ["both", "ae", "gan"],
                    "Which step: autoencoder only (ae), with the discriminator (gan), or both.",
                    flag_values=fv)
  flags.DEFINE_integer("batch_per_device", 0, "Images per device (0: config's global batch / "
                       "devices).", flag_values=fv)
  flags.DEFINE_integer("num_devices", 0, "Use the first N devices (0: all).", flag_values=fv)
  flags.DEFINE_bool("find_max_batch", False, "Also search the largest per-device batch.",
                    flag_values=fv)
  flags.DEFINE_integer("max_batch", 1024, "Upper bound of that search.", flag_values=fv)
  flags.DEFINE_float("memory_limit_gb", 0.0, "For the search: a batch fits only if XLA's buffer "
                     "estimate is at most this many GiB (0: no limit; rely on real OOM).",
                     flag_values=fv)
  flags.DEFINE_bool("execute", True, "For the search: also run steps (catches real OOM).",
                    flag_values=fv)
  flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (0: from the table).",
                     flag_values=fv)
  flags.DEFINE_string("json_out", "", "Also write the report as JSON here.", flag_values=fv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__)
    print(fv.get_help())
    raise SystemExit(0)
  rest = cli.parse_flags(argv, fv)  # The one bootstrap's parser: mistakes are one line.
  if len(rest) > 1:
    raise cli.usage_error(f"unexpected arguments: {' '.join(rest[1:])}")
  if config.value is None:
    raise cli.usage_error("--config=PATH is required")
  return fv, config.value, config_flags.get_override_values(fv["config"])


def main(argv: Sequence[str]) -> int:
  """`python -m vae_scale.bench step FLAGS` (argv without the program name); returns the exit
  code. Its flags live in their own FlagValues, so `main` can run several times in one process."""
  try:
    fv, config, overrides = parse_args(argv)
    schema.validate(_with_batch(config, config.global_batch_size))
  except errors.Error as e:
    return cli.report(e)
  variants = VARIANTS if fv.adversarial == "both" else (fv.adversarial,)
  report = run(config, variants=variants, batch_per_device=fv.batch_per_device or None,
               num_steps=fv.steps, warmup=fv.warmup, num_devices=fv.num_devices or None,
               peak=fv.peak_tflops or None, max_batch=fv.max_batch if fv.find_max_batch else 0,
               memory_limit_bytes=int(fv.memory_limit_gb * 2**30) if fv.memory_limit_gb else None,
               execute_max_batch=fv.execute)
  report["command"] = "python -m vae_scale.bench step " + " ".join(argv)
  report["overrides"] = {k: str(v) for k, v in overrides.items()}
  print(format_report(report))
  if fv.json_out:
    with open(fv.json_out, "w") as f:
      json.dump(report, f, indent=1)
  return 0 if all(r["finite"] for r in report["results"]) else 3
