"""The training loop: input, mesh, programs, evaluation and the run's session wired together.

Reads top to bottom like the Flax examples' loop: restore (the stored state or None), plan the
resume and init what is missing, build the iterator; then for each step: the next batch, the pure
jitted step, and `session.after_step` (logging and evaluation hooks, then save or stop).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from vae_scale import models
from vae_scale.config import schema
from vae_scale.config import serialize
from vae_scale.data import pipeline
from vae_scale.data import skipping
from vae_scale.data import sources
from vae_scale.eval import evaluator
from vae_scale.eval import report
from vae_scale.run import weights
from vae_scale.models import frozen_weights
from vae_scale.run import checkpoints
from vae_scale.run import faults
from vae_scale.run import preemption
from vae_scale.run import resume
from vae_scale.run import session as session_lib
from vae_scale.training import optim
from vae_scale.training import programs
from vae_scale.training import sharding
from vae_scale.training import train_state


def _hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {k: (str(v) if isinstance(v, list) else v) for k, v in serialize.flatten(config).items()}


def _frozen(config: ml_collections.ConfigDict, model_cfg: models.AutoencoderConfig) -> Any:
  if not config.freeze_encoder:
    return None
  return jax.tree.map(lambda t: not t, optim.trainable_mask(models.abstract_params(model_cfg),
                                                            True))


def _init_projection(config: ml_collections.ConfigDict) -> np.ndarray | None:
  """The VF projection a fresh run starts from: an init_from run's (stage 2 from stage 1), when
  its shape fits [z_channels, vf_feature_dim]; None (a fresh one) otherwise, said so."""
  if config.loss.vf_weight <= 0 or not config.init_from or (
      weights.describe_source(config.init_from) != "run"):
    return None
  proj = checkpoints.read_projection(config.init_from)
  want = (config.model.z_channels, config.loss.vf_feature_dim)
  if proj is None or tuple(proj.shape) != want:
    logging.info("The VF projection starts fresh: %s has %s", config.init_from,
                 "none" if proj is None else f"one of shape {list(proj.shape)}, not {list(want)}")
    return None
  logging.info("The VF projection continues from %s", config.init_from)
  return proj


def _host_rng(state: train_state.TrainState) -> np.ndarray:
  """TrainState.rng on this host (replicated: any local shard holds it, on any process count)."""
  return np.asarray(state.rng.addressable_shards[0].data)


class TrainMetrics:
  """The train steps' metrics since the last log line, merged on the devices; skipped files."""

  def __init__(self, config: ml_collections.ConfigDict, start_step: int):
    self.config, self.merged, self.skipped = config, None, 0
    self.since = (start_step, time.time())

  def add(self, metrics: Any, local_batch: dict[str, np.ndarray]) -> None:
    self.merged = metrics if self.merged is None else self.merged.merge(metrics)
    self.skipped += int(np.sum(local_batch.get(skipping.SKIPPED_KEY, 0)))

  def flush(self, step: int) -> dict[str, float]:
    """The scalars to write at `step` (train/*, data/skipped), and starts a new window."""
    values = {f"train/{k}": float(v) for k, v in self.merged.compute().items()
              if self.config.disc.enabled or k not in train_state.ADVERSARIAL_METRICS}
    elapsed = time.time() - self.since[1]
    values["train/images_per_sec"] = ((step - self.since[0]) * self.config.global_batch_size /
                                      max(elapsed, 1e-9))
    skipped = self.skipped
    if jax.process_count() > 1:  # Unreadable files skipped by all processes since the last write.
      skipped = int(np.sum(multihost_utils.process_allgather(np.asarray([skipped]))))
    values["data/skipped"] = skipped
    self.merged, self.skipped, self.since = None, 0, (step, time.time())
    return values


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       watch: preemption.Watch | None = None,
                       options: session_lib.Options | None = None) -> train_state.TrainState:
  """Trains (or resumes) the autoencoder of `config` in `workdir` and returns the final state.

  Args:
    config: the run config (validated here against the devices and processes).
    workdir: the run directory (local or gs://).
    watch: the process's SIGTERM policy (`main` installs it first thing); None: a fresh one.
    options: the operator's flags for the session (lease, diagnostics); None: the defaults.
  Raises:
    ConfigError / DataError / ConversionError: bad config, data or weights, before any compile.
    LeaseError: another live run holds the workdir (nothing written).
    Preempted: SIGTERM or a preemption notice arrived; the reached step is saved.
    NonFiniteError: more than optimizer.max_consecutive_nonfinite non-finite steps in a row.
  """
  workdir = str(workdir)
  schema.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  with session_lib.Session(workdir, config, watch, options) as session:
    return _train(config, workdir, session)


def _train(config: ml_collections.ConfigDict, workdir: str,
           session: session_lib.Session) -> train_state.TrainState:
  """The loop of `train_and_evaluate` inside its session."""
  process, processes = session.process_index, session.process_count
  mesh = sharding.create_mesh()
  logging.info("Mesh %s over %d devices (%d per process)", dict(mesh.shape), jax.device_count(),
               jax.local_device_count())

  # Input, weights to start from and the frozen feature networks (LPIPS for the loss and the
  # evaluation, Inception for rFID) are read and checked first: bad ones fail before any compile.
  train_source = sources.make_source(config, "train", workdir)
  eval_ds = pipeline.create_eval_dataset(config, process, processes, workdir=workdir)
  model_cfg = models.AutoencoderConfig.from_config(config)
  init_params = weights.load_params(config.init_from, model_cfg) if config.init_from else None
  nets = frozen_weights.load_feature_nets(config.loss.lpips_weights, config.inception_weights)
  dinov2 = frozen_weights.load_vf_dinov2(config)  # The VF loss's (None without it).
  progs = programs.build(config, mesh, frozen=_frozen(config, model_cfg),
                         lpips_params=nets.get("lpips"), dinov2=dinov2)

  session.begin()  # Everything checked: from here on the run writes into its workdir.
  restored = session.restore(abstract_state=progs.abstract_state, replicated=progs.replicated,
                             data_source=repr(train_source))
  state = resume.state_from(restored, progs.abstract_state, progs.init, init_params=init_params,
                            replicated=progs.replicated,
                            init_vf_proj=_init_projection(config) if restored is None else None)
  state_rng = _host_rng(state)  # Constant over the run: the host's draw of EQ-VAE's views.
  if restored is None and init_params is not None:
    logging.info("Initialized the autoencoder from %s", config.init_from)
  position = resume.data_position(restored, config, repr(train_source))
  rows = sharding.process_rows(mesh, config.global_batch_size)

  def stream(at: Any) -> Any:
    # This process loads the rows of each global batch that the mesh puts on its devices, from
    # the global position: the same global batches for any process or device count.
    return iter(pipeline.create_train_dataset(config, process, processes, train_source,
                                              workdir=workdir, start=at.global_examples,
                                              rows=rows))

  train_iter = stream(position)
  start_step = position.step
  if start_step:
    logging.info("Resuming at step %d", start_step)
  corrupt = faults.from_env()  # None unless a test asks.

  writer = metric_writers.create_default_writer(workdir, just_logging=process > 0,
                                                asynchronous=True)
  if start_step == 0:
    writer.write_hparams(_hparams(config))

  def progress_hooks(at: int) -> tuple[periodic_actions.ReportProgress, list[Any]]:
    """CLU's progress report (steps/s, ETA) and profiler from step `at` (again after a rollback:
    they count steps one by one)."""
    progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                               writer=writer, every_steps=config.log_every_steps)
    hooks = [progress] if process == 0 else []
    if process == 0 and config.profile_steps:
      hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps,
                                            logdir=workdir, first_profile=at + config.log_every_steps))
    return progress, hooks

  progress, hooks = progress_hooks(start_step)
  scorer = evaluator.Evaluator(config, mesh, kinds=("reconstructions",),
                               lpips_params=nets.get("lpips"),
                               inception_params=nets.get("inception"), dinov2=dinov2)
  train_metrics = TrainMetrics(config, start_step)

  def evaluate(step: int) -> None:
    """Evaluates the EMA weights (else the params) on the held-out set; writes the report."""
    last = step == config.num_train_steps
    write_images = step % config.image_every_steps == 0 or last
    params = state.ema_params if state.ema_params is not None else state.params
    with session.phase("eval"), progress.timed("eval"):
      result, grids = scorer(params, eval_ds, processes, vf_proj=state.vf_proj)
    session.note_eval(step, report.scalars(result, "eval"))
    files = report.publish(writer, step, result,
                           {"reconstructions": grids["reconstructions"]} if write_images else {},
                           prefix="eval", png_dir=epath.Path(workdir) / "images",
                           is_chief=process == 0)
    if process == 0:
      report.append_history(workdir, step, result, files.get("reconstructions"))

  def log_and_evaluate(step: int) -> None:
    last = step == config.num_train_steps
    if step % config.log_every_steps == 0 or last:
      values = {**train_metrics.flush(step), **session.scalars()}
      writer.write_scalars(step, values)
      session.observe(step, values, state)  # The guard: roll back after a spike or NaNs.
    if step % config.eval_every_steps == 0 or step % config.image_every_steps == 0 or last:
      evaluate(step)

  session.hooks = [*hooks, log_and_evaluate]

  with metric_writers.ensure_flushes(writer):
    if start_step == 0:
      evaluate(0)
    step = start_step
    while step < config.num_train_steps:
      # As taming-transformers: adversarial from the step whose 0-based index is disc.start_step.
      variant, program = progs.step_at(
          step, progs.gan_step is not None and step >= config.disc.start_step, state_rng)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        with session.phase("data"):
          local = next(train_iter)
        if corrupt is not None:
          local = corrupt(local, position.at(step), position.at(step + 1))
        batch = sharding.global_batch(
            {k: v for k, v in local.items() if k != skipping.SKIPPED_KEY}, mesh)
        state, metrics = session.run_step(variant, program, state, batch,
                                          session.lr_scale(step))
      train_metrics.add(metrics, local)
      step += 1
      rolled = session.after_step(step, state, position)
      if rolled is not None:  # The guard rolled back: that checkpoint, and the data past the window.
        state = resume.state_from(rolled, progs.abstract_state, progs.init)
        state_rng = _host_rng(state)
        position = resume.data_position(rolled, config, repr(train_source))
        getattr(train_iter, "close", lambda: None)()  # Grain's worker processes of the old stream.
        train_iter, step = stream(position), position.step
        train_metrics = TrainMetrics(config, step)
        progress, hooks = progress_hooks(step)
        session.hooks = [*hooks, log_and_evaluate]
  summary = session.close()
  if process == 0:
    logging.info("Finished at step %d.\n%s", config.num_train_steps, report.history_summary(
        report.read_history(workdir), report.read_events(workdir)))
  logging.info("%s", summary)
  return state
