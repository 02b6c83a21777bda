"""The config rules of the diffusability terms: VA-VAE's VF loss and EQ-VAE's equivariance term.

`check` is called by `schema.validate` once, up front: each broken rule is one ConfigError line
naming the field, before anything compiles. The rules:
- the VF loss and the equivariance term are not combined (separate recipes);
- the VF loss aligns the latent grid (image_size / f) with DINOv2's patch grid of the image resized
  to (image_size / f) x 14 px, so the autoencoder must downsample by f >= 14 (f16 and up: then
  every image_size divisible by f works; 256 px with f16 is LightningDiT's 224 px, 16 x 16 grid);
- every equivariance scale maps the latent to whole pixels (`check_transforms`);
- the smallest scaled image is large enough for the step's SSIM (11 px), LPIPS (16 px) and the
  PatchGAN (3 x 2**n_layers px).
"""

from __future__ import annotations

import types
from typing import Any

import ml_collections

from vae_scale.errors import ConfigError

DINOV2_PATCH = 14  # DINOv2's patch size: the VF loss's features come on a 14-px grid.
DINOV2_MODELS = {384: "facebook/dinov2-small", 768: "facebook/dinov2-base",
                 1024: "facebook/dinov2-large", 1536: "facebook/dinov2-giant"}  # By width.


def dinov2_model(width: int) -> str:
  """The released DINOv2 (without registers) of a width, for messages."""
  return DINOV2_MODELS.get(width, f"a DINOv2 of width {width}")


def _fail(field: str, rule: str) -> None:
  raise ConfigError(f"config.{field}: {rule}")


def check_transforms(cfg: Any, latent_size: int, field: str = "loss.equivariance") -> None:
  """One ConfigError line for a transform set the latent cannot take, before anything compiles.

  Args:
    cfg: the transform distribution (`training.equivariance.EquivarianceConfig`, or anything with
      its prob, low_res_prob, scales and rotations).
    latent_size: the latent's side (image_size / the autoencoder's downsampling factor).
    field: the config field prefix for messages.
  """
  def fail(name: str, rule: str) -> None:
    raise ConfigError(f"config.{field}_{name}: {rule}")

  for name, p in (("prob", cfg.prob), ("low_res_prob", cfg.low_res_prob)):
    if not 0.0 <= p <= 1.0:
      fail(name, f"{p} is not a probability in [0, 1]")
  if not cfg.scales:
    fail("scales", "empty; give at least one down-scaling factor, e.g. (0.25, 0.5, 0.75)")
  step = max(1, latent_size // 4)
  examples = ", ".join(f"{k / latent_size:g}" for k in range(step, latent_size + 1, step))
  for s in cfg.scales:
    size = s * latent_size
    if not 0.0 < s <= 1.0 or abs(size - round(size)) > 1e-9:
      fail("scales", f"{s} does not map the {latent_size}x{latent_size} latent to whole pixels "
           f"({s} x {latent_size} = {size:g}); use k/{latent_size} for k = 1 ... {latent_size}, "
           f"e.g. {examples}")
  if not cfg.rotations or any(k not in (0, 1, 2, 3) for k in cfg.rotations):
    fail("rotations", f"{cfg.rotations} must be a non-empty subset of quarter turns (0, 1, 2, 3)")


def smallest_inputs(config: ml_collections.ConfigDict) -> list[tuple[int, str]]:
  """(pixels, why) of the smallest images the step's terms take."""
  need = [(11, "the step's SSIM (an 11x11 window)")]
  if config.loss.perceptual_weight > 0:
    need.append((16, "LPIPS-VGG (its four 2x2 max pools)"))
  if config.disc.enabled:
    layers = config.disc.n_layers
    need.append((3 * 2 ** layers, f"the {layers}-layer PatchGAN (one patch logit)"))
  return need


def check(config: ml_collections.ConfigDict) -> None:
  """The rules of the module docstring (the fields' own types and bounds are checked before).

  Raises:
    ConfigError: one line naming the field, the rule and what works.
  """
  loss, image_size = config.loss, config.image_size
  factor = 2 ** (len(config.model.ch_mult) - 1)
  latent = image_size // factor
  if loss.vf_weight > 0 and loss.equivariance_weight > 0:
    _fail("loss.equivariance_weight", f"{loss.equivariance_weight} with loss.vf_weight="
          f"{loss.vf_weight}: VA-VAE's VF loss and EQ-VAE's term are separate recipes here "
          "(configs/vavae_f16d32.py, configs/eq_vae_ft.py); set one of them to 0")
  if loss.vf_weight > 0 and factor < DINOV2_PATCH:
    _fail("model.ch_mult", f"{tuple(config.model.ch_mult)} downsamples by {factor}, but "
          f"loss.vf_weight > 0 aligns the {latent}x{latent} latent grid with DINOv2's patch grid "
          f"of the image resized to {latent}x{DINOV2_PATCH} = {latent * DINOV2_PATCH} px (more "
          f"than the {image_size} px image): use an f16 autoencoder (5 levels, e.g. ch_mult "
          "(1, 1, 2, 2, 4)), with which every image_size divisible by 16 works (256 px -> "
          "DINOv2 at 224 px, a 16x16 grid, as LightningDiT)")
  if loss.equivariance_weight <= 0:
    return
  for name, kind in (("scales", (int, float)), ("rotations", int)):
    values = loss[f"equivariance_{name}"]
    if any(isinstance(v, bool) or not isinstance(v, kind) for v in values):
      _fail(f"loss.equivariance_{name}", f"{tuple(values)} must hold only numbers"
            if name == "scales" else f"{tuple(values)} must hold only quarter turns (ints)")
  eq = types.SimpleNamespace(
      prob=loss.equivariance_prob, low_res_prob=loss.equivariance_low_res_prob,
      scales=tuple(float(s) for s in loss.equivariance_scales),
      rotations=tuple(loss.equivariance_rotations))
  check_transforms(eq, latent)
  smallest = min(eq.scales)
  pixels = round(smallest * image_size)
  for size, why in smallest_inputs(config):
    if pixels < size:
      _fail("loss.equivariance_scales", f"the smallest scale {smallest:g} makes {pixels} px "
            f"images of the {image_size} px ones, below the {size} px that {why} needs; use "
            f"scales >= {size / image_size:g} (k/{latent} with k >= "
            f"{-(-size * latent // image_size)}) or a larger image_size")
