r"""The cost of VA-VAE's VF loss and EQ-VAE's term: train-step time against the same step without.

  python bench/diffusability_cost.py [--image_size=128] [--batch=8] [--rounds=5] [--steps=6] \
      [--variants=base,vf_s,vf_s_const,vf_l,eq] [--json_out=PATH] [--full_size --flops_only]

Every variant is the same f16 autoencoder (ch 32, ch_mult (1, 1, 2, 2, 4), one ResNet block per
level, no discriminator, L1 + 0.5 SSIM + KL), built as the train loop builds it
(`training.programs.build`: sharded state, jit with shardings, state donated), on one device:

  base        no diffusability term
  vf_s        + the VF loss, DINOv2 of ViT-S/14's shape (random weights), LightningDiT's adaptive
              weight (an extra decoder backward to its input for d nll / dz)
  vf_s_const  the same with a constant weight (loss.vf_adaptive=False): DINOv2 and the loss alone
  vf_l        + the VF loss with DINOv2 of ViT-L/14's shape (LightningDiT's), adaptive
  eq          + EQ-VAE's term (prob 0.5, low-res prob 0.25, scales 0.25 / 0.5 / 0.75): a step
              is a plain, a tau or a low-resolution one by the step's draw, so its mean time over
              many steps is the cost

Each variant is compiled once (timed; EQ-VAE: every view's program), warmed up, then the variants
take turns (EQ-VAE's steps run the program of the view each step draws, as the loop does): each
round runs `--steps` steps of every variant in order, each step ended by block_until_ready; a
variant's time is the median over rounds of its mean step time in the round, and the ratio is
against `base` measured in the same rounds ('pooled': all its steps over all of base's, which
averages EQ-VAE's views over every draw). XLA's FLOP count of each program (EQ-VAE: the mean over
its views weighted by their probabilities) gives the same ratio without the machine's noise.
Prints a table and, with --json_out, the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "configs"))

VARIANTS = ("base", "vf_s", "vf_s_const", "vf_l", "eq")
DINOV2_SHAPES = {"s": dict(hidden_size=384, num_layers=12, num_heads=6),
                 "l": dict(hidden_size=1024, num_layers=24, num_heads=16)}


def _dinov2_file(directory: str, size: str) -> str:
  """A DINOv2 weights file of a released shape with random weights (no download)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vae_scale.interop import safetensors_io  # pylint: disable=g-import-not-at-top
  from vae_scale.models import dinov2  # pylint: disable=g-import-not-at-top
  from vae_scale.models import frozen_weights  # pylint: disable=g-import-not-at-top
  from vae_scale.models.lpips import flat_state  # pylint: disable=g-import-not-at-top
  cfg = dinov2.Dinov2Config(**DINOV2_SHAPES[size], pos_antialias=True)
  net = dinov2.Dinov2(cfg, rngs=nnx.Rngs(0))
  params = {k: np.asarray(v, np.float32) for k, v in flat_state(nnx.state(net, nnx.Param)).items()}
  path = os.path.join(directory, f"dinov2_{size}.safetensors")
  safetensors_io.write_safetensors(params, path, metadata={
      frozen_weights.NET_KEY: frozen_weights.DINOV2_NET,
      frozen_weights.CONFIG_KEY: json.dumps(cfg.to_dict(), sort_keys=True)})
  return path


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis.get("flops", float("nan")))


def _expected_flops(programs_: dict, eq_cfg) -> float:
  """XLA's FLOPs of a step; for EQ-VAE the mean over its views, weighted by their probabilities
  (plain (1 - p)(1 - q), each tau view p / n, each low-resolution view (1 - p) q / n)."""
  if eq_cfg is None:
    return _flops(programs_[None])
  from vae_scale.training import equivariance  # pylint: disable=g-import-not-at-top
  p, q, n = eq_cfg.prob, eq_cfg.low_res_prob, len(eq_cfg.scales)
  weight = {equivariance.PLAIN: (1 - p) * (1 - q), equivariance.EQUIVARIANT: p / n,
            equivariance.LOW_RES: (1 - p) * q / n}
  return sum(weight[view.kind] * _flops(c) for view, c in programs_.items())


def _config(variant: str, image_size: int, batch: int, directory: str, full_size: bool = False):
  import demo  # pylint: disable=g-import-not-at-top
  import vavae_f16d32  # pylint: disable=g-import-not-at-top
  if full_size:  # VA-VAE's f16d32 model, L1 + 0.5 SSIM + KL, no discriminator (as below).
    config = vavae_f16d32.get_config("stage1")
    config.loss.reduction, config.loss.perceptual_weight = "mean", 0.0
    config.loss.ssim_weight, config.loss.kl_weight = 0.5, 1e-6
    config.disc.enabled, config.loss.vf_weight = False, 0.0
  else:
    config = demo.get_config()
    config.model.ch, config.model.ch_mult = 32, (1, 1, 2, 2, 4)
    config.model.num_res_blocks, config.model.norm_groups = 1, 8
  config.image_size = image_size
  config.global_batch_size = batch
  config.data.source = "synthetic"
  config.ema_decay = 0.0
  if variant.startswith("vf"):
    size = variant.split("_")[1]
    config.loss.vf_weight = 0.5
    config.loss.vf_weights = _dinov2_file(directory, size)
    config.loss.vf_feature_dim = DINOV2_SHAPES[size]["hidden_size"]
    config.loss.vf_adaptive = not variant.endswith("const")
  if variant == "eq":
    config.loss.equivariance_weight = 1.0
    config.loss.equivariance_scales = (0.25, 0.5, 0.75)
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image_size", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--json_out", default="")
  parser.add_argument("--full_size", action="store_true",
                      help="VA-VAE's f16d32 autoencoder (ch 128) instead of the small one")
  parser.add_argument("--flops_only", action="store_true",
                      help="compile and report XLA's FLOPs ratios, no timing")
  args = parser.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vae_scale.config import schema  # pylint: disable=g-import-not-at-top
  from vae_scale.models import frozen_weights  # pylint: disable=g-import-not-at-top
  from vae_scale.training import diffusability  # pylint: disable=g-import-not-at-top
  from vae_scale.training import programs  # pylint: disable=g-import-not-at-top
  from vae_scale.training import sharding  # pylint: disable=g-import-not-at-top

  variants = args.variants.split(",")
  if variants[0] != "base":
    raise SystemExit("--variants must start with base (the ratios' denominator)")
  mesh = sharding.create_mesh(jax.devices()[:1])
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
  batch = sharding.global_batch({"image": images}, mesh)
  def _run(run: list) -> None:  # [pick(step) -> program, state, step]
    pick, state, step = run
    run[1], _ = pick(step)(state, batch)
    run[2] = step + 1

  runs, compile_s, flops = {}, {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in variants:
      config = _config(name, args.image_size, args.batch, tmp, args.full_size)
      schema.validate(config, num_devices=1)
      progs = programs.build(config, mesh, dinov2=frozen_weights.load_vf_dinov2(config))
      state = progs.init()
      rng = np.asarray(state.rng)
      start = time.perf_counter()
      # Every program the variant runs (EQ-VAE: one per view), compiled up front.
      programs_ = {view: bound.lower(progs.abstract_state, batch).compile() for (_, view), bound
                   in progs.view_steps.items()} or {None: progs.ae_step.lower(
                       progs.abstract_state, batch).compile()}
      compile_s[name] = time.perf_counter() - start
      flops[name] = _expected_flops(programs_, progs.step_cfg.equivariance)
      pick = (lambda step, p=programs_, c=progs.step_cfg.equivariance, r=rng: p[
          diffusability.view_at(c, r, step)]) if progs.view_steps else (
              lambda step, p=programs_: p[None])
      runs[name] = [pick, state, 0]
      if args.flops_only:
        print(f"{name}: compiled in {compile_s[name]:.1f} s, {flops[name] / args.batch / 1e9:.1f} "
              f"GFLOP per image, {flops[name] / flops['base']:.3f} x base", flush=True)
        del runs[name]
        continue
      for _ in range(args.warmup):
        _run(runs[name])
      jax.block_until_ready(runs[name][1])
      print(f"{name}: compiled in {compile_s[name]:.1f} s", flush=True)
  if args.flops_only:
    return
  times = {name: [] for name in variants}
  for r in range(args.rounds):
    for name in variants:
      start = time.perf_counter()
      for _ in range(args.steps):
        _run(runs[name])
        jax.block_until_ready(runs[name][1])
      times[name].append((time.perf_counter() - start) / args.steps)
    print(f"round {r + 1}: " + ", ".join(f"{n} {1e3 * times[n][-1]:.0f} ms" for n in variants),
          flush=True)
  base = times["base"]
  cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
              if l.startswith("model name")), platform.processor())
  result = {"cpu": cpu, "cores": os.cpu_count(), "device": str(jax.devices()[0]),
            "image_size": args.image_size, "batch": args.batch, "rounds": args.rounds,
            "steps": args.steps, "variants": {}}
  print(f"\n{cpu}, {os.cpu_count()} cores; {args.image_size} px, batch {args.batch}")
  print("| variant | step (median of rounds) | ratio to base: median of rounds (range) | "
        "pooled | XLA FLOPs ratio | compile |")
  for name in variants:
    ratios = [t / b for t, b in zip(times[name], base)]
    pooled = sum(times[name]) / sum(base)  # All steps: EQ's draws differ from round to round.
    result["variants"][name] = {"step_ms": 1e3 * statistics.median(times[name]),
                                "ratio": statistics.median(ratios), "ratios": ratios,
                                "pooled_ratio": pooled, "compile_s": compile_s[name],
                                "flops": flops[name], "flops_ratio": flops[name] / flops["base"]}
    print(f"| {name} | {1e3 * statistics.median(times[name]):.0f} ms | "
          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
          f"{pooled:.2f} | {flops[name] / flops['base']:.2f} | {compile_s[name]:.0f} s |")
  if args.json_out:
    pathlib.Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
