"""Gradient accumulation: `optimizer.grad_accum_steps` micro-batches inside one jitted step.

The global batch [B, ...] is split into k micro-batches of B/k images (`x[j::k]`, so every device
holds its share of every micro-batch and all devices work on each), scanned with `lax.scan`, and
their gradients averaged: with the mean reductions of the loss that is the gradient of the whole
batch, to float tolerance, while only one micro-batch's activations are alive at a time. So
`global_batch_size` may exceed what fits on the devices, and stays the same when a run moves to
fewer chips. The posterior noise is drawn once for the whole batch, as the one-pass step draws it.
Chosen over `optax.MultiSteps`, which accumulates across calls: one call per optimizer step keeps
the step counter, the schedule, the data position and the checkpoints what they are without it.

With the discriminator, what differs from one pass over the whole batch:
- batch statistics (BatchNorm) are those of each micro-batch, threaded from one to the next;
- LDM's adaptive weight uses the accumulated gradients' convention: d_weight = ||mean_j grad_W
  rec_j|| / (||mean_j grad_W g_j|| + 1e-4) over the micro-batches' gradients w.r.t. the decoder's
  last kernel W, i.e. the norms of the whole batch's gradients, not a mean of per-micro-batch
  weights. The update is mean_j grad rec_j + d_weight * disc_factor * mean_j grad g_j, so each
  micro-batch pays one extra backward pass (the two parts are taken apart by one VJP);
- the discriminator's gradients are averaged over the micro-batches too.

With VA-VAE's VF loss, its adaptive weight is each micro-batch's own (the norms of that
micro-batch's gradients at the encoder's last conv, inside its loss); with a constant weight
(loss.vf_adaptive=False) the step equals one pass. EQ-VAE's view and rotation are the step's, the
same for every micro-batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from vae_scale.training import diffusability
from vae_scale.training import losses
from vae_scale.training import step_parts
from vae_scale.training.equivariance import PLAIN_VIEW
from vae_scale.training.equivariance import View
from vae_scale.training.train_state import StepConfig
from vae_scale.training.train_state import TrainState

Array = jax.Array


def _unroll() -> bool:
  """Unroll the micro-batch loop on CPU: XLA:CPU runs a while loop's body ~9x slower than the same
  ops unrolled (BENCHMARKS.md). Accelerators keep the loop, which is what bounds the activations
  kept alive to one micro-batch's; the math is the same either way."""
  return jax.default_backend() == "cpu"


def split(a: Array, k: int) -> Array:
  """[B, ...] -> [k, B/k, ...] with micro-batch j = a[j::k] (spread over every device's rows)."""
  return a.reshape((a.shape[0] // k, k) + a.shape[1:]).swapaxes(0, 1)


def accumulated_step(state: TrainState, x: Array, lpips_params: Any, step_rng: Array,
                     kl_weight: Array, disc_factor: Array, lr_scale: Array | None = None, *,
                     cfg: StepConfig, view: View = PLAIN_VIEW,
                     rotation: Array | int = 0, noise: Array | None = None,
                     features: Array | None = None, extra: dict[str, Array] | None = None
                     ) -> tuple[TrainState, Any]:
  """`steps.train_step` over k = cfg.grad_accum_steps micro-batches of `x` [B, H, W, 3].

  Args, returns: as `steps.train_step` (`step_rng` is its per-step key, `kl_weight` and
  `disc_factor` this step's values); `x` is the view's input, `view` and `rotation` the EQ-VAE
  view of the step, `noise` the whole batch's posterior draw (None: drawn here as the one-pass step
  draws it), `features` DINOv2's targets of the whole batch (VF loss on), `extra` metrics to add.
  With the VF loss, its adaptive weight is each micro-batch's own (norms of that micro-batch's
  gradients), not the whole batch's as d_weight's.
  """
  k = cfg.grad_accum_steps
  sample_rng, dropout_rng = jax.random.split(step_rng)
  if noise is None:  # What one pass would draw.
    noise = diffusability.posterior_noise(cfg, state.params, x, sample_rng)
  one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
  add = lambda a, b: jax.tree.map(jnp.add, a, b)

  def parts(tree, xj, ej, fj, rng):
    params, vf_proj = step_parts.split_trainable(state, tree)
    fwd = diffusability.forward(cfg, params, xj, ej, rng, view=view, rotation=rotation,
                                with_vjp=cfg.vf is not None)
    rec_fn = step_parts.reconstruction_fn(cfg, fwd.target, lpips_params)
    loss, terms = step_parts.rec_and_kl(cfg, rec_fn, fwd, kl_weight, view)
    if cfg.vf is not None:
      vf, vf_metrics = diffusability.vf_term(cfg, params, vf_proj, fwd, fj,
                                             lambda r: rec_fn(r)[0])
      loss = loss + vf
      terms.update(vf_metrics)
    g_loss = (losses.generator_loss(step_parts.discriminate(
        cfg, state.disc_params, state.disc_stats, fwd.recon)[0]) if cfg.adversarial else zero)
    return (loss, g_loss), (terms, fwd.recon, fwd.post, fwd.h, fwd.target)

  def micro(carry, inp):
    xj, ej, fj, j = inp
    (loss, g_loss), vjp, (terms, recon, post, h, target) = jax.vjp(
        lambda p: parts(p, xj, ej, fj, jax.random.fold_in(dropout_rng, j)), state.trainable(),
        has_aux=True)
    out = {"rec_grads": vjp((one, zero))[0]}
    metrics = {**terms, **step_parts.image_metrics(target, recon, post), "loss": loss,
               "g_loss": g_loss}
    if cfg.adversarial:
      out["gen_grads"] = vjp((zero, one))[0]
      out["last_rec"], out["last_gen"] = step_parts.last_layer_grads(
          cfg, target, jax.lax.stop_gradient(h), jax.lax.stop_gradient(recon), state.params,
          state.disc_params, state.disc_stats, lpips_params)
      d_loss, (stats, lr, lf), out["d_grads"] = step_parts.discriminator_grads(
          cfg, state.disc_params, carry["stats"], target, recon, disc_factor)
      carry = dict(carry, stats=stats)
      metrics.update(d_loss=d_loss, lr=jnp.mean(lr), lf=jnp.mean(lf),
                     acc=0.5 * (jnp.mean((lr > 0).astype(jnp.float32)) +
                                jnp.mean((lf < 0).astype(jnp.float32))))
    carry = dict(carry, sums=add(carry["sums"], out))
    return carry, metrics

  zeros = {"rec_grads": jax.tree.map(jnp.zeros_like, state.trainable())}
  if cfg.adversarial:
    zeros.update(gen_grads=zeros["rec_grads"],
                 last_rec=jnp.zeros_like(state.params["decoder"]["conv_out"]["kernel"]),
                 last_gen=jnp.zeros_like(state.params["decoder"]["conv_out"]["kernel"]),
                 d_grads=jax.tree.map(jnp.zeros_like, state.disc_params))
  # Without the VF loss each micro-batch gets a placeholder in place of DINOv2's targets.
  feats = split(features, k) if features is not None else jnp.zeros((k,), jnp.float32)
  carry, per_micro = jax.lax.scan(
      micro, {"sums": zeros, "stats": state.disc_stats},
      (split(x, k), split(noise, k), feats, jnp.arange(k)), unroll=_unroll())
  mean = jax.tree.map(lambda v: v / k, carry["sums"])
  m = jax.tree.map(lambda v: jnp.mean(v, axis=0), per_micro)
  grads, loss, adv = mean["rec_grads"], m["loss"], {"g_loss": m["g_loss"], "d_weight": zero}
  if cfg.adversarial:
    d_weight = losses.adaptive_weight(mean["last_rec"], mean["last_gen"], cfg.disc_weight)
    grads = jax.tree.map(lambda r, g: r + d_weight * disc_factor * g, grads, mean["gen_grads"])
    loss = loss + d_weight * disc_factor * m["g_loss"]
    adv["d_weight"] = d_weight
  new_state, opt_state = step_parts.apply_update(state, grads, cfg, lr_scale)
  disc_out = dict.fromkeys(["d_loss", "logits_real", "logits_fake", "disc_accuracy"], zero)
  if cfg.adversarial:
    d_updates, d_opt = cfg.disc_tx.update(mean["d_grads"], state.disc_opt_state,
                                          state.disc_params)
    new_state = new_state.replace(
        disc_params=optax.apply_updates(state.disc_params, d_updates),
        disc_stats=carry["stats"], disc_opt_state=d_opt)
    disc_out = {"d_loss": m["d_loss"], "logits_real": m["lr"], "logits_fake": m["lf"],
                "disc_accuracy": m["acc"]}
  quality_keys = ("psnr", "ssim", "latent_std")
  terms = {k_: v for k_, v in m.items() if k_ not in (
      "loss", "g_loss", "d_loss", "lr", "lf", "acc") + quality_keys and not
           k_.startswith("kl_channel_")}
  quality = {k_: m[k_] for k_ in m if k_ in quality_keys or k_.startswith("kl_channel_")}
  return new_state, step_parts.collect_metrics(cfg, state, loss, grads, opt_state,
                                               {**terms, **(extra or {})}, adv, disc_out,
                                               quality, disc_factor, lr_scale)
