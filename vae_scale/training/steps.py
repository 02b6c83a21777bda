"""The pure, mesh-agnostic train step over a pytree TrainState (jitted with shardings by `programs`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vae_scale.training import accumulate
from vae_scale.training import diffusability
from vae_scale.training import losses
from vae_scale.training import step_parts
from vae_scale.training.train_state import StepConfig
from vae_scale.training.train_state import TrainState

Array = jax.Array


def train_step(state: TrainState, batch: dict[str, Array], lpips_params: Any = None,
               lr_scale: Array | None = None, dinov2_params: Any = None, *,
               cfg: StepConfig) -> tuple[TrainState, Any]:
  """One optimizer step of the autoencoder (and, when `cfg.adversarial`, of the discriminator).

  With EQ-VAE's term on (cfg.equivariance) this is the step of one view, cfg.view (plain, tau or
  low-resolution): the caller picks the program of the view the step's key draws
  (`diffusability.view_at`), and the step draws the tau rotation from the same key.

  Args:
    state: the train state (donated).
    batch: {'image': [B, H, W, 3] float32 in [-1, 1]}, the global batch.
    lpips_params: frozen LPIPS-VGG params (flat dict of arrays), an argument rather than state: they
      are never trained, checkpointed or given to the optimizer. None when the loss has no LPIPS.
    lr_scale: float32 scalar multiplying this step's learning rate (the guard's cautious steps
      after a rollback); None = 1.
    dinov2_params: frozen DINOv2 params for the VF loss, an argument like `lpips_params`; None
      when the loss has no VF term.
    cfg: static parts.
  Returns:
    (new state, metrics collection of this step).
  """
  # fold_in the step: a resumed run draws exactly the numbers an uninterrupted one would.
  step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  view, x = cfg.view, batch["image"]
  rotation = (diffusability.transform_of(step_rng, cfg.equivariance).rotation
              if cfg.equivariance is not None else 0)
  sample_rng, dropout_rng = jax.random.split(step_rng)
  kl_weight = losses.kl_weight_at(state.step, cfg.kl_weight, cfg.kl_warmup_steps)
  disc_factor = jnp.asarray(cfg.disc_factor if cfg.adversarial else 0.0, jnp.float32)
  x = view.input(x)
  noise = diffusability.posterior_noise(cfg, state.params, x, sample_rng)
  features = (diffusability.dinov2_targets(cfg, dinov2_params, x, noise.shape[1:3])
              if cfg.vf is not None else None)
  extra = view.metrics() if cfg.equivariance is not None else {}
  if cfg.grad_accum_steps > 1:  # k micro-batches inside this one step (`accumulate`).
    return accumulate.accumulated_step(
        state, x, lpips_params, step_rng, kl_weight, disc_factor, lr_scale, cfg=cfg, view=view,
        rotation=rotation, noise=noise, features=features, extra=extra)

  def loss_fn(tree):
    params, vf_proj = step_parts.split_trainable(state, tree)
    fwd = diffusability.forward(cfg, params, x, noise, dropout_rng, view=view,
                                rotation=rotation, with_vjp=cfg.vf is not None)
    rec_fn = step_parts.reconstruction_fn(cfg, fwd.target, lpips_params)
    loss, terms = step_parts.rec_and_kl(cfg, rec_fn, fwd, kl_weight, view)
    adv = dict.fromkeys(["g_loss", "d_weight"], jnp.zeros((), jnp.float32))
    if cfg.adversarial:
      logits_fake, _ = step_parts.discriminate(cfg, state.disc_params, state.disc_stats,
                                               fwd.recon)
      g_loss = losses.generator_loss(logits_fake)
      rec_grad, g_grad = step_parts.last_layer_grads(
          cfg, fwd.target, jax.lax.stop_gradient(fwd.h), jax.lax.stop_gradient(fwd.recon),
          params, state.disc_params, state.disc_stats, lpips_params)
      d_weight = losses.adaptive_weight(rec_grad, g_grad, cfg.disc_weight)
      loss = loss + d_weight * disc_factor * g_loss
      adv = {"g_loss": g_loss, "d_weight": d_weight}
    if cfg.vf is not None:
      vf, vf_metrics = diffusability.vf_term(cfg, params, vf_proj, fwd, features,
                                             lambda r: rec_fn(r)[0])
      loss = loss + vf
      terms.update(vf_metrics)
    return loss, (terms, adv, fwd.recon, fwd.post, fwd.target)

  (loss, (terms, adv, recon, post, target)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.trainable())
  new_state, opt_state = step_parts.apply_update(state, grads, cfg, lr_scale)
  disc_out = dict.fromkeys(["d_loss", "logits_real", "logits_fake", "disc_accuracy"],
                           jnp.zeros((), jnp.float32))
  if cfg.adversarial:
    d_loss, (stats, lr, lf), d_grads = step_parts.discriminator_grads(
        cfg, state.disc_params, state.disc_stats, target, recon, disc_factor)
    new_state, disc_out = step_parts.apply_disc_update(state, new_state, d_loss, stats, lr, lf,
                                                       d_grads, cfg)
  return new_state, step_parts.collect_metrics(
      cfg, state, loss, grads, opt_state, {**terms, **extra}, adv, disc_out,
      step_parts.image_metrics(target, recon, post), disc_factor, lr_scale)
