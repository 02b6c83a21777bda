"""Config validation: every mistake is one clear line naming the field and the rule."""

import pytest

from conftest import load_config
from vae_scale.config import schema


@pytest.mark.parametrize("name", ["ldm_f8", "demo"])
def test_shipped_configs_are_valid(name):
  config = load_config(name)
  if name == "ldm_f8":
    config.data.path = "/data/images"  # The recipe has no default dataset path.
  schema.validate(config, num_devices=8)


def _bad(mutate):
  config = load_config("demo")
  mutate(config)
  with pytest.raises(schema.ConfigError) as err:
    schema.validate(config, num_devices=8)
  msg = str(err.value)
  assert "\n" not in msg
  return msg


def test_image_size_not_divisible_by_downsampling():
  msg = _bad(lambda c: setattr(c, "image_size", 62))  # The demo downsamples by 4.
  assert msg.startswith("config.image_size:") and "divisible" in msg and "4" in msg


def test_channels_not_divisible_by_groups():
  msg = _bad(lambda c: setattr(c.model, "ch", 20))
  assert msg.startswith("config.model.ch:") and "norm_groups" in msg


def test_negative_weight():
  msg = _bad(lambda c: setattr(c.loss, "ssim_weight", -0.1))
  assert msg.startswith("config.loss.ssim_weight:") and ">= 0" in msg


def test_unknown_field():
  def add(c):
    c.unlock()
    c.loss.l3_weight = 1.0
  msg = _bad(add)
  assert msg.startswith("config.loss.l3_weight:") and "unknown" in msg


def test_batch_not_divisible_by_devices():
  msg = _bad(lambda c: setattr(c, "global_batch_size", 12))
  assert msg.startswith("config.global_batch_size:") and "8 devices" in msg


def test_bad_choices_and_ranges():
  assert "disc.loss" in _bad(lambda c: setattr(c.disc, "loss", "wasserstein"))
  assert "disc.start_step" in _bad(lambda c: setattr(c.disc, "start_step", -1))
  assert "ema_decay" in _bad(lambda c: setattr(c, "ema_decay", 1.0))
  assert "data.path" in _bad(lambda c: (setattr(c.data, "source", "folder"),
                                        setattr(c.data, "path", "")))


@pytest.mark.parametrize("name", ["ldm_f8_lpips", "sd_ft_mse"])
def test_loss_recipes_are_valid_with_their_files(name):
  config = load_config(name)
  config.data.path = "/data/images"
  config.loss.lpips_weights = "lpips_vgg.safetensors"  # Placeholders: validate reads no file.
  if name == "sd_ft_mse":
    config.init_from = "/models/sd-vae"
  schema.validate(config, num_devices=8)


def test_ldm_f8_lpips_is_ldms_loss():
  c = load_config("ldm_f8_lpips")
  assert (c.loss.reduction, c.loss.l1_weight, c.loss.perceptual_weight, c.loss.kl_weight) == (
      "ldm_sum", 1.0, 1.0, 1e-6)
  assert c.loss.ssim_weight == 0 and c.loss.l2_weight == 0
  assert c.disc.enabled and c.disc.loss == "hinge" and c.disc.weight == 0.5
  assert c.disc.start_step == load_config("ldm_f8").disc.start_step
  assert (c.optimizer.b1, c.optimizer.b2, c.disc.b1, c.disc.b2) == (0.5, 0.9, 0.5, 0.9)
  assert c.optimizer.learning_rate == c.disc.learning_rate == 4.5e-6 * c.global_batch_size


def test_sd_ft_mse_is_a_decoder_fine_tune_on_mse_and_lpips():
  c = load_config("sd_ft_mse")
  assert c.freeze_encoder and c.ema_decay > 0 and c.global_batch_size == 192
  assert (c.loss.l2_weight, c.loss.perceptual_weight, c.loss.l1_weight, c.loss.ssim_weight) == (
      1.0, 0.1, 0.0, 0.0)


def _recipe_error(name, **fields) -> str:
  config = load_config(name)
  config.data.path = "/data/images"
  for key, value in fields.items():
    node, leaf = (config.loss, key[5:]) if key.startswith("loss_") else (config, key)
    setattr(node, leaf, value)
  with pytest.raises(schema.ConfigError) as err:
    schema.validate(config, num_devices=8)
  assert "\n" not in str(err.value)
  return str(err.value)


def test_perceptual_weight_without_lpips_weights_names_the_field_and_the_command():
  msg = _recipe_error("ldm_f8_lpips")
  assert msg.startswith("config.loss.lpips_weights: empty")
  assert "loss.perceptual_weight=1.0" in msg
  assert "python -m vae_scale.convert lpips --out=" in msg


def test_freeze_encoder_without_init_from_is_refused():
  msg = _recipe_error("sd_ft_mse", loss_lpips_weights="lpips_vgg.safetensors")
  assert msg.startswith("config.init_from: empty") and "freeze_encoder" in msg


def test_evaluation_needs_neither_training_file():
  config = load_config("sd_ft_mse")
  config.data.path = "/data/images"
  schema.validate(config, num_devices=8, training=False)


def test_new_loss_fields_are_checked():
  assert "loss.reduction" in _bad(lambda c: setattr(c.loss, "reduction", "sum"))
  assert "loss.l2_weight" in _bad(lambda c: setattr(c.loss, "l2_weight", -1.0))
  assert "loss.perceptual_weight" in _bad(lambda c: setattr(c.loss, "perceptual_weight", -1.0))
  msg = _bad(lambda c: (setattr(c, "image_size", 8), setattr(c.model, "ch_mult", (1,)),
                        setattr(c.loss, "perceptual_weight", 1.0),
                        setattr(c.loss, "lpips_weights", "x.safetensors")))
  assert msg.startswith("config.image_size:") and "16" in msg


# --------------------------------------------------------------------------- diffusability


@pytest.mark.parametrize("name,arg", [("vavae_f16d32", "stage1"), ("vavae_f16d32", "stage2"),
                                      ("vavae_f16d32", "stage3"), ("eq_vae_ft", None),
                                      ("eq_vae_ft", "code_scales")])
def test_diffusability_recipes_are_valid_with_their_files(name, arg):
  config = load_config(name, arg)
  config.data.path = "/data/images"
  config.loss.lpips_weights = "lpips_vgg.safetensors"  # Placeholders: validate reads no file.
  config.loss.vf_weights = "dinov2_l14.safetensors" if name == "vavae_f16d32" else ""
  config.init_from = "/models/sd-vae" if name == "eq_vae_ft" else ""
  schema.validate(config, num_devices=8)


def test_vavae_stages_are_lightningdits():
  stages = {s: load_config("vavae_f16d32", s) for s in ("stage1", "stage2", "stage3")}
  for c in stages.values():
    assert (tuple(c.model.ch_mult), c.model.z_channels, tuple(c.model.attn_resolutions)) == (
        (1, 1, 2, 2, 4), 32, (16,))
    assert (c.loss.reduction, c.loss.l1_weight, c.loss.perceptual_weight, c.loss.kl_weight) == (
        "ldm_sum", 1.0, 1.0, 1e-6)
    assert c.loss.vf_feature_dim == 1024 and c.loss.vf_adaptive and c.loss.vf_pos_antialias
    assert c.loss.vf_normalize == "none" and c.loss.equivariance_weight == 0
    assert c.optimizer.learning_rate == c.disc.learning_rate == 1e-4 and c.ema_decay == 0
    assert (c.optimizer.b1, c.optimizer.b2) == (0.5, 0.9) and c.global_batch_size == 256
  got = [(c.loss.vf_weight, c.loss.vf_margin_cos, c.loss.vf_margin_distmat, c.disc.start_step)
         for c in stages.values()]
  assert got == [(0.5, 0.0, 0.0, 2_501), (0.1, 0.0, 0.0, 1), (0.1, 0.5, 0.25, 1)]
  with pytest.raises(ValueError, match="stage1, stage2, stage3"):
    load_config("vavae_f16d32", "stage4")


def test_eq_vae_ft_is_eq_vaes_fine_tune():
  c = load_config("eq_vae_ft")
  assert (c.loss.equivariance_weight, c.loss.equivariance_prob,
          c.loss.equivariance_low_res_prob) == (1.0, 0.5, 0.25)
  assert tuple(c.loss.equivariance_rotations) == (1, 2, 3) and not c.freeze_encoder
  assert tuple(c.loss.equivariance_scales) == (0.25, 0.5, 0.75)
  assert len(load_config("eq_vae_ft", "code_scales").loss.equivariance_scales) == 24
  assert c.disc.enabled and c.disc.start_step == 0 and c.loss.vf_weight == 0
  assert c.optimizer.learning_rate == pytest.approx(7.2e-4)


def _loss(image_size=None, ch_mult=None, **loss):
  """A mutation of the demo: loss fields set, and the image size and levels when given."""
  def mutate(c):
    if image_size:
      c.image_size, c.model.ch_mult = image_size, ch_mult
    for key, value in loss.items():
      setattr(c.loss, key, value)
  return mutate


def _vf(**kw):
  """The demo at 64 px as an f16 model with the VF loss on (its weights a placeholder)."""
  return _loss(64, (1, 1, 1, 1, 1), **{"vf_weight": 0.5, "vf_weights": "dinov2.safetensors",
                                       **kw})


def test_vf_rules():
  config = load_config("demo")
  _vf()(config)
  schema.validate(config, num_devices=8)
  msg = _bad(_vf(vf_weights=""))
  assert msg.startswith("config.loss.vf_weights: empty") and "convert dinov2" in msg
  assert "facebook/dinov2-large" in msg
  # The demo's f4 latent grid (16x16 at 64 px) would need DINOv2 at 224 px from 64 px images.
  msg = _bad(lambda c: (_vf()(c), setattr(c.model, "ch_mult", (1, 2, 4))))
  assert msg.startswith("config.model.ch_mult:") and "downsamples by 4" in msg
  assert "224 px" in msg and "divisible by 16" in msg
  msg = _bad(_vf(equivariance_weight=1.0))
  assert msg.startswith("config.loss.equivariance_weight:") and "separate recipes" in msg
  assert "loss.vf_margin_cos" in _bad(_vf(vf_margin_cos=2.0))
  assert "loss.vf_normalize" in _bad(_vf(vf_normalize="clip"))
  assert "loss.vf_feature_dim" in _bad(_vf(vf_feature_dim=0))
  # Evaluation reads no DINOv2 file.
  config = load_config("demo")
  _vf(vf_weights="")(config)
  schema.validate(config, num_devices=8, training=False)


def _eq(**kw):  # The demo: 64 px, f4, a 16x16 latent.
  return _loss(**{"equivariance_weight": 1.0, **kw})


def test_equivariance_rules():
  config = load_config("demo")
  _eq()(config)
  schema.validate(config, num_devices=8)  # Scales (0.25, 0.5, 0.75): 16 px and up.
  msg = _bad(_eq(equivariance_scales=(0.3, 0.5)))
  assert msg.startswith("config.loss.equivariance_scales: 0.3 does not map the 16x16 latent")
  assert "k/16" in msg
  msg = _bad(_eq(equivariance_scales=(0.125,)))  # 8 px images: below SSIM's window.
  assert msg.startswith("config.loss.equivariance_scales: the smallest scale 0.125 makes 8 px")
  assert "11 px" in msg and "k/16 with k >= 3" in msg
  msg = _bad(lambda c: (_eq()(c), setattr(c.disc, "enabled", True)))  # 3-layer PatchGAN: 24 px.
  assert "16 px" in msg and "24 px" in msg and "PatchGAN" in msg
  msg = _bad(lambda c: (_eq()(c), setattr(c.loss, "perceptual_weight", 1.0),
                        setattr(c.loss, "lpips_weights", "x"),
                        setattr(c.loss, "equivariance_scales", (0.1875, 0.5))))
  assert "12 px" in msg and "LPIPS" in msg
  assert "loss.equivariance_prob: must be <= 1" in _bad(_eq(equivariance_prob=1.5))
  assert "loss.equivariance_rotations" in _bad(_eq(equivariance_rotations=(4,)))
  assert "loss.equivariance_scales" in _bad(_eq(equivariance_scales=("half",)))
  assert "loss.equivariance_weight" in _bad(_eq(equivariance_weight=-1.0))
