"""Optimizers: optax Adam/AdamW with warm-up, constant or cosine schedule, global-norm clipping.

The optimizer state has ONE structure whatever the hyperparameters: clipping, weight decay and the
frozen-encoder masks are always in the chain (set to no-ops when off: an infinite clip norm, decay 0,
an all-False mask), so a run resumed with other optimizer settings or a switched `freeze_encoder`
restores its Adam moments as they are instead of meeting a checkpoint of another shape.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

Params = dict


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 over `opt.warmup_steps`, then constant or cosine decay to 0.

  Args:
    opt: config.optimizer (learning_rate, warmup_steps, schedule).
    num_train_steps: the run's length (the cosine decays to 0 at its end).
  Returns:
    step (int32 scalar) -> learning rate (float32 scalar).
  """
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
        decay_steps=max(num_train_steps, opt.warmup_steps + 1), end_value=0.0)
  if opt.warmup_steps:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps),
         optax.constant_schedule(opt.learning_rate)], [opt.warmup_steps])
  return optax.constant_schedule(opt.learning_rate)


ENCODER_SIDE = ("encoder", "quant_conv")  # What `freeze_encoder` freezes (as SD's ft-EMA/ft-MSE).


def trainable_mask(params: Params, freeze_encoder: bool) -> Params:
  """True for parameters the optimizer updates; False for the encoder side when frozen.

  Args:
    params: the autoencoder params tree (arrays or ShapeDtypeStructs).
    freeze_encoder: freeze `encoder` and `quant_conv`.
  Returns:
    A tree of Python bools with the structure of `params`.
  """
  return {k: jax.tree.map(lambda _, t=not (freeze_encoder and k in ENCODER_SIDE): t, v)
          for k, v in params.items()}


def create_optimizer(opt: ml_collections.ConfigDict, num_train_steps: int,
                     frozen: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The autoencoder's optimizer (config.optimizer) and its schedule.

  Non-finite updates are skipped (parameters and moments untouched) and counted by
  `optax.apply_if_finite`; the training loop stops after `max_consecutive_nonfinite` in a row.

  Args:
    opt: config.optimizer.
    num_train_steps: for the cosine schedule.
    frozen: pytree of bools (True = frozen) matching the parameters, or None (nothing frozen);
      frozen leaves get zero gradients (so clipping ignores them) and zero updates (so weight
      decay spares them).
  Returns:
    (the transformation, the learning-rate schedule).
  """
  schedule = learning_rate_schedule(opt, num_train_steps)
  weight_decay = opt.weight_decay if opt.name == "adamw" else 0.0
  freeze = optax.masked(optax.set_to_zero(), frozen if frozen is not None else _none_frozen)
  tx = optax.chain(
      freeze,
      optax.clip_by_global_norm(opt.grad_clip_norm or float("inf")),
      optax.scale_by_adam(b1=opt.b1, b2=opt.b2),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(schedule),
      freeze)
  # The loop enforces the limit; optax's own would apply the bad update after it.
  return optax.apply_if_finite(tx, max_consecutive_errors=2**30), schedule


def _none_frozen(params: Params) -> Params:
  return jax.tree.map(lambda _: False, params)


def create_disc_optimizer(disc: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The discriminator's own Adam (config.disc), constant rate; non-finite updates skipped."""
  return optax.apply_if_finite(optax.adam(disc.learning_rate, b1=disc.b1, b2=disc.b2),
                               max_consecutive_errors=2**30)
