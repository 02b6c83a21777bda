"""The pieces a train step is made of, shared by the one-pass step (`steps`) and the accumulated
one (`accumulate`): the reconstruction term, the discriminator, LDM's adaptive-weight gradients, the
updates and the metrics. Pure and mesh-agnostic."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vae_scale.models import lpips
from vae_scale.training import equivariance
from vae_scale.training import losses
from vae_scale.training import train_state
from vae_scale.training.train_state import StepConfig
from vae_scale.training.train_state import TrainState

Array = jax.Array


def _channel_metrics(prefix: str, per_channel: Array) -> dict[str, Array]:
  return {f"{prefix}_{c}": per_channel[c] for c in range(per_channel.shape[0])}


def _last_conv(h: Array, kernel: Array, bias: Array) -> Array:
  """The decoder's conv_out as a function of its kernel (3x3, stride 1, SAME), float32 out."""
  y = jax.lax.conv_general_dilated(h, kernel.astype(h.dtype), (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return (y + bias.astype(h.dtype)).astype(jnp.float32)


def discriminate(cfg: StepConfig, disc_params: Any, disc_stats: Any, images: Array,
                 train: bool = True) -> tuple[Array, Any]:
  """Patch logits of `images` and the batch statistics after this call."""
  disc = nnx.merge(cfg.disc_graphdef, disc_params, disc_stats)
  logits = disc(images, train=train)
  return logits, nnx.to_pure_dict(nnx.state(disc, nnx.BatchStat))


def reconstruction_fn(cfg: StepConfig, x: Array, lpips_params: Any = None
                      ) -> Callable[[Array], tuple[Array, dict[str, Array]]]:
  """The reconstruction term of the loss as a function of the reconstruction [B, H, W, 3]:
  (rec, terms) of `losses.reconstruction_loss` with the step's weights and LPIPS.

  The loss and LDM's adaptive weight both use this one function, so d_weight is taken on the whole
  reconstruction term (LPIPS included), as taming-transformers does.

  Args:
    cfg: static parts (weights, reduction, LPIPS dtype).
    x: the inputs [B, H, W, 3] in [-1, 1].
    lpips_params: frozen LPIPS-VGG params (`frozen_weights.load_lpips_params`); needed when
      cfg.perceptual_weight > 0, otherwise unused.
  """
  perceptual = None
  if cfg.perceptual_weight:
    if lpips_params is None:
      raise ValueError("perceptual_weight > 0 needs the LPIPS params (config.loss.lpips_weights)")
    perceptual = functools.partial(lpips.lpips_distance, lpips_params,
                                   dtype=jnp.dtype(cfg.lpips_dtype))
  return functools.partial(losses.reconstruction_loss, x, l1_weight=cfg.l1_weight,
                           ssim_weight=cfg.ssim_weight, l2_weight=cfg.l2_weight,
                           perceptual_weight=cfg.perceptual_weight, perceptual_fn=perceptual,
                           reduction=cfg.reduction)


def split_trainable(state: TrainState, tree: Any) -> tuple[Any, Any]:
  """(params, vf_proj) of a tree shaped like `state.trainable()` (vf_proj None without VF)."""
  new = state.with_trainable(tree)
  return new.params, new.vf_proj


def rec_and_kl(cfg: StepConfig, rec_fn: Callable[[Array], tuple[Array, dict[str, Array]]],
               fwd: Any, kl_weight: Array, view: equivariance.View
               ) -> tuple[Array, dict[str, Array]]:
  """The reconstruction term of a forward pass (`diffusability.Forward`) + the KL term.

  In an EQ-VAE tau view the reconstruction term is multiplied by cfg.equivariance_weight (the
  reported `rec_loss` is the term before it); the KL is always that of q(z | the encoder's input).
  """
  rec, terms = rec_fn(fwd.recon)
  if view.kind == equivariance.EQUIVARIANT and cfg.equivariance_weight != 1.0:
    rec = rec * cfg.equivariance_weight
  return losses.with_kl(rec, terms, fwd.post, kl_weight, cfg.reduction)


def last_layer_grads(cfg: StepConfig, x: Array, h: Array, recon: Array, params: Any,
                     disc_params: Any, disc_stats: Any, lpips_params: Any = None
                     ) -> tuple[Array, Array]:
  """Gradients of the reconstruction term (`reconstruction_fn`) and of the generator loss w.r.t.
  the decoder's last kernel W, as LDM's adaptive weight needs them (through one VJP of the last
  conv)."""
  conv = params["decoder"]["conv_out"]
  _, vjp = jax.vjp(lambda w: _last_conv(h, w, conv["bias"]), conv["kernel"])
  rec_fn = lambda r: reconstruction_fn(cfg, x, lpips_params)(r)[0]
  g_fn = lambda r: losses.generator_loss(discriminate(cfg, disc_params, disc_stats, r)[0])
  rec_grad = vjp(jax.grad(rec_fn)(recon))[0]
  g_grad = vjp(jax.grad(g_fn)(recon))[0]
  return rec_grad, g_grad


def apply_update(state: TrainState, grads: Any, cfg: StepConfig,
                 lr_scale: Array | None = None) -> tuple[TrainState, Any]:
  """The optimizer step of the autoencoder (and its EMA) with `grads` (shaped like
  `state.trainable()`: the VF projection trains with the params); returns (state, opt_state).

  `lr_scale` (a scalar, None = 1) multiplies the update: Adam's update is linear in the learning
  rate, so this scales the rate for the guard's cautious steps after a rollback without touching
  the optimizer state's structure.
  """
  trainable = state.trainable()
  updates, opt_state = cfg.tx.update(grads, state.opt_state, trainable)
  if lr_scale is not None:
    updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
  new = state.with_trainable(optax.apply_updates(trainable, updates))
  ema_params = state.ema_params
  if ema_params is not None:
    # Skipped (non-finite) steps leave params unchanged, so the average stays finite too.
    ema_params = optax.incremental_update(new.params, ema_params, step_size=1.0 - cfg.ema_decay)
  return new.replace(step=state.step + 1, opt_state=opt_state, ema_params=ema_params), opt_state


def discriminator_grads(cfg: StepConfig, disc_params: Any, disc_stats: Any, x: Array, recon: Array,
                        disc_factor: Array) -> tuple[Array, tuple[Any, Array, Array], Any]:
  """The discriminator's loss on real `x` and fake `recon` [B, H, W, 3], its gradients and the
  batch statistics after both passes: (d_loss, (stats, logits_real, logits_fake), grads)."""
  fake = jax.lax.stop_gradient(recon)

  def d_loss_fn(params):
    # Real and fake pass separately, as in taming-transformers (separate batch statistics).
    logits_real, stats = discriminate(cfg, params, disc_stats, x)
    logits_fake, stats = discriminate(cfg, params, stats, fake)
    d_loss = disc_factor * losses.D_LOSSES[cfg.disc_loss](logits_real, logits_fake)
    return d_loss, (stats, logits_real, logits_fake)

  (d_loss, aux), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(disc_params)
  return d_loss, aux, grads


def apply_disc_update(state: TrainState, new_state: TrainState, d_loss: Array, stats: Any,
                      logits_real: Array, logits_fake: Array, d_grads: Any,
                      cfg: StepConfig) -> tuple[TrainState, dict[str, Array]]:
  """The discriminator's optimizer step; returns the state and its metrics."""
  d_updates, d_opt = cfg.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
  new_state = new_state.replace(disc_params=optax.apply_updates(state.disc_params, d_updates),
                                disc_stats=stats, disc_opt_state=d_opt)
  acc = 0.5 * (jnp.mean((logits_real > 0).astype(jnp.float32)) +
               jnp.mean((logits_fake < 0).astype(jnp.float32)))
  return new_state, {"d_loss": d_loss, "logits_real": jnp.mean(logits_real),
                     "logits_fake": jnp.mean(logits_fake), "disc_accuracy": acc}


def image_metrics(x: Array, recon: Array, post: Any) -> dict[str, Array]:
  """PSNR and SSIM (clipped reconstructions), the latent std and the KL per latent channel."""
  return {"psnr": jnp.mean(losses.psnr(x, recon)), "ssim": jnp.mean(losses.ssim_metric(x, recon)),
          "latent_std": jnp.std(post.mean),
          **_channel_metrics("kl_channel", losses.kl_per_channel(post))}


def collect_metrics(cfg: StepConfig, state: TrainState, loss: Array, grads: Any, opt_state: Any,
                    terms: dict[str, Array], adv: dict[str, Array], disc_out: dict[str, Array],
                    quality: dict[str, Array], disc_factor: Array,
                    lr_scale: Array | None = None) -> Any:
  """The step's metrics collection (`train_state.train_metric_names`)."""
  outputs = dict(terms)
  outputs.update(adv, **disc_out, **quality)
  outputs.update(
      loss=loss, grad_norm=optax.global_norm(grads), learning_rate=cfg.schedule(state.step) * (1.0 if lr_scale is None else lr_scale),
      nonfinite_skipped=1.0 - jnp.asarray(opt_state.last_finite, jnp.float32),
      disc_factor=disc_factor)
  names = train_state.train_metric_names(cfg.z_channels, perceptual=cfg.perceptual_weight > 0,
                                         vf=cfg.vf is not None,
                                         equivariant=cfg.equivariance is not None)
  return cfg.metrics_cls.single_from_model_output(**{n: outputs[n] for n in names})
