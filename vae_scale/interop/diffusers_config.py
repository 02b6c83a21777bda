"""diffusers `AutoencoderKL` config.json <-> vae_scale's `AutoencoderConfig`, and back to flags.

An architecture travels three ways: inside a diffusers folder (config.json), read off a state dict's
names and shapes (LDM files carry no config), and as JSON inside a params directory. Each way maps
onto one `AutoencoderConfig`; `config_overrides` turns it into the `--config.model.*` flags of a run.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from vae_scale.errors import ConversionError
from vae_scale.models import AutoencoderConfig

SD_SCALING_FACTOR = 0.18215  # LDM's 1/std of SD's first-batch latents; diffusers' default.
DIFFUSERS_VERSION = "0.42.1"  # Written into exported config.json (the version tested against).


def autoencoder_config_from_diffusers(config_json: dict[str, Any]) -> AutoencoderConfig:
  """The `AutoencoderConfig` of a diffusers `AutoencoderKL` config.json.

  Raises:
    ConversionError: a setting vae_scale's autoencoder cannot express.
  """
  c = dict(config_json)
  name = c.get("_class_name", "AutoencoderKL")
  if name != "AutoencoderKL":
    raise ConversionError(f"config.json describes a {name}, not an AutoencoderKL")
  widths = [int(w) for w in c.get("block_out_channels", (64,))]
  down = list(c.get("down_block_types", ("DownEncoderBlock2D",) * len(widths)))
  up = list(c.get("up_block_types", ("UpDecoderBlock2D",) * len(widths)))
  problems = []
  if any(w % widths[0] for w in widths):
    problems.append(f"block_out_channels={widths} are not all multiples of the first")
  if c.get("act_fn", "silu") not in ("silu", "swish"):
    problems.append(f"act_fn={c['act_fn']!r} (only silu)")
  for key in ("use_quant_conv", "use_post_quant_conv"):
    if not c.get(key, True):
      problems.append(f"{key}=false")
  if len(down) != len(widths) or len(up) != len(widths):
    problems.append(f"{len(down)} down and {len(up)} up block types for {len(widths)} levels")
  if set(down) - {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"}:
    problems.append(f"down_block_types={down}")
  if set(up) - {"UpDecoderBlock2D", "AttnUpDecoderBlock2D"}:
    problems.append(f"up_block_types={up}")
  size = c.get("sample_size", 256)
  size = int(size[0] if isinstance(size, (list, tuple)) else size)
  n = len(widths)
  attn_down = [i for i, t in enumerate(down) if t.startswith("Attn")]
  attn_up = sorted(n - 1 - i for i, t in enumerate(up) if t.startswith("Attn"))
  if not problems and attn_down != attn_up:
    problems.append(f"attention at encoder levels {attn_down} but decoder levels {attn_up}")
  if problems:
    raise ConversionError("this diffusers AutoencoderKL is not expressible in vae_scale: " +
                          "; ".join(problems))
  return AutoencoderConfig(
      in_channels=int(c.get("in_channels", 3)), out_channels=int(c.get("out_channels", 3)),
      ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
      num_res_blocks=int(c.get("layers_per_block", 1)),
      attn_resolutions=tuple(size // 2 ** i for i in attn_down),
      mid_attention=bool(c.get("mid_block_add_attention", True)),
      z_channels=int(c.get("latent_channels", 4)), double_z=True, resolution=size,
      norm_groups=int(c.get("norm_num_groups", 32)))


def diffusers_config_from_autoencoder(model_cfg: AutoencoderConfig, *,
                                      scaling_factor: float = SD_SCALING_FACTOR,
                                      shift_factor: float | None = None) -> dict[str, Any]:
  """The diffusers config.json of `model_cfg` (AutoencoderKL).

  Raises:
    ConversionError: the model has no diffusers equivalent (no double_z, ch_mult[0] != 1).
  """
  if not model_cfg.double_z:
    raise ConversionError("model.double_z=False has no diffusers AutoencoderKL equivalent")
  if model_cfg.ch_mult[0] != 1:
    raise ConversionError(f"model.ch_mult={tuple(model_cfg.ch_mult)}: diffusers needs "
                          "ch_mult[0] == 1 (its conv_in has block_out_channels[0] outputs)")
  n = len(model_cfg.ch_mult)
  attn = [model_cfg.resolution // 2 ** i in model_cfg.attn_resolutions for i in range(n)]
  return {
      "_class_name": "AutoencoderKL",
      "_diffusers_version": DIFFUSERS_VERSION,
      "act_fn": "silu",
      "block_out_channels": [model_cfg.ch * m for m in model_cfg.ch_mult],
      "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
      "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attn[::-1]],
      "force_upcast": True,
      "in_channels": model_cfg.in_channels,
      "out_channels": model_cfg.out_channels,
      "latent_channels": model_cfg.z_channels,
      "latents_mean": None,
      "latents_std": None,
      "layers_per_block": model_cfg.num_res_blocks,
      "mid_block_add_attention": bool(model_cfg.mid_attention),
      "norm_num_groups": model_cfg.norm_groups,
      "sample_size": model_cfg.resolution,
      "scaling_factor": float(scaling_factor),
      "shift_factor": None if shift_factor is None else float(shift_factor),
      "use_post_quant_conv": True,
      "use_quant_conv": True,
  }


def model_cfg_to_json(model_cfg: AutoencoderConfig) -> dict[str, Any]:
  d = dataclasses.asdict(model_cfg)
  d["ch_mult"], d["attn_resolutions"] = list(d["ch_mult"]), list(d["attn_resolutions"])
  d["dtype"] = np.dtype(d["dtype"]).name
  return d


def model_cfg_from_json(d: dict[str, Any]) -> AutoencoderConfig:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  d = dict(d)
  d["ch_mult"], d["attn_resolutions"] = tuple(d["ch_mult"]), tuple(d["attn_resolutions"])
  d["dtype"] = jnp.dtype(d.get("dtype", "float32"))
  known = {f.name for f in dataclasses.fields(AutoencoderConfig)}
  return AutoencoderConfig(**{k: v for k, v in d.items() if k in known})


def config_overrides(model_cfg: AutoencoderConfig) -> list[str]:
  """The `--config.model.*` / `--config.image_size` flags that describe `model_cfg`."""
  fmt = lambda v: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
  out = [f"--config.image_size={model_cfg.resolution}"]
  for field in ("in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks",
                "attn_resolutions", "mid_attention", "z_channels", "double_z", "norm_groups"):
    value = getattr(model_cfg, field)
    out.append(f"--config.model.{field}=" + (f"'({fmt(value)}{',' if len(value) == 1 else ''})'"
                                             if isinstance(value, (tuple, list)) else fmt(value)))
  return out


def infer_autoencoder_config(state_dict: dict[str, np.ndarray], *, norm_groups: int = 32,
                             resolution: int = 256) -> AutoencoderConfig:
  """Reads the architecture off a diffusers-named state dict's names and shapes.

  GroupNorm's group count and the training resolution are not stored in the weights; they default
  to SD's (32 groups, 256 px).
  """
  sd = state_dict
  try:
    ch, cin = sd["encoder.conv_in.weight"].shape[:2]
    levels = sorted({int(m.group(1)) for k in sd
                     for m in [re.match(r"^encoder\.down_blocks\.(\d+)\.", k)] if m})
    mult = tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] // ch
                 for i in levels)
    blocks = {int(m.group(1)) for k in sd
              for m in [re.match(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)] if m}
    z = sd["post_quant_conv.weight"].shape[0]
    attn = tuple(resolution // 2 ** i for i in levels
                 if any(k.startswith(f"encoder.down_blocks.{i}.attentions.") for k in sd))
    return AutoencoderConfig(
        in_channels=int(cin), out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        ch=int(ch), ch_mult=mult, num_res_blocks=len(blocks), attn_resolutions=attn,
        mid_attention="encoder.mid_block.attentions.0.to_q.weight" in sd, z_channels=int(z),
        double_z=sd["encoder.conv_out.weight"].shape[0] == 2 * z, resolution=resolution,
        norm_groups=norm_groups)
  except (KeyError, IndexError) as e:
    raise ConversionError(f"cannot read the architecture off these weights: missing {e}; is this "
                          "a KL autoencoder (AutoencoderKL / LDM first stage)?") from e


def describe(model_cfg: AutoencoderConfig) -> str:
  """The architecture fields of `model_cfg` in one line, for error messages."""
  return (f"ch={model_cfg.ch}, ch_mult={tuple(model_cfg.ch_mult)}, num_res_blocks="
          f"{model_cfg.num_res_blocks}, z_channels={model_cfg.z_channels}, mid_attention="
          f"{model_cfg.mid_attention}, attn_resolutions={tuple(model_cfg.attn_resolutions)}")
