r"""Weights in and out: diffusers `AutoencoderKL` folders, original LDM / SD VAE state dicts, and the
frozen feature networks (LPIPS-VGG for the loss and evaluation, pytorch-fid's Inception for rFID).

  # A diffusers folder (config.json + diffusion_pytorch_model.safetensors) or an LDM/SD .safetensors
  # file -> a params directory that a run can start from (config.init_from=PARAMS_DIR).
  python -m vae_scale.convert import --src=DIR_OR_FILE --out=PARAMS_DIR [--config=configs/ldm_f8.py]

  # A trained run (EMA weights when it has them) -> a folder `AutoencoderKL.from_pretrained` loads.
  python -m vae_scale.convert export --config=configs/ldm_f8.py --workdir=RUN --out=DIR \
      [--step=N|best] [--latents=LATENTS_DIR] [--format=diffusers|ldm]

  # LPIPS-VGG v0.1 -> one safetensors file for config.loss.lpips_weights / evaluate --lpips_weights.
  # Defaults: torchvision's cached vgg16-397923af.pth and the lpips package's v0.1/vgg.pth.
  python -m vae_scale.convert lpips --out=lpips_vgg.safetensors [--vgg=PATH] [--lin=PATH]

  # pytorch-fid's FID Inception -> one safetensors file for evaluate --inception_weights (rFID).
  python -m vae_scale.convert inception --src=pt_inception-2015-12-05-6726825d.pth \
      --out=inception.safetensors

  # DINOv2 (a transformers folder: config.json + model.safetensors, e.g. facebook/dinov2-large)
  # -> one safetensors file for the VF loss (loss.vf_weights).
  python -m vae_scale.convert dinov2 --src=DIR --out=dinov2_vitl14.safetensors

Autoencoder weights are only read from safetensors: a pickle-based `.ckpt`/`.bin`/`.pt` is refused
(unpickling runs code). The feature networks' PyTorch files are read once here with
`torch.load(weights_only=True)` (tensors only), and only their safetensors are read afterwards.
The conversions themselves live in `vae_scale.interop` (names, diffusers configs, safetensors,
weights, torch_convert, dinov2_weights); this module is their command line.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from vae_scale.run import checkpoints
from vae_scale import cli
from vae_scale.errors import ConversionError
from vae_scale.interop import diffusers_config
from vae_scale.interop import dinov2_weights
from vae_scale.interop import safetensors_io
from vae_scale.models import frozen_weights
from vae_scale.interop import torch_convert
from vae_scale.run import weights
from vae_scale.models import AutoencoderConfig

COMMANDS = ("import", "export", "lpips", "inception", "dinov2")
USAGE = ("usage: python -m vae_scale.convert {import|export|lpips|inception|dinov2} --out=... "
         "[--src=...] (see --help)")


def define_flags() -> dict[str, Any]:
  """The flags of `python -m vae_scale.convert` (defined by `entry` only)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      "config", None, "Run config whose `model` the weights must fit (default: the architecture "
      "stored with the weights, or with the --workdir run's checkpoint).",
      lock_config=True)
  f = flags
  return {
      "config": config,
      "src": f.DEFINE_string("src", None, "import: diffusers folder, LDM/SD .safetensors, or "
                             "params dir. export: a params dir or any of those (not --workdir). "
                             "inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth. "
                             "dinov2: a transformers DINOv2 folder."),
      "out": f.DEFINE_string("out", None, "import: params directory to create. export: diffusers "
                             "folder (or .safetensors file with --format=ldm). lpips, inception, "
                             "dinov2: the .safetensors file to write."),
      "vgg": f.DEFINE_string("vgg", None, "lpips: torchvision's VGG16 ImageNet weights "
                             "(vgg16-397923af.pth; default: torchvision's download cache)."),
      "lin": f.DEFINE_string("lin", None, "lpips: the LPIPS v0.1 lin weights (default: "
                             "lpips/weights/v0.1/vgg.pth of the installed lpips package)."),
      "workdir": f.DEFINE_string("workdir", None, "export: the run directory to export from."),
      "step": cli.define_step_flag("export: checkpoint step, or 'best' (by the run's "
                                   "checkpoint.keep_best); default: the latest."),
      "weights": f.DEFINE_enum("weights", "auto", ["auto", "ema", "params"],
                               "export: auto = EMA weights when the run has them."),
      "format": f.DEFINE_enum("format", "diffusers", ["diffusers", "ldm"], "export format."),
      "dtype": f.DEFINE_enum("dtype", "float32", ["float32", "float16"], "export dtype."),
      "latents": f.DEFINE_string("latents", None, "export: an `encode` output dir (or its "
                                 "metadata.json), whose scale/shift factors go into config.json."),
      "scaling_factor": f.DEFINE_float("scaling_factor", None, "export: overrides the scaling "
                                       "factor (default: --latents, the source's, or 0.18215)."),
      "shift_factor": f.DEFINE_float("shift_factor", None, "export: shift factor for config.json."),
      "norm_groups": f.DEFINE_integer("norm_groups", 32, "import without --config: GroupNorm "
                                      "groups of an LDM file (not stored in the weights)."),
      "resolution": f.DEFINE_integer("resolution", 256, "import without --config: the model's "
                                     "image size (only matters for attn_resolutions)."),
  }


def _model_cfg_of(config: ml_collections.ConfigDict | None) -> AutoencoderConfig | None:
  return None if config is None else AutoencoderConfig.from_config(config)


def run_import(src: str, out: str, model_cfg: AutoencoderConfig | None = None, *,
               norm_groups: int = 32, resolution: int = 256) -> AutoencoderConfig:
  """Converts weights at `src` into a params directory `out`; returns their architecture."""
  found_cfg, factors = weights.source_config(src, norm_groups=norm_groups, resolution=resolution)
  model_cfg = model_cfg or found_cfg
  params = weights.load_params(src, model_cfg)
  weights.save_params_dir(params, out, model_cfg, source=os.path.abspath(src) if "://" not in src else src,
                  **factors)
  return model_cfg


def run_export(out: str, *, model_cfg: AutoencoderConfig | None, workdir: str | None = None,
               src: str | None = None, step: int | None = None, which_weights: str = "auto",
               fmt: str = "diffusers", dtype: str = "float32", latents: str | None = None,
               scaling_factor: float | None = None, shift_factor: float | None = None
               ) -> dict[str, Any]:
  """Exports a run's checkpoint (or weights at `src`) as a diffusers folder or an LDM file."""
  factors = {"scaling_factor": None, "shift_factor": None}
  if workdir:
    if model_cfg is None:
      raise ConversionError("export --workdir needs --config (the run's config)")
    params, step, which = checkpoints.read_params(workdir, model_cfg, step=step,
                                                    weights=which_weights)
  elif src:
    if model_cfg is None or weights.describe_source(src) in ("params", "diffusers"):
      found, factors = weights.source_config(src)
      model_cfg = model_cfg or found
    params, which = weights.load_params(src, model_cfg), "imported"
  else:
    raise ConversionError("export needs --workdir (with --config) or --src")
  if latents:
    factors["scaling_factor"], factors["shift_factor"] = weights.latent_factors(latents)
  if scaling_factor is not None:
    factors["scaling_factor"] = scaling_factor
  if shift_factor is not None:
    factors["shift_factor"] = shift_factor
  scale = factors["scaling_factor"] if factors["scaling_factor"] is not None else diffusers_config.SD_SCALING_FACTOR
  if fmt == "diffusers":
    safetensors_io.export_diffusers(params, model_cfg, out, scaling_factor=scale,
                     shift_factor=factors["shift_factor"], dtype=dtype)
  else:
    safetensors_io.export_ldm(params, out, dtype=dtype)
  return {"out": out, "format": fmt, "step": step, "weights": which, "scaling_factor": scale,
          "shift_factor": factors["shift_factor"]}


def run_feature_net(command: str, out: str, *, src: str | None = None, vgg: str | None = None,
                    lin: str | None = None) -> str:
  """`lpips`, `inception` or `dinov2`: converts the network's weights into `out`; returns the
  line telling where to use the file."""
  if command == "lpips":
    torch_convert.convert_lpips(out, vgg_path=vgg, lin_path=lin)
    frozen_weights.load_lpips_params(out)  # Read back: what training will read.
    return (f"Wrote {out} (LPIPS-VGG v0.1). Use it with --config.loss.lpips_weights={out} "
            f"(training, evaluation) or evaluate --lpips_weights={out}")
  if command == "dinov2":
    if not src:
      raise cli.usage_error(f"dinov2 needs --src=DIR, a transformers DINOv2 folder; usage: "
                            f"{frozen_weights.dinov2_command(out)}")
    dinov2_weights.convert_dinov2(src, out)
    _, cfg = frozen_weights.load_dinov2_params(out)  # Read back: what training will read.
    return (f"Wrote {out} (DINOv2, width {cfg.hidden_size}, {cfg.num_layers} layers, "
            f"{cfg.num_register_tokens} registers). Use it with --config.loss.vf_weights={out}")
  if not src:
    raise cli.usage_error(f"inception needs --src={frozen_weights.INCEPTION_FILE} (pytorch-fid's "
                          f"FID weights, {torch_convert.INCEPTION_URL})")
  torch_convert.convert_inception(src, out)
  frozen_weights.load_inception_params(out)
  return (f"Wrote {out} (pytorch-fid Inception). Use it with evaluate --inception_weights={out} "
          f"or --config.inception_weights={out}")


def main(argv: list[str], flag_values: dict[str, Any]) -> int:
  """import, export, lpips, inception or dinov2; a mistake or unusable weights raise one-line
  errors (exit 2)."""
  fv = {k: v.value for k, v in flag_values.items()}
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise cli.usage_error(USAGE)
  if not fv["out"]:
    raise cli.usage_error(f"--out is required; {USAGE}")
  if argv[1] in ("lpips", "inception", "dinov2"):
    print(run_feature_net(argv[1], fv["out"], src=fv["src"], vgg=fv["vgg"], lin=fv["lin"]))
    return 0
  model_cfg = _model_cfg_of(fv["config"])
  if argv[1] == "import":
    if not fv["src"]:
      raise cli.usage_error(f"--src is required; {USAGE}")
    cfg = run_import(fv["src"], fv["out"], model_cfg, norm_groups=fv["norm_groups"],
                     resolution=fv["resolution"])
    print(f"Wrote {fv['out']}. Start a run from it with --config.init_from={fv['out']}; its "
          f"architecture is\n  " + " ".join(diffusers_config.config_overrides(cfg)))
  else:
    if model_cfg is None and fv["workdir"]:  # The architecture stored with the run's checkpoint.
      model_cfg = _model_cfg_of(cli.run_config(flag_values))
    info = run_export(fv["out"], model_cfg=model_cfg, workdir=fv["workdir"], src=fv["src"],
                      step=fv["step"], which_weights=fv["weights"], fmt=fv["format"],
                      dtype=fv["dtype"], latents=fv["latents"],
                      scaling_factor=fv["scaling_factor"], shift_factor=fv["shift_factor"])
    print(f"Wrote {info['out']} ({info['format']}, step {info['step']}, {info['weights']} "
          f"weights, scaling_factor {info['scaling_factor']:.6g})")
  return 0


def entry() -> None:
  """`python -m vae_scale.convert`: defines the flags, runs `main` through `cli.run` (exits)."""
  fl = cli.main_module_flags(define_flags)
  cli.run(lambda argv: main(argv, fl))
