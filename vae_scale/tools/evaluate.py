r"""Evaluates a trained autoencoder on the held-out set: numbers, TensorBoard and image grids.

  python -m vae_scale.evaluate --config=configs/ldm_f8.py --workdir=RUN [--step=N|best] \
      [--output_dir=RUN/eval] [--num_images=N] [--weights=auto|ema|params] [--params=PATH] \
      [--inception_weights=inception.safetensors] [--lpips_weights=lpips_vgg.safetensors] \
      [--dinov2_weights=dinov2.safetensors]

Over `num_eval_images` center crops of the eval split: PSNR and SSIM (mean and std over images),
mean L1, KL per latent channel, the latent mean/std (overall and per channel; 1/std is the
scale factor a diffusion model would use) and the share of the latent's spectral energy above half
its Nyquist frequency; with --lpips_weights (default config.loss.lpips_weights) LPIPS-VGG, with
--inception_weights (default config.inception_weights) rFID between the images and their
reconstructions (pytorch-fid's Inception pool3 features, Frechet distance in float64), and with
--dinov2_weights (default config.loss.vf_weights) for a run trained with the VF loss, the mean
cosine between its projected latents and DINOv2's patch features. Make the weight files once with
`python -m vae_scale.convert lpips|inception|dinov2`. Written to
`eval_{step:08d}.json` and TensorBoard (`evaluate/*`) in the output directory, with PNG grids of
reconstructions, of decodes of latents drawn from the prior N(0, I), and of latent interpolations
between pairs of images; a progress line with an ETA is logged every --log_every_batches batches,
and the last lines printed are LDM Table 8's columns (rFID | PSNR | SSIM, then LPIPS) and the JSON.
EMA weights are used when the run keeps them. `--params` evaluates imported weights (e.g. the
public SD VAE) instead of a run.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
from clu import metric_writers
from etils import epath

from vae_scale import cli
from vae_scale.config import schema
from vae_scale.eval import evaluator
from vae_scale.eval import report
from vae_scale.training import sharding
from vae_scale.data import pipeline
from vae_scale.models import frozen_weights
from vae_scale.run import weights as weights_lib
from vae_scale.run import checkpoints


def run(config: ml_collections.ConfigDict, workdir: str | None, *, step: int | None = None,
        output_dir: str | None = None, weights: str = "auto", params_path: str | None = None,
        num_images: int | None = None, lpips_weights: str | None = None,
        inception_weights: str | None = None, dinov2_weights: str | None = None,
        log_every_batches: int = 0) -> dict[str, Any]:
  """Evaluates a run's checkpoint (or weights at `params_path`) on `config`'s eval split.

  Every process calls it. Process 0 writes `eval_{step:08d}.json` and PNG grids into
  `output_dir` (default `workdir/eval`); TensorBoard events go there too.

  Args:
    lpips_weights: LPIPS-VGG safetensors for the `lpips` metric; None: config.loss.lpips_weights;
      '': none.
    inception_weights: pytorch-fid Inception safetensors for `rfid`; None: config.inception_weights;
      '': none.
    dinov2_weights: DINOv2 safetensors for `vf_cosine` (a run with a VF projection); None:
      config.loss.vf_weights; '': none.
    log_every_batches: progress line every this many batches (0: none).
  Returns:
    The metrics of `evaluator.Evaluator` and step, weights, image_size, files.
  Raises:
    ConversionError: no such checkpoint, weights that don't fit config.model, or a weights file
      of another network (all before anything compiles).
    DataError / ConfigError: bad data or config.
  """
  pi, pc = jax.process_index(), jax.process_count()
  if num_images:
    config = config.copy_and_resolve_references()
    config.num_eval_images = int(num_images)
  schema.validate(config, num_devices=jax.device_count(), num_processes=pc, training=False)
  mesh = sharding.create_mesh()
  eval_ds = pipeline.create_eval_dataset(config, pi, pc)  # Bad data fails first.
  # The feature networks' files are checked (network tag, names, shapes) before anything compiles.
  nets = frozen_weights.load_feature_nets(
      lpips_weights=config.loss.lpips_weights if lpips_weights is None else lpips_weights,
      inception_weights=config.inception_weights if inception_weights is None else inception_weights)
  dinov2_weights = config.loss.vf_weights if dinov2_weights is None else dinov2_weights
  dinov2 = frozen_weights.load_dinov2_params(dinov2_weights) if dinov2_weights else None
  params, step, which = weights_lib.load_weights(
      config, workdir, params_path, step, weights, sharding.replicated(mesh))
  # The VF projection is the run's (imported weights have none): no projection, no cosine.
  vf_proj = (checkpoints.read_projection(workdir, step) if dinov2 is not None and workdir and
             not params_path else None)
  output_dir = epath.Path(output_dir or epath.Path(workdir) / "eval")
  evaluator_ = evaluator.Evaluator(config, mesh, lpips_params=nets.get("lpips"),
                                   inception_params=nets.get("inception"), dinov2=dinov2,
                                   log_every_batches=log_every_batches)
  metrics, grids = evaluator_(params, eval_ds, pc, vf_proj=vf_proj)
  result: dict[str, Any] = {"step": int(step), "weights": which,
                            "image_size": config.image_size, **metrics}
  writer = metric_writers.create_default_writer(str(output_dir), just_logging=pi > 0)
  with metric_writers.ensure_flushes(writer):
    result["files"] = report.publish(writer, step, metrics, grids, prefix="evaluate",
                                     png_dir=output_dir, is_chief=pi == 0,
                                     what=f"Evaluated ({which} weights)")
  writer.close()
  json_path = output_dir / f"eval_{step:08d}.json"
  result["files"]["json"] = str(json_path)
  if pi == 0:
    json_path.write_text(json.dumps(result, indent=2) + "\n")
  return result


# --------------------------------------------------------------------------- CLI


def define_flags() -> dict[str, Any]:
  """The flags of `python -m vae_scale.evaluate` (defined by `entry` only)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags
  return {
      **cli.define_distributed_flags(),
      **cli.define_weights_flags("evaluates", "The run's config (model and eval data)."),
      "output_dir": f.DEFINE_string("output_dir", None, "Where JSON, PNGs and TensorBoard events "
                                    "go (default: WORKDIR/eval)."),
      "num_images": f.DEFINE_integer("num_images", None, "Held-out images (default: "
                                     "config.num_eval_images)."),
      "inception_weights": f.DEFINE_string(
          "inception_weights", None, "pytorch-fid Inception weights (safetensors, from `python -m "
          "vae_scale.convert inception`) for rFID (default: config.inception_weights; '' = none)."),
      "lpips_weights": f.DEFINE_string(
          "lpips_weights", None, "LPIPS-VGG weights (safetensors, from `python -m "
          "vae_scale.convert lpips`) for LPIPS (default: config.loss.lpips_weights; '' = none)."),
      "dinov2_weights": f.DEFINE_string(
          "dinov2_weights", None, "DINOv2 weights (safetensors, from `python -m vae_scale.convert "
          "dinov2`) for the VF cosine of a run trained with the VF loss (default: "
          "config.loss.vf_weights; '' = none)."),
      "log_every_batches": f.DEFINE_integer(
          "log_every_batches", 10, "Log progress (batches done/total, images/s, ETA) every this "
          "many batches; 0 = never."),
  }


def main(argv: list[str], fl: dict[str, Any]) -> int:
  """Checks the flags, starts jax.distributed, evaluates; prints the scalar results as JSON."""
  if len(argv) > 1:
    raise cli.usage_error(f"unexpected arguments {' '.join(argv[1:])}")
  v = {k: x.value for k, x in fl.items()}
  if not (v["workdir"] or v["params"]):
    raise cli.usage_error("--workdir (or --params with --config) is required")
  v["config"] = cli.run_config(fl)
  if v["params"] and not (v["output_dir"] or v["workdir"]):
    raise cli.usage_error("--params needs --output_dir")
  schema.validate(v["config"], training=False)
  cli.init_distributed(fl)
  result = run(v["config"], v["workdir"], step=v["step"], output_dir=v["output_dir"],
               weights=v["weights"], params_path=v["params"], num_images=v["num_images"],
               lpips_weights=v["lpips_weights"], inception_weights=v["inception_weights"],
               dinov2_weights=v["dinov2_weights"],
               log_every_batches=v["log_every_batches"])
  if jax.process_index() == 0:
    print(f"step {result['step']} ({result['weights']} weights): {report.table_line(result)}")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}))
  return 0


def entry() -> None:
  """`python -m vae_scale.evaluate`: defines the flags, runs `main` through `cli.run` (exits)."""
  fl = cli.main_module_flags(define_flags)
  cli.run(lambda argv: main(argv, fl))
