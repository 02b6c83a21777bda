"""The training loop: input, mesh, programs, evaluation and checkpoints wired together.

Reads top to bottom like the Flax examples' loop: restore-or-init, then for each step: next batch,
the pure jitted step, hooks, periodic logging / evaluation, and save-or-stop.
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

from vae_scale import checkpointing
from vae_scale import config_lib
from vae_scale import eval_history
from vae_scale import evaluation
from vae_scale import goodput
from vae_scale import models
from vae_scale import optim
from vae_scale import preemption
from vae_scale import programs
from vae_scale import rfid
from vae_scale import sharding
from vae_scale import steps
from vae_scale.data import pipeline
from vae_scale.data import skipping
from vae_scale.data import sources
from vae_scale.errors import NonFiniteError
from vae_scale.interop import torch_nets
from vae_scale.interop import weights


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = config_lib._flatten(config)  # pylint: disable=protected-access
  return {k: (str(v) if isinstance(v, (tuple, list)) else v) for k, v in flat.items()}


def _frozen(config: ml_collections.ConfigDict, model_cfg: models.AutoencoderConfig) -> Any:
  if not config.freeze_encoder:
    return None
  return jax.tree.map(lambda t: not t, optim.trainable_mask(models.abstract_params(model_cfg),
                                                            True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       watch: preemption.Watch | None = None) -> steps.TrainState:
  """Trains (or resumes) the autoencoder of `config` in `workdir` and returns the final state.

  Args:
    config: the run config (validated here against the devices and processes).
    workdir: the run directory (local or gs://).
    watch: the process's SIGTERM policy (`main` installs it first thing); None: a fresh one.
  Raises:
    ConfigError / DataError / ConversionError: bad config, data or weights, before any compile.
    Preempted: SIGTERM or a preemption notice arrived; the reached step is saved.
    NonFiniteError: more than optimizer.max_consecutive_nonfinite non-finite steps in a row.
  """
  workdir = str(workdir)
  watch = watch or preemption.Watch()
  pi, pc = jax.process_index(), jax.process_count()
  record = goodput.Recorder(workdir, enabled=pi == 0, start_time=watch.start_time)
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=pc)
  mesh = sharding.create_mesh()
  logging.info("Mesh %s over %d devices (%d per process)", dict(mesh.shape), jax.device_count(),
               jax.local_device_count())

  # Input first: a missing folder or unprepared dataset fails here, before anything compiles.
  train_source = sources.make_source(config, "train", workdir)
  # This process loads the rows of each global batch that the mesh puts on its devices, from the
  # checkpoint's global position: the same global batches for any process or device count.
  train_rows = sharding.process_rows(mesh, config.global_batch_size)
  train_stream = lambda start: iter(pipeline.create_train_dataset(
      config, pi, pc, train_source, workdir=workdir, start=start, rows=train_rows))
  eval_ds = pipeline.create_eval_dataset(config, pi, pc, workdir=workdir)
  model_cfg = models.AutoencoderConfig.from_config(config)
  # Weights to start from are read (and checked against the architecture) before any compile, and
  # so are the frozen feature networks' (LPIPS for the loss and evaluation, Inception for rFID).
  init_params = weights.load_params(config.init_from, model_cfg) if config.init_from else None
  lpips_params = (torch_nets.load_lpips_params(config.loss.lpips_weights)
                  if config.loss.lpips_weights else None)
  inception_params = (torch_nets.load_inception_params(config.inception_weights)
                      if config.inception_weights else None)
  progs = programs.build(config, mesh, frozen=_frozen(config, model_cfg),
                         lpips_params=lpips_params)

  manager = checkpointing.create_manager(workdir, config)
  with watch.phase("restore"), record.phase("restore"):
    resumed = checkpointing.restore_or_init(
        manager, config=config, workdir=workdir, abstract_state=progs.abstract_state,
        init=progs.init, make_data_iter=train_stream, replicated=progs.replicated,
        init_params=init_params, data_source=repr(train_source))
  state, train_iter, start_step = resumed.state, resumed.data_iter, resumed.step
  record.restored(start_step)
  if start_step:
    logging.info("Resuming at step %d", start_step)
  evaluator = evaluation.Evaluator(config, mesh, kinds=("reconstructions",),
                                   lpips_params=lpips_params, inception_params=inception_params)

  writer = metric_writers.create_default_writer(workdir, just_logging=pi > 0, asynchronous=True)
  if start_step == 0:
    writer.write_hparams(_flat_hparams(config))
  report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  hooks = [report] if pi == 0 else []
  if pi == 0 and config.profile_steps:
    hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps, logdir=workdir,
                                          first_profile=start_step + config.log_every_steps))

  def evaluate(step: int, write_images: bool) -> None:
    params = state.ema_params if state.ema_params is not None else state.params
    with watch.phase("eval"), record.phase("eval"), report.timed("eval"):
      result, grids = evaluator(params, eval_ds, pc)
    values = evaluation.scalars(result, "eval")
    writer.write_scalars(step, values)
    grid = None
    if write_images:
      writer.write_images(step, {"eval/reconstructions": grids["reconstructions"][None]})
      grid = epath.Path(workdir) / "images" / f"reconstructions_{step:08d}.png"
      if pi == 0:
        evaluation.write_png(grid, grids["reconstructions"])
    if pi == 0:
      eval_history.append(workdir, step, result, grid)
    logging.info("Eval at step %d: %s, L1 %.4f", step, rfid.table_line(result), result["l1"])

  def before_save(step: int) -> None:
    watch.phase_entered("save")
    record.checkpoint_committed(step)
    record.flush()

  if pc > 1:
    # Tell JAX's preemption sync where this session starts: a notice that lands before the loop
    # first asks (during the first step's evaluation) is then agreed for a step still ahead, not
    # for step 1 of a run resumed at a later one (observed: the notice was lost, the run went on).
    manager.reached_preemption(start_step)
  compiled: set[str] = set()
  train_metrics, last_log, skipped = None, (start_step, time.time()), 0
  max_bad = config.optimizer.max_consecutive_nonfinite
  with metric_writers.ensure_flushes(writer):
    if start_step == 0:
      evaluate(0, write_images=True)
    for step in range(start_step, config.num_train_steps):
      # As taming-transformers: adversarial from the step whose 0-based index is disc.start_step.
      use_gan = progs.gan_step is not None and step >= config.disc.start_step
      variant = "gan" if use_gan else "ae"
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        with record.phase("data"):
          local = next(train_iter)
        skipped += int(np.sum(local.pop(skipping.SKIPPED_KEY, 0)))  # Host-side, not for devices.
        batch = sharding.global_batch(local, mesh)
        if variant not in compiled:  # The first call compiles: time it as such.
          with watch.phase("compile"), record.phase("compile"):
            state, m = (progs.gan_step if use_gan else progs.ae_step)(state, batch)
            jax.block_until_ready(m)
          compiled.add(variant)
        else:
          watch.phase_entered("step")
          state, m = (progs.gan_step if use_gan else progs.ae_step)(state, batch)
      watch.steps_completed()
      train_metrics = m if train_metrics is None else train_metrics.merge(m)
      done = step + 1
      record.step_end(done)
      last = done == config.num_train_steps
      for hook in hooks:
        hook(done)

      if max_bad and int(state.opt_state.notfinite_count) >= max_bad:
        manager.wait_until_finished()
        raise NonFiniteError(
            f"{int(state.opt_state.notfinite_count)} consecutive steps up to step {done} had a "
            f"non-finite loss or gradient (optimizer.max_consecutive_nonfinite={max_bad}); those "
            f"updates were skipped, and the latest checkpoint {manager.latest_step()} holds the last "
            "good state. Lower the learning rate, enable optimizer.grad_clip_norm, or check the data.")

      if done % config.log_every_steps == 0 or last:
        values = {f"train/{k}": float(v) for k, v in train_metrics.compute().items()
                  if config.disc.enabled or k not in steps.ADVERSARIAL_METRICS}
        elapsed = time.time() - last_log[1]
        values["train/images_per_sec"] = ((done - last_log[0]) * config.global_batch_size /
                                          max(elapsed, 1e-9))
        if pc > 1:  # Unreadable files skipped by all processes since the last write.
          skipped = int(np.sum(multihost_utils.process_allgather(np.asarray([skipped]))))
        values["data/skipped"] = skipped
        values.update(record.flush())
        skipped = 0
        writer.write_scalars(done, values)
        train_metrics, last_log = None, (done, time.time())

      if done % config.eval_every_steps == 0 or done % config.image_every_steps == 0 or last:
        evaluate(done, write_images=done % config.image_every_steps == 0 or last)

      preempted = watch.requested() if pc == 1 else manager.reached_preemption(done)
      if preempted:
        writer.flush()
      with record.phase("checkpoint"):
        checkpointing.save_or_stop(manager, done, state, resumed.data_position, config, last=last,
                                   preempted=preempted, before_save=before_save)
  with record.phase("checkpoint"):
    manager.wait_until_finished()
  manager.close()
  record.close()
  if pi == 0:
    logging.info("Finished at step %d.\n%s", config.num_train_steps,
                 eval_history.summary(eval_history.read(workdir)))
  logging.info("%s", record.summary())
  return state
