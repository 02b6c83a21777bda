"""The jitted programs of a run over a mesh: state init and the train-step variants.

The one place where the pure, mesh-agnostic steps meet shardings (from `sharding`): the train loop,
the step benchmark and the tests all build their programs here, so they compile the same thing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vae_scale.models.dinov2 import Dinov2Config
from vae_scale.training import diffusability
from vae_scale.training import equivariance
from vae_scale.training import sharding
from vae_scale.training import steps
from vae_scale.training import train_state


@dataclasses.dataclass(frozen=True)
class TrainPrograms:
  """What a run compiles, and the shardings of what flows through it.

  Attributes:
    step_cfg: the static step parts (autoencoder-only variant).
    abstract_state: the TrainState as ShapeDtypeStructs carrying their shardings (restore target).
    state_sharding: a sharding per state leaf (replicated: data parallelism).
    replicated: the sharding of replicated values (metrics, params for evaluation).
    batch_sharding: the images' sharding, batch axis split over the mesh.
    init: () -> a fresh TrainState, born sharded (jitted; root key from config.seed).
    ae_step: (state, {'image': [B, H, W, 3]}) -> (state, metrics), the discriminator not run
      (a `Bound` step: the frozen LPIPS and DINOv2 params ride along as arguments).
    gan_step: the same with the adversarial term, or None when the run has no discriminator.
    view_steps: with EQ-VAE's term, {(adversarial, view): step} for every view of the run
      (`equivariance.views`; the plain view's are ae_step and gan_step); else empty. Each is
      compiled when first called.
  """

  step_cfg: train_state.StepConfig
  abstract_state: Any
  state_sharding: Any
  replicated: Any
  batch_sharding: Any
  init: Callable[[], train_state.TrainState]
  ae_step: Any
  gan_step: Any
  view_steps: dict[tuple[bool, equivariance.View], Bound] = dataclasses.field(
      default_factory=dict)

  def step_at(self, step: int, adversarial: bool, rng: np.ndarray) -> tuple[str, Bound]:
    """(variant name, program) of train step `step`: 'ae' or 'gan', and with EQ-VAE's term the
    view that step's key draws ('ae:tau0.5', ...; `diffusability.view_at`).

    Args:
      step: the step's index (TrainState.step before it).
      adversarial: the discriminator runs (step >= disc.start_step).
      rng: TrainState.rng on the host (uint32 [2]; constant over a run).
    """
    name = "gan" if adversarial else "ae"
    if not self.view_steps:
      return name, self.gan_step if adversarial else self.ae_step
    view = diffusability.view_at(self.step_cfg.equivariance, rng, step)
    return f"{name}:{view.name}", self.view_steps[(adversarial, view)]


@dataclasses.dataclass(frozen=True)
class Bound:
  """A jitted `(state, batch, lpips_params, lr_scale, dinov2_params)` step, or its Lowered /
  Compiled stage, with the frozen networks' params bound: called as `(state, batch[, lr_scale])`
  and lowered as `(state, batch)`, like a step without them.

  The params are replicated jit arguments, not constants closed over (which XLA would embed in
  the program) and not state (they are never trained or checkpointed). Other attributes
  (cost_analysis, memory_analysis, as_text) are the stage's.
  """

  stage: Any
  lpips_params: Any = None
  dinov2_params: Any = None

  def __call__(self, state: Any, batch: Any, lr_scale: float = 1.0) -> Any:
    return self.stage(state, batch, self.lpips_params, np.float32(lr_scale), self.dinov2_params)

  def lower(self, state: Any, batch: Any) -> "Bound":
    return Bound(self.stage.lower(state, batch, self.lpips_params, np.float32(1.0),
                                  self.dinov2_params), self.lpips_params, self.dinov2_params)

  def compile(self) -> "Bound":
    return Bound(self.stage.compile(), self.lpips_params, self.dinov2_params)

  def __getattr__(self, name: str) -> Any:
    if name in ("stage", "lpips_params", "dinov2_params"):  # Not set yet (copy, unpickle).
      raise AttributeError(name)
    return getattr(self.stage, name)


def jit_train_step(step_cfg: train_state.StepConfig, state_sharding: Any, mesh: Mesh,
                   lpips_params: Any = None, dinov2_params: Any = None) -> Bound:
  """`steps.train_step` bound to `step_cfg`, `lpips_params` and `dinov2_params` (replicated on
  `mesh`, or None), jitted with shardings, the state donated."""
  repl = sharding.replicated(mesh)
  jitted = jax.jit(functools.partial(steps.train_step, cfg=step_cfg),
                   in_shardings=(state_sharding, {"image": sharding.batch_sharding(mesh)}, repl,
                                 repl, repl),
                   out_shardings=(state_sharding, repl), donate_argnums=(0,))
  return Bound(jitted, lpips_params, dinov2_params)


def build(config: ml_collections.ConfigDict, mesh: Mesh, *, frozen: Any = None,
          with_disc: bool | None = None, lpips_params: Any = None,
          dinov2: tuple[Any, Dinov2Config] | None = None) -> TrainPrograms:
  """The programs of `config` over `mesh` (nothing is compiled until first use).

  Args:
    config: the run config.
    mesh: the data-parallel mesh.
    frozen: pytree of bools marking frozen autoencoder parameters, or None.
    with_disc: carry the discriminator (default: config.disc.enabled); the GAN step needs it.
    lpips_params: LPIPS-VGG params (`frozen_weights.load_feature_nets(...)['lpips']`), needed
      by a loss with loss.perceptual_weight > 0 and ignored otherwise.
    dinov2: (params, architecture) of DINOv2 (`frozen_weights.load_vf_dinov2(config)`), needed
      by a loss with loss.vf_weight > 0 and ignored otherwise.
  Raises:
    ValueError: loss.perceptual_weight > 0 without `lpips_params`, or loss.vf_weight > 0 without
      `dinov2` (a caller's mistake: the run loads them before anything compiles).
  """
  with_disc = config.disc.enabled if with_disc is None else with_disc
  dinov2_params = dinov2_cfg = None
  if config.loss.vf_weight > 0:
    if dinov2 is None:
      raise ValueError("loss.vf_weight > 0: pass dinov2=frozen_weights.load_vf_dinov2(config)")
    dinov2_params = jax.device_put(dinov2[0], sharding.replicated(mesh))
    dinov2_cfg = dinov2[1]
  step_cfg, init_fn = train_state.build(config, frozen=frozen, with_disc=with_disc,
                                        dinov2_cfg=dinov2_cfg)
  if config.loss.perceptual_weight > 0:
    if lpips_params is None:
      raise ValueError("loss.perceptual_weight > 0: pass the LPIPS params (frozen_weights."
                       "load_feature_nets(config.loss.lpips_weights)['lpips'])")
    lpips_params = jax.device_put(lpips_params, sharding.replicated(mesh))
  else:
    lpips_params = None  # The step does not use them: don't make it carry them.
  root_key = jax.random.key(config.seed)
  abstract = jax.eval_shape(init_fn, root_key)
  state_sharding = sharding.shardings_for(abstract, mesh)
  init = jax.jit(functools.partial(init_fn, root_key), out_shardings=state_sharding)
  # The step's variants, each compiled on first use: before disc.start_step the discriminator is
  # not run at all (disc_factor is 0 there, so it would contribute nothing but cost); with EQ-VAE's
  # term, one program per view (their shapes differ).
  views = (equivariance.views(step_cfg.equivariance) if step_cfg.equivariance is not None
           else [equivariance.PLAIN_VIEW])
  variants = {(adversarial, view): jit_train_step(
      dataclasses.replace(step_cfg, adversarial=adversarial, view=view), state_sharding, mesh,
      lpips_params, dinov2_params)
              for adversarial in ((False, True) if with_disc else (False,)) for view in views}
  ae_step = variants[(False, equivariance.PLAIN_VIEW)]
  gan_step = variants.get((True, equivariance.PLAIN_VIEW))
  view_steps = variants if step_cfg.equivariance is not None else {}
  return TrainPrograms(step_cfg=step_cfg,
                       abstract_state=sharding.with_shardings(abstract, state_sharding),
                       state_sharding=state_sharding, replicated=sharding.replicated(mesh),
                       batch_sharding=sharding.batch_sharding(mesh), init=init, ae_step=ae_step,
                       gan_step=gan_step, view_steps=view_steps)
