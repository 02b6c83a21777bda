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
from jax.sharding import Mesh

from vae_scale import sharding
from vae_scale import steps


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
    ae_step: (state, {'image': [B, H, W, 3]}) -> (state, metrics), the discriminator not run.
    gan_step: the same with the adversarial term, or None when the run has no discriminator.
  """

  step_cfg: steps.StepConfig
  abstract_state: Any
  state_sharding: Any
  replicated: Any
  batch_sharding: Any
  init: Callable[[], steps.TrainState]
  ae_step: Any
  gan_step: Any


def jit_train_step(step_cfg: steps.StepConfig, state_sharding: Any, mesh: Mesh) -> Any:
  """`steps.train_step` bound to `step_cfg`, jitted with shardings, the state donated."""
  return jax.jit(functools.partial(steps.train_step, cfg=step_cfg),
                 in_shardings=(state_sharding, {"image": sharding.batch_sharding(mesh)}),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))


def build(config: ml_collections.ConfigDict, mesh: Mesh, *, frozen: Any = None,
          with_disc: bool | None = None) -> TrainPrograms:
  """The programs of `config` over `mesh` (nothing is compiled until first use).

  Args:
    config: the run config.
    mesh: the data-parallel mesh.
    frozen: pytree of bools marking frozen autoencoder parameters, or None.
    with_disc: carry the discriminator (default: config.disc.enabled); the GAN step needs it.
  """
  with_disc = config.disc.enabled if with_disc is None else with_disc
  step_cfg, init_fn = steps.build(config, frozen=frozen, with_disc=with_disc)
  root_key = jax.random.key(config.seed)
  abstract = jax.eval_shape(init_fn, root_key)
  state_sharding = sharding.shardings_for(abstract, mesh)
  init = jax.jit(functools.partial(init_fn, root_key), out_shardings=state_sharding)
  # Two variants, each compiled on first use: before disc.start_step the discriminator is not run
  # at all (disc_factor is 0 there, so it would contribute nothing but cost).
  ae_step = jit_train_step(step_cfg, state_sharding, mesh)
  gan_step = (jit_train_step(dataclasses.replace(step_cfg, adversarial=True), state_sharding, mesh)
              if with_disc else None)
  return TrainPrograms(step_cfg=step_cfg,
                       abstract_state=sharding.with_shardings(abstract, state_sharding),
                       state_sharding=state_sharding, replicated=sharding.replicated(mesh),
                       batch_sharding=sharding.batch_sharding(mesh), init=init, ae_step=ae_step,
                       gan_step=gan_step)
