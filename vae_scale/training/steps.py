"""The pure, mesh-agnostic train step over a pytree TrainState (jitted with shardings by `programs`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vae_scale.training import accumulate
from vae_scale.training import losses
from vae_scale.training import step_parts
from vae_scale.training.train_state import StepConfig
from vae_scale.training.train_state import TrainState

Array = jax.Array


def train_step(state: TrainState, batch: dict[str, Array], lpips_params: Any = None,
               lr_scale: Array | None = None, *, cfg: StepConfig) -> tuple[TrainState, Any]:
  """One optimizer step of the autoencoder (and, when `cfg.adversarial`, of the discriminator).

  Args:
    state: the train state (donated).
    batch: {'image': [B, H, W, 3] float32 in [-1, 1]}, the global batch.
    lpips_params: frozen LPIPS-VGG params (flat dict of arrays), an argument rather than state: they
      are never trained, checkpointed or given to the optimizer. None when the loss has no LPIPS.
    lr_scale: float32 scalar multiplying this step's learning rate (the guard's cautious steps
      after a rollback); None = 1.
    cfg: static parts.
  Returns:
    (new state, metrics collection of this step).
  """
  x = batch["image"]
  # fold_in the step: a resumed run draws exactly the numbers an uninterrupted one would.
  step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  sample_rng, dropout_rng = jax.random.split(step_rng)
  kl_weight = losses.kl_weight_at(state.step, cfg.kl_weight, cfg.kl_warmup_steps)
  disc_factor = jnp.asarray(cfg.disc_factor if cfg.adversarial else 0.0, jnp.float32)

  def loss_fn(params):
    model = nnx.merge(cfg.graphdef, params)
    recon, post, h = model.forward_with_features(x, sample_rng, deterministic=cfg.dropout == 0,
                                                 rngs=nnx.Rngs(dropout=dropout_rng))
    loss, terms = losses.with_kl(*step_parts.reconstruction_fn(cfg, x, lpips_params)(recon), post,
                                 kl_weight, cfg.reduction)
    adv = dict.fromkeys(["g_loss", "d_weight"], jnp.zeros((), jnp.float32))
    if cfg.adversarial:
      logits_fake, _ = step_parts.discriminate(cfg, state.disc_params, state.disc_stats, recon)
      g_loss = losses.generator_loss(logits_fake)
      rec_grad, g_grad = step_parts.last_layer_grads(cfg, x, jax.lax.stop_gradient(h),
                                          jax.lax.stop_gradient(recon), params,
                                          state.disc_params, state.disc_stats, lpips_params)
      d_weight = losses.adaptive_weight(rec_grad, g_grad, cfg.disc_weight)
      loss = loss + d_weight * disc_factor * g_loss
      adv = {"g_loss": g_loss, "d_weight": d_weight}
    return loss, (terms, adv, recon, post)

  if cfg.grad_accum_steps > 1:  # k micro-batches inside this one step (`accumulate`).
    return accumulate.accumulated_step(state, x, lpips_params, step_rng, kl_weight, disc_factor,
                                       lr_scale, cfg=cfg)
  (loss, (terms, adv, recon, post)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state, opt_state = step_parts.apply_update(state, grads, cfg, lr_scale)
  disc_out = dict.fromkeys(["d_loss", "logits_real", "logits_fake", "disc_accuracy"],
                           jnp.zeros((), jnp.float32))
  if cfg.adversarial:
    d_loss, (stats, lr, lf), d_grads = step_parts.discriminator_grads(cfg, state.disc_params,
                                                           state.disc_stats, x, recon, disc_factor)
    new_state, disc_out = step_parts.apply_disc_update(state, new_state, d_loss, stats, lr, lf, d_grads, cfg)
  return new_state, step_parts.collect_metrics(cfg, state, loss, grads, opt_state, terms, adv, disc_out,
                                    step_parts.image_metrics(x, recon, post), disc_factor,
                                    lr_scale)
