"""Checkpoints own resume: one Orbax CheckpointManager per run, restore-or-init, save-or-stop.

Each checkpoint `WORKDIR/checkpoints/<step>/` holds three items committed together: `state` (the
TrainState), `data` (the train stream's position: global examples consumed, a small JSON record,
see `data.sampler`) and `config` (the run's config as JSON). The loop calls `restore_or_init` once
and `save_or_stop` after every step.

Elastic resume: arrays are restored with shardings of the current mesh and the data position is one
global number, so a checkpoint written by any number of processes and devices resumes on any other
whose share divides the global batch, reading the examples an uninterrupted run would have read.
Checkpoints of vae_scale before that (Grain's per-process iterator states in `data/`) resume too:
the model exactly, the data at global example step * global batch of the new order, with one
warning that the examples from there on differ from the ones the old run would have read.

Reliability rules:
- A checkpoint exists only once Orbax has committed it (written to a temporary directory, then
  renamed), so a run killed mid-save leaves a temporary directory that is ignored and cleaned up.
- Damage is not difference. A checkpoint whose own files are missing, unreadable or inconsistent is
  moved to `WORKDIR/checkpoints_damaged/` and the previous one is restored. A checkpoint that is
  fine but was written under another config (EMA or the discriminator switched, another
  `freeze_encoder`, other hyperparameters, another data source) is reconciled with the current one
  (see `reconcile`); one of another architecture is refused with one line. Nothing valid is ever
  moved or deleted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vae_scale import reconcile
from vae_scale import state_tree
from vae_scale.data import sampler
from vae_scale.errors import ConversionError
from vae_scale.errors import DataError
from vae_scale.errors import Preempted

ITEMS = ("state", "data", "config")


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """An asynchronous manager under `workdir/checkpoints` keeping the latest N checkpoints."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_checkpoints_to_keep, create=True, enable_async_checkpointing=True,
      cleanup_tmp_directories=True)  # Half-written saves of a killed run.
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", item_names=ITEMS,
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_position: sampler.DataPosition, config: ml_collections.ConfigDict) -> None:
  """Starts saving `state` (after `step` steps), the data position and the config; returns
  once the arrays are copied off the devices, so the state may be donated right after."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(state),
      data=ocp.args.JsonSave(data_position.record(step)),
      config=ocp.args.JsonSave(json.loads(reconcile.config_to_json(config)))), force=True)


def stored_config(directory: epath.PathLike, step: int) -> dict[str, Any] | None:
  """The config saved with checkpoint `step` (None: written before configs were stored)."""
  path = epath.Path(directory) / str(step) / "config" / "metadata"
  return json.loads(path.read_text()) if path.exists() else None


def _stored_tree(directory: epath.Path, step: int) -> Any:
  md = ocp.PyTreeCheckpointHandler().metadata(directory / str(step) / "state")
  return getattr(md, "tree", md)


def _all_ok(ok: bool) -> bool:
  """True when every process reports ok (all processes take the same decision)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.asarray([ok], np.int32))
  return bool(np.all(flags))


def _quarantine(manager: ocp.CheckpointManager, step: int, why: str) -> None:
  """Moves a damaged checkpoint out of the manager's directory (process 0), then syncs."""
  logging.warning("Checkpoint at step %d is damaged and cannot be restored (%s); falling back to "
                  "the previous checkpoint.", step, why)
  if jax.process_index() == 0:
    src = epath.Path(manager.directory) / str(step)
    dst_dir = epath.Path(manager.directory).parent / "checkpoints_damaged"
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / f"{step}-{int(time.time())}"
    if src.exists():
      src.rename(dst)
      logging.warning("Moved damaged checkpoint %s to %s", src, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"vae_scale_quarantine_{step}")
  manager.reload()


# --------------------------------------------------------------------------- restore or init


@dataclasses.dataclass
class Resumed:
  """What `restore_or_init` hands the loop."""

  state: Any
  data_iter: Any  # The train stream from the restored position.
  step: int  # Steps already trained (0 for a fresh run).
  data_position: sampler.DataPosition  # What `save` records at later steps.


def _restore_stored(manager: ocp.CheckpointManager, step: int, stored_tree: Any,
                    sharding: Any) -> Any:
  """The state as stored (dicts and lists, whatever its structure), each array placed with
  `sharding` on the current mesh (never gathered on one device): any device and process count."""
  restore_args = jax.tree.map(
      lambda m: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=m.shape, dtype=m.dtype),
      stored_tree)
  items = {"state": ocp.args.PyTreeRestore(restore_args=restore_args)}
  return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_or_init(manager: ocp.CheckpointManager, *, config: ml_collections.ConfigDict,
                    workdir: str, abstract_state: Any, init: Callable[[], Any],
                    make_data_iter: Callable[[int], Any], replicated: Any,
                    init_params: Any = None, data_source: str = "") -> Resumed:
  """Restores the newest usable checkpoint, reconciled with `config`, or initialises a fresh run.

  Args:
    manager: the run's manager.
    config: the current run config (compared with the one stored with the checkpoint).
    workdir: the run directory (for messages and the resume log).
    abstract_state: ShapeDtypeStructs (with shardings) of the state `config` builds.
    init: builds a fresh, sharded state (jitted); used for a fresh run and for the parts a
      checkpoint lacks (the discriminator switched on, say).
    make_data_iter: the train stream from a global example index (0: the beginning).
    replicated: the sharding of every restored array.
    init_params: autoencoder params to start a fresh run from (config.init_from), or None.
    data_source: repr() of the train source, recorded with the data position.
  Returns:
    The state, the data iterator at the saved position (example-exact for any process count),
    the step and the data position.
  Raises:
    ConfigError: the checkpoint holds another architecture (nothing on disk is touched).
    DataError: the data position was written by a newer vae_scale.
  """
  directory = epath.Path(manager.directory)
  wanted = state_tree.leaf_shapes(abstract_state)
  pi = jax.process_index()
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      stored_tree, old_config, error = _stored_tree(directory, step), stored_config(directory,
                                                                                   step), None
    except Exception as e:  # pylint: disable=broad-except
      stored_tree, old_config, error = None, None, e
    if not _all_ok(error is None):
      _quarantine(manager, step, f"{type(error).__name__}: {str(error).splitlines()[0]}" if error
                  else "another process could not read it")
      continue
    stored = state_tree.leaf_shapes(stored_tree)
    if old_config is not None:  # Names exact differences; refuses another architecture.
      plan = reconcile.reconcile(old_config, config, step, workdir)
    else:  # Written before configs were stored: the tree says what differs.
      plan = reconcile.Plan(step, reset_data=False)
      state_tree.log_difference(step, stored, wanted)
    if any(stored.get(k) != s for k, s in wanted.items() if k.startswith("params/")) or any(
        k.startswith("params/") and k not in wanted for k in stored):
      raise state_tree.architecture_refusal(workdir, step, stored, wanted)
    plan.log()
    reconcile.append_resume_log(workdir, step, plan, enabled=pi == 0)
    try:
      raw = _restore_stored(manager, step, stored_tree, replicated)
      state = state_tree.reset_moments(state_tree.graft(abstract_state, raw, init), plan)
      # A changed data source or seed restarts the stream at the beginning of the new order.
      start = 0 if plan.reset_data else data_start(directory / str(step) / "data", step, config,
                                                   old_config, data_source)
      error = None
    except DataError:
      raise  # A newer format is the user's to resolve, not a damaged checkpoint.
    except Exception as e:  # pylint: disable=broad-except
      state, error = None, e
    if _all_ok(error is None):
      logging.info("Restored checkpoint %d from %s; the data continues at global example %d",
                   step, directory, start)
      position = sampler.DataPosition(step, start, config.global_batch_size, data_source,
                                      config.seed)
      return Resumed(state, make_data_iter(start), step, position)
    _quarantine(manager, step, f"{type(error).__name__}: {str(error).splitlines()[0]}" if error
                else "another process failed to restore it")
  state = init()
  if init_params is not None:
    params = jax.device_put(init_params, replicated)
    state = state.replace(params=params, ema_params=(
        jax.tree.map(jax.numpy.copy, params) if state.ema_params is not None else None))
    logging.info("Initialized the autoencoder from %s", config.init_from)
  position = sampler.DataPosition(0, 0, config.global_batch_size, data_source, config.seed)
  return Resumed(state, make_data_iter(0), 0, position)


# --------------------------------------------------------------------------- data position


_GRAIN_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def grain_state_process_count(data_dir: str | os.PathLike) -> int | None:
  """How many processes wrote Grain iterator states in `data_dir` (the `data` item of checkpoints
  from vae_scale before elastic data); None: no such state there."""
  d = epath.Path(data_dir)
  if not d.is_dir():
    return None
  counts = {int(m.group(2)) for p in d.iterdir() if (m := _GRAIN_STATE_FILE.search(p.name))}
  return max(counts) if counts else None


def data_start(data_dir: str | os.PathLike, step: int, config: ml_collections.ConfigDict,
               old_config: dict[str, Any] | None = None, data_source: str = "") -> int:
  """The global example index at which the train stream of a resume from checkpoint `step` starts.

  Args:
    data_dir: the checkpoint's data item, e.g. WORKDIR/checkpoints/1000/data.
    step: the checkpoint's step.
    config: the current config.
    old_config: the config stored with the checkpoint (None: not stored).
    data_source: repr() of the current train source (a different recorded one is warned about).
  Returns:
    The position recorded in the checkpoint. A checkpoint without one (Grain's per-process
    iterator states of an older vae_scale, or no data item) continues at step * its global batch
    with one warning: the model resumes exactly, the examples from there on differ from the ones
    the old run would have read.
  Raises:
    ValueError / OSError: an unreadable record (the checkpoint is damaged).
    DataError: a record of a newer format version.
  """
  d = epath.Path(data_dir)
  record_file = d / "metadata"  # Where Orbax's JsonSave puts the record.
  if record_file.exists():
    record = json.loads(record_file.read_text())
    start = sampler.examples_from_record(record, str(record_file))
    if data_source and record.get("source") and record["source"] != data_source:
      logging.warning(
          "resume at step %d: the train source is now %s, the checkpoint's was %s: the stream "
          "continues at global example %d, but of another order than the old run's", step,
          data_source, record["source"], start)
    return start
  batch = int((old_config or {}).get("global_batch_size", config.global_batch_size))
  start = step * batch
  writers = grain_state_process_count(d)
  what = (f"Grain's iterator states of {writers} process{'es' if writers != 1 else ''} (an older "
          "vae_scale's format)" if writers else "no data position")
  logging.warning(
      "resume at step %d: the checkpoint holds %s; the model resumes exactly and the data "
      "continues at global example %d (step %d x global batch %d) of the global order, so the "
      "examples after this resume differ from the ones the old run would have read next.",
      step, what, start, step, batch)
  return start


# --------------------------------------------------------------------------- save or stop


def save_or_stop(manager: ocp.CheckpointManager, step: int, state: Any,
                 data_position: sampler.DataPosition, config: ml_collections.ConfigDict, *,
                 last: bool, preempted: bool,
                 before_save: Callable[[int], None] | None = None) -> None:
  """Saves on the checkpoint interval, at the last step, and when preempted; then, if preempted,
  waits for the save to commit and raises `Preempted(step)` (exit 42: rerun to resume).

  Args:
    before_save: called with the step just before a save starts (fault injection, goodput).
  """
  if (step % config.checkpoint_every_steps == 0 or last or preempted) and (
      manager.latest_step() != step):
    if before_save is not None:
      before_save(step)
    save(manager, step, state, data_position, config)
  if preempted:
    manager.wait_until_finished()
    logging.warning("Preempted: saved step %d to %s; rerun the same command to resume.", step,
                    manager.directory)
    raise Preempted(step)


# --------------------------------------------------------------------------- reading runs


def _resolve_step(workdir: str, step: int | None) -> tuple[epath.Path, int]:
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.exists():
    raise ConversionError(f"{workdir} has no checkpoints/ (is it a run workdir?)")
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not steps:
    raise ConversionError(f"{directory} holds no checkpoint yet")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ConversionError(f"{directory} has no checkpoint of step {step}; it has {steps}")
  return directory, step


def read_state(workdir: str, step: int | None = None, keys: tuple[str, ...] | None = None,
               targets: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
  """Reads parts of a run checkpoint's train state without building the run (no optimizer, any
  topology): the one reader behind evaluate, encode, export and the tests.

  Args:
    workdir: the run directory.
    step: the checkpoint; None = the latest.
    keys: top-level TrainState fields to read (default: all that are stored).
    targets: for some keys, abstract trees (ShapeDtypeStructs, with shardings to place them on
      devices) the stored arrays must match; the others come back as numpy arrays.
  Returns:
    ({key: tree}, step).
  Raises:
    ConversionError: no such run or checkpoint, or stored shapes that don't match `targets`.
  """
  directory, step = _resolve_step(workdir, step)
  tree = _stored_tree(directory, step)
  keys = tuple(k for k in (tree if keys is None else keys) if tree.get(k) is not None)
  targets = targets or {}
  item = {}
  for k in keys:
    if k in targets:
      state_tree.check_shapes(tree[k], targets[k], f"{directory / str(step)} {k}")
      item[k] = targets[k]
    else:
      item[k] = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree[k])
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding) if getattr(a, "sharding", None)
      else ocp.RestoreArgs(restore_type=np.ndarray), item)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(directory / str(step) / "state", args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  return {k: out[k] for k in keys}, step


def read_params(workdir: str, model_cfg: Any, *, step: int | None = None, weights: str = "auto",
                sharding: Any = None) -> tuple[dict, int, str]:
  """The autoencoder weights of a run's checkpoint, without its optimizer or discriminator.

  Args:
    workdir: the run directory.
    model_cfg: the run's `AutoencoderConfig` (the stored shapes must match it).
    step: which checkpoint; None = the latest.
    weights: 'auto' (EMA when the run keeps it), 'ema' or 'params'.
    sharding: a jax Sharding for every array (e.g. replicated over a mesh); None = numpy arrays.
  Returns:
    (params, step, 'ema' | 'params').
  """
  from vae_scale import models  # pylint: disable=g-import-not-at-top
  directory, step = _resolve_step(workdir, step)
  tree = _stored_tree(directory, step)
  has_ema = tree.get("ema_params") is not None
  if weights == "ema" and not has_ema:
    raise ConversionError(f"the run in {workdir} keeps no EMA weights (ema_decay=0)")
  key = "ema_params" if (weights == "ema" or (weights == "auto" and has_ema)) else "params"
  abstract = models.abstract_params(model_cfg)
  if sharding is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            abstract)
  got, step = read_state(workdir, step, keys=(key,), targets={key: abstract})
  return got[key], step, "ema" if key == "ema_params" else "params"
