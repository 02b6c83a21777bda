"""training.diffusability: the VF loss and EQ-VAE's views wired into the train step, checked against
direct computations (numpy's LightningDiT formulas, full gradients, numpy transforms); the VF
projection through the run (trained, checkpointed, carried by init_from, never exported)."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import feature_nets
from conftest import tiny_config
from vae_scale.data import pipeline
from vae_scale.models import dinov2
from vae_scale.models import frozen_weights
from vae_scale.run import checkpoints
from vae_scale.run import loop
from vae_scale.run import state_tree
from vae_scale.training import diffusability
from vae_scale.training import equivariance
from vae_scale.training import losses
from vae_scale.training import steps
from vae_scale.training import train_state
from vae_scale.training import vf_loss

WIDTH = 16  # The tiny DINOv2's width.


@pytest.fixture(scope="module")
def dinov2_path(tmp_path_factory):
  # Position embeddings for a 5x5 grid, resampled (with antialias) to the 4x4 latent grid.
  return feature_nets.dinov2_file(tmp_path_factory.mktemp("dinov2") / "d.safetensors", WIDTH,
                                  image_size=70)


def vf_config(path, **kw):
  """An f16 tiny model at 64 px (a 4x4 latent, DINOv2 at 56 px) with the VF loss."""
  return tiny_config(**{"image_size": 64, "model.ch_mult": (1, 1, 1, 1, 1),
                        "loss.vf_weight": 0.5, "loss.vf_weights": path,
                        "loss.vf_feature_dim": WIDTH, **kw})


def _batch(config):
  return jnp.asarray(next(iter(pipeline.create_train_dataset(config, 0, 1)))["image"])


def _numpy_vf(z_proj, features, margin_cos, margin_distmat):
  """LightningDiT's vf (contperceptual.py) in numpy float64 on [B, h, w, D] arrays."""
  a = np.asarray(z_proj, np.float64).reshape(z_proj.shape[0], -1, z_proj.shape[-1])
  b = np.asarray(features, np.float64).reshape(a.shape[0], -1, features.shape[-1])
  unit = lambda v, eps: v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), eps)
  gram = lambda v: np.einsum("bid,bjd->bij", unit(v, 1e-12), unit(v, 1e-12))
  distmat = np.mean(np.maximum(np.abs(gram(a) - gram(b)) - margin_distmat, 0.0))
  cos = np.sum(unit(a, 1e-8) * unit(b, 1e-8), axis=-1)
  return distmat + np.mean(np.maximum(1.0 - margin_cos - cos, 0.0))


@pytest.fixture(scope="module")
def vf_step(dinov2_path):
  """One VF train step from a fresh state: (config, cfg, state, new state, metrics, x, DINOv2)."""
  config = vf_config(dinov2_path, **{"loss.vf_margin_cos": 0.1, "loss.vf_margin_distmat": 0.05})
  params, dcfg = frozen_weights.load_vf_dinov2(config)
  cfg, init = train_state.build(config, dinov2_cfg=dcfg)
  state = init(jax.random.key(0))
  x = _batch(config)
  new, m = jax.jit(functools.partial(steps.train_step, cfg=cfg))(
      state, {"image": x}, None, None, params)
  return config, cfg, state, new, {k: float(v) for k, v in m.compute().items()}, x, params


@pytest.mark.slow
def test_vf_step_equals_lightningdits_loss_and_adaptive_weight_at_encoder_conv_out(vf_step):
  config, cfg, state, _, v, x, dparams = vf_step
  sample_rng = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0))[0]
  feats = dinov2.dinov2_features(dparams, cfg.dinov2_cfg, dinov2.preprocess(x, (4, 4))).patches
  assert cfg.dinov2_cfg.pos_antialias  # loss.vf_pos_antialias, LightningDiT's (timm's).
  model = lambda p: nnx.merge(cfg.graphdef, p)
  z = model(state.params).encode(x).sample(sample_rng)
  z_proj = np.asarray(z, np.float64) @ np.asarray(state.vf_proj, np.float64)
  want_vf = _numpy_vf(z_proj, np.asarray(feats), 0.1, 0.05)
  assert v["vf_loss"] == pytest.approx(want_vf, rel=1e-4)

  # The adaptive weight from full gradients through the whole autoencoder, read at the encoder's
  # last conv kernel: ||d nll / dW|| / (||d vf / dW|| + 1e-4) x vf_weight.
  def rec(p):
    recon, _ = model(p)(x, sample_rng)
    return losses.reconstruction_loss(x, recon, l1_weight=1.0, ssim_weight=0.5)[0]

  def vf(p):
    zs = model(p).encode(x).sample(sample_rng)
    return vf_loss.vf_loss(vf_loss.project(state.vf_proj, zs), feats, cfg.vf)[0]

  at_w = lambda g: np.asarray(g["encoder"]["conv_out"]["kernel"])
  g_rec, g_vf = at_w(jax.grad(rec)(state.params)), at_w(jax.grad(vf)(state.params))
  want_w = 0.5 * np.linalg.norm(g_rec) / (np.linalg.norm(g_vf) + 1e-4)
  assert v["vf_weight"] == pytest.approx(want_w, rel=1e-3)
  # The total: reconstruction + KL + weight * vf.
  recon, post = model(state.params)(x, sample_rng)
  base, _ = losses.autoencoder_loss(x, recon, post, l1_weight=1.0, ssim_weight=0.5,
                                    kl_weight=config.loss.kl_weight)
  assert v["loss"] == pytest.approx(float(base) + want_w * want_vf, rel=1e-4)


@pytest.mark.slow
def test_vf_projection_trains_with_the_params_and_dinov2_is_not_state(vf_step):
  _, _, state, new, v, _, dparams = vf_step
  assert new.vf_proj.shape == (4, WIDTH) and np.isfinite(v["loss"])
  assert not np.array_equal(np.asarray(state.vf_proj), np.asarray(new.vf_proj))
  names = state_tree.leaf_shapes(new)
  assert [n for n in names if "vf_proj" in n and "/mu/" in n]  # Adam's moments of it.
  assert not any("patch_embed" in n or "layer_scale" in n for n in names)
  dinov2_size = sum(np.size(a) for a in dparams.values())
  assert dinov2_size > 0 and sum(np.prod(s) for n, s in names.items() if n.startswith(
      ("params/", "vf_proj"))) == sum(np.size(a) for a in jax.tree.leaves(new.trainable()))


def _block_mean(a):
  """torch's bilinear down-scaling by exactly 1/2 (align_corners=False): the 2x2 block means."""
  a = np.asarray(a, np.float64)
  return a.reshape(a.shape[0], a.shape[1] // 2, 2, a.shape[2] // 2, 2, a.shape[3]).mean((2, 4))


def _eq_step(**kw):
  """One step of a tiny f2 model (32 px, a 16x16 latent) with EQ-VAE's term at scale 1/2."""
  config = tiny_config(**{"image_size": 32, "loss.equivariance_weight": 1.0,
                          "loss.equivariance_scales": (0.5,), **kw})
  cfg, init = train_state.build(config)
  state = init(jax.random.key(0))
  # The program of the view step 0 draws, as the loop picks it (programs.TrainPrograms.step_at).
  cfg = dataclasses.replace(cfg, view=diffusability.view_at(cfg.equivariance,
                                                            np.asarray(state.rng), 0))
  x = _batch(config)
  _, m = jax.jit(functools.partial(steps.train_step, cfg=cfg))(state, {"image": x})
  sample_rng = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0))[0]
  return config, cfg, state, x, {k: float(v) for k, v in m.compute().items()}, sample_rng


@pytest.mark.slow
def test_a_tau_step_reconstructs_the_transformed_image_from_the_transformed_latent():
  config, cfg, state, x, v, rng = _eq_step(**{"loss.equivariance_prob": 1.0,
                                              "loss.equivariance_rotations": (3,)})
  assert v["eq_tau_steps"] == 1.0 and v["eq_low_res_steps"] == 0.0
  model = nnx.merge(cfg.graphdef, state.params)
  post = model.encode(x)
  z = np.asarray(post.sample(rng))
  turn = lambda a: np.rot90(a, 3, axes=(2, 1))  # torch.rot90(k, dims=[-1, -2]) on NHWC.
  z_t, x_t = turn(_block_mean(z)), jnp.asarray(turn(_block_mean(x)), jnp.float32)
  recon = model.decode(jnp.asarray(z_t, jnp.float32))
  rec, _ = losses.reconstruction_loss(x_t, recon, l1_weight=1.0, ssim_weight=0.5)
  want = float(rec) + config.loss.kl_weight * float(losses.kl_term(post))
  assert v["loss"] == pytest.approx(want, rel=1e-5)
  assert v["psnr"] == pytest.approx(float(jnp.mean(losses.psnr(x_t, recon))), rel=1e-5)


@pytest.mark.slow
def test_a_low_resolution_step_reconstructs_the_down_scaled_image():
  config, cfg, state, x, v, rng = _eq_step(**{"loss.equivariance_prob": 0.0,
                                              "loss.equivariance_low_res_prob": 1.0})
  assert v["eq_low_res_steps"] == 1.0 and v["eq_tau_steps"] == 0.0
  x_low = jnp.asarray(_block_mean(x), jnp.float32)
  recon, post = nnx.merge(cfg.graphdef, state.params)(x_low, rng)
  loss, _ = losses.autoencoder_loss(x_low, recon, post, l1_weight=1.0, ssim_weight=0.5,
                                    kl_weight=config.loss.kl_weight)
  assert v["loss"] == pytest.approx(float(loss), rel=1e-5)


def test_views_and_the_host_draw_of_each_step():
  cfg = equivariance.EquivarianceConfig(scales=(0.25, 0.5), rotations=(1, 2, 3))
  assert [v.name for v in equivariance.views(cfg)] == ["plain", "tau0.25", "tau0.5", "low0.25",
                                                        "low0.5"]
  rng = np.asarray(jax.random.key_data(jax.random.key(7)))
  drawn = [diffusability.view_at(cfg, rng, s) for s in range(400)]
  assert drawn == [diffusability.view_at(cfg, rng, s) for s in range(400)]  # Pure in the key.
  # The draw the step makes in its program from its key (steps.train_step), step by step.
  step_key = lambda s: jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(rng)), s)
  for s in range(0, 400, 37):
    t = jax.jit(diffusability.transform_of, static_argnums=1)(step_key(jnp.int32(s)), cfg)
    assert equivariance.view_of(jax.device_get(t), cfg) == drawn[s]
  share = lambda kind: np.mean([v.kind == kind for v in drawn])
  assert abs(share(equivariance.EQUIVARIANT) - 0.5) < 0.08
  assert abs(share(equivariance.LOW_RES) - 0.5 * 0.25) < 0.06
  assert {v.scale for v in drawn if v.kind == equivariance.EQUIVARIANT} == {0.25, 0.5}


def test_a_traced_rotation_is_the_static_one():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  for k in range(4):
    np.testing.assert_array_equal(np.asarray(jax.jit(equivariance.rotate)(x, jnp.int32(k))),
                                  np.rot90(np.asarray(x), k, axes=(2, 1)))


@pytest.mark.slow
def test_a_run_with_the_eq_term_resumes_bit_for_bit(tmp_path):
  config = lambda steps: tiny_config(**{"image_size": 32, "loss.equivariance_weight": 1.0,
                                        "loss.equivariance_scales": (0.5,),
                                        "num_train_steps": steps, "checkpoint_every_steps": 2})
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  loop.train_and_evaluate(config(4), straight)
  loop.train_and_evaluate(config(2), resumed)
  loop.train_and_evaluate(config(4), resumed)
  a, b = (checkpoints.read_state(w, 4, keys=("params", "opt_state"))[0]
          for w in (straight, resumed))
  for name, leaf in state_tree.flat(a).items():
    np.testing.assert_array_equal(leaf, state_tree.flat(b)[name], err_msg=name)


# --------------------------------------------------------------------------- through the run


@pytest.fixture(scope="module")
def vf_run(tmp_path_factory, dinov2_path):
  """2 steps of the VF loss (checkpoint at 2); returns (workdir, config)."""
  workdir = str(tmp_path_factory.mktemp("vf_run"))
  config = vf_config(dinov2_path, num_train_steps=2, checkpoint_every_steps=2)
  loop.train_and_evaluate(config, workdir)
  return workdir, config


@pytest.mark.slow
def test_the_projection_is_checkpointed_and_never_exported(vf_run, tmp_path):
  from vae_scale.interop import safetensors_io  # pylint: disable=g-import-not-at-top
  from vae_scale.models import AutoencoderConfig  # pylint: disable=g-import-not-at-top
  from vae_scale.tools import convert  # pylint: disable=g-import-not-at-top
  workdir, config = vf_run
  proj = checkpoints.read_projection(workdir)
  assert proj.shape == (4, WIDTH) and np.all(np.isfinite(proj))
  stored = state_tree.leaf_shapes(checkpoints.stored_tree(checkpoints.directory(workdir), 2))
  assert "vf_proj" in stored and not any("patch_embed" in n for n in stored)
  model_cfg = AutoencoderConfig.from_config(config)
  out = str(tmp_path / "vae.safetensors")
  convert.run_export(out, model_cfg=model_cfg, workdir=workdir, fmt="ldm")
  exported = safetensors_io.read_safetensors(out)
  params = checkpoints.read_params(workdir, model_cfg)[0]
  assert len(exported) == len(jax.tree.leaves(params))
  assert not any("vf" in k or (4, WIDTH) == np.shape(v) for k, v in exported.items())


@pytest.mark.slow
def test_evaluate_reports_the_vf_cosine_and_the_spectral_share(vf_run, dinov2_path):
  from vae_scale.tools import evaluate  # pylint: disable=g-import-not-at-top
  workdir, config = vf_run
  result = evaluate.run(config, workdir, output_dir=os.path.join(workdir, "ev"))
  assert -1.0 <= result["vf_cosine"] <= 1.0 and 0.0 <= result["latent_hf_share"] <= 1.0
  assert len(result["latent_mean_per_channel"]) == len(result["latent_std_per_channel"]) == 4
  plain = evaluate.run(config, workdir, output_dir=os.path.join(workdir, "ev2"),
                       dinov2_weights="")
  assert plain["vf_cosine"] is None
  assert plain["latent_hf_share"] == pytest.approx(result["latent_hf_share"], rel=1e-6)


@pytest.mark.slow
def test_a_next_stage_from_init_from_carries_the_projection(vf_run, dinov2_path, tmp_path):
  workdir, _ = vf_run
  lr = 1e-5
  config = vf_config(dinov2_path, num_train_steps=1, checkpoint_every_steps=1,
                     init_from=workdir, **{"loss.vf_weight": 0.1, "optimizer.learning_rate": lr})
  loop.train_and_evaluate(config, str(tmp_path / "stage2"))
  before, after = checkpoints.read_projection(workdir), checkpoints.read_projection(
      str(tmp_path / "stage2"))
  # Adam's first step moves every entry by at most the learning rate: a fresh init would differ
  # by the init's scale (1/sqrt(4)).
  assert np.max(np.abs(after - before)) <= lr * 1.01


@pytest.mark.slow
def test_switching_the_vf_loss_off_and_on_at_resume_drops_then_restarts_the_projection(
    vf_run, dinov2_path, tmp_path, caplog):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(vf_run[0], workdir)
  off = vf_config(dinov2_path, num_train_steps=4, checkpoint_every_steps=2,
                  **{"loss.vf_weight": 0.0})
  with caplog.at_level("INFO"):
    loop.train_and_evaluate(off, workdir)
  assert "loss.vf_weight 0.5 -> 0.0: VF loss turned off" in caplog.text
  assert checkpoints.read_projection(workdir, 4) is None
  assert checkpoints.read_projection(workdir, 2) is not None  # Older checkpoints keep it.
  # And on again: a fresh projection (the one of step 2 is not the newest checkpoint's).
  on = vf_config(dinov2_path, num_train_steps=6, checkpoint_every_steps=2)
  caplog.clear()
  with caplog.at_level("INFO"):
    loop.train_and_evaluate(on, workdir)
  assert "loss.vf_weight 0.0 -> 0.5: VF loss turned on" in caplog.text
  assert checkpoints.read_projection(workdir, 6).shape == (4, WIDTH)


def test_a_dinov2_file_of_another_width_is_one_line(dinov2_path):
  from vae_scale.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config = vf_config(dinov2_path, **{"loss.vf_feature_dim": 1024})
  with pytest.raises(ConfigError) as err:
    frozen_weights.load_vf_dinov2(config)
  msg = str(err.value)
  assert "\n" not in msg and msg.startswith("config.loss.vf_weights:")
  assert f"width {WIDTH}" in msg and "vf_feature_dim is 1024" in msg
  assert frozen_weights.load_vf_dinov2(tiny_config()) is None  # VF off: nothing read.


def test_step_config_carries_the_terms(dinov2_path):
  config = vf_config(dinov2_path, **{"loss.vf_pos_antialias": False})
  cfg, _ = train_state.build(config, dinov2_cfg=dataclasses.replace(
      frozen_weights.load_vf_dinov2(config)[1], pos_antialias=True))
  assert cfg.vf.weight == 0.5 and cfg.equivariance is None
  assert not cfg.dinov2_cfg.pos_antialias  # The config's choice wins over the file's.
  names = train_state.train_metric_names(4, vf=True, equivariant=True)
  assert set(train_state.VF_METRICS + train_state.EQUIVARIANCE_METRICS) <= set(names)
