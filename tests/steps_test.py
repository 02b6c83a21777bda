"""steps: the pure train step — LDM's adaptive weight, before and after disc.start_step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from vae_scale.training import losses
from vae_scale.training import steps
from vae_scale.training import step_parts
from vae_scale.training import train_state
from vae_scale.data import pipeline


def _gan_config(**kw):
  return tiny_config(**{"disc.enabled": True, "disc.filters": 8, "disc.n_layers": 2,
                        "image_size": 32, "ema_decay": 0.9, **kw})


def _setup(config, adversarial):
  import dataclasses  # pylint: disable=g-import-not-at-top
  cfg, init = train_state.build(config, with_disc=True)
  cfg = dataclasses.replace(cfg, adversarial=adversarial)
  assert config.ema_decay > 0
  state = init(jax.random.key(0))
  batch = next(iter(pipeline.create_train_dataset(config, 0, 1)))
  return cfg, state, {"image": jnp.asarray(batch["image"])}


@pytest.mark.slow
def test_adaptive_weight_equals_direct_gradient_norms():
  config = _gan_config()
  cfg, state, batch = _setup(config, True)
  x = batch["image"]
  model = nnx.merge(cfg.graphdef, state.params)
  rng = jax.random.key(3)
  recon, _, h = model.forward_with_features(x, rng)
  rec_g, g_g = step_parts.last_layer_grads(cfg, x, h, recon, state.params, state.disc_params,
                                      state.disc_stats)

  # Direct: full gradients through the whole autoencoder, then take the last kernel's entry.
  def direct(loss_of_recon):
    def f(params):
      r, _, _ = nnx.merge(cfg.graphdef, params).forward_with_features(x, rng)
      return loss_of_recon(r)
    return jax.grad(f)(state.params)["decoder"]["conv_out"]["kernel"]
  rec_fn = lambda r: losses.l1_loss(x, r) + config.loss.ssim_weight * losses.ssim_loss(x, r)
  g_fn = lambda r: losses.generator_loss(
      step_parts.discriminate(cfg, state.disc_params, state.disc_stats, r)[0])
  want_rec, want_g = direct(rec_fn), direct(g_fn)
  np.testing.assert_allclose(np.asarray(rec_g), np.asarray(want_rec), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_g), np.asarray(want_g), rtol=1e-4, atol=1e-7)
  d_weight = float(losses.adaptive_weight(rec_g, g_g, 0.5))
  want = np.linalg.norm(np.asarray(want_rec)) / (np.linalg.norm(np.asarray(want_g)) + 1e-4)
  assert d_weight == pytest.approx(0.5 * min(max(want, 0.0), 1e4), rel=1e-4)


@pytest.mark.slow
def test_adaptive_weight_is_taken_on_the_whole_reconstruction_term_with_lpips(tmp_path):
  """With LPIPS in the loss, d_weight's numerator is the gradient of L1 + LPIPS (as taming takes
  it on nll_loss), not of L1 alone."""
  import feature_nets  # pylint: disable=g-import-not-at-top
  from vae_scale.models import frozen_weights  # pylint: disable=g-import-not-at-top
  from vae_scale.models import lpips  # pylint: disable=g-import-not-at-top
  path, _ = feature_nets.lpips_files(feature_nets.torch_lpips(), str(tmp_path))
  lpips_params = frozen_weights.load_lpips_params(path)
  config = _gan_config(**{"loss.perceptual_weight": 1.0, "loss.lpips_weights": path,
                          "loss.reduction": "ldm_sum", "loss.ssim_weight": 0.0})
  cfg, state, batch = _setup(config, True)
  x = batch["image"]
  model = nnx.merge(cfg.graphdef, state.params)
  rng = jax.random.key(3)
  recon, _, h = model.forward_with_features(x, rng)
  rec_g, _ = jax.jit(step_parts.last_layer_grads, static_argnums=0)(
      cfg, x, h, recon, state.params, state.disc_params, state.disc_stats, lpips_params)

  def direct(loss_of_recon):  # Through the whole autoencoder, then the last kernel's entry.
    def f(params):
      r, _, _ = nnx.merge(cfg.graphdef, params).forward_with_features(x, rng)
      return loss_of_recon(r)
    return np.asarray(jax.jit(jax.grad(f))(state.params)["decoder"]["conv_out"]["kernel"])
  # LDM's nll: sum over pixels of |x - x_hat| + LPIPS per image broadcast, / B.
  ldm_nll = lambda r: (jnp.sum(jnp.abs(x - r)) + 32 * 32 * 3 * jnp.sum(
      lpips.lpips_distance(lpips_params, r, x))) / x.shape[0]
  want, l1_only = direct(ldm_nll), direct(lambda r: jnp.sum(jnp.abs(x - r)) / x.shape[0])
  # Two summation orders of the same float32 gradient (the LPIPS term is summed over 3,072
  # positions of magnitude ~100): entries near 0 carry ~1e-4 of the largest entry as rounding.
  np.testing.assert_allclose(np.asarray(rec_g), want, rtol=1e-3,
                             atol=2e-4 * float(np.max(np.abs(want))))
  assert np.linalg.norm(want - l1_only) > 0.05 * np.linalg.norm(l1_only)


@pytest.mark.slow
def test_before_disc_start_discriminator_is_untouched_and_loss_is_non_adversarial():
  config = _gan_config()
  cfg, state, batch = _setup(config, False)
  new, m = jax.jit(functools.partial(steps.train_step, cfg=cfg))(state, batch)
  jax.tree.map(np.testing.assert_array_equal, state.disc_params, new.disc_params)
  jax.tree.map(np.testing.assert_array_equal, state.disc_stats, new.disc_stats)
  values = m.compute()
  assert float(values["g_loss"]) == 0.0 and float(values["disc_factor"]) == 0.0
  # The total equals the pure autoencoder loss recomputed independently.
  model = nnx.merge(cfg.graphdef, state.params)
  rng = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0))[0]
  recon, post = model(batch["image"], rng)
  loss, _ = losses.autoencoder_loss(batch["image"], recon, post, l1_weight=1.0,
                                    ssim_weight=config.loss.ssim_weight,
                                    kl_weight=config.loss.kl_weight)
  assert float(values["loss"]) == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.slow
def test_after_disc_start_both_networks_change_and_metrics_are_logged():
  config = _gan_config()
  cfg, state, batch = _setup(config, True)
  new, m = jax.jit(functools.partial(steps.train_step, cfg=cfg))(state, batch)
  changed = lambda a, b: any(not np.array_equal(np.asarray(x), np.asarray(y))
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert changed(state.params, new.params)
  assert changed(state.disc_params, new.disc_params)
  assert changed(state.disc_stats, new.disc_stats)
  assert changed(state.ema_params, new.ema_params)
  v = m.compute()
  assert float(v["disc_factor"]) == 1.0 and float(v["d_weight"]) > 0
  assert float(v["d_loss"]) > 0 and 0 <= float(v["disc_accuracy"]) <= 1
  for k in ("g_loss", "logits_real", "logits_fake"):
    assert np.isfinite(float(v[k]))
  # EMA moved 10% of the way towards the new parameters.
  e0, p1, e1 = (jax.tree.leaves(t)[0] for t in (state.ema_params, new.params, new.ema_params))
  np.testing.assert_allclose(np.asarray(e1), 0.9 * np.asarray(e0) + 0.1 * np.asarray(p1),
                             rtol=1e-5, atol=1e-7)
