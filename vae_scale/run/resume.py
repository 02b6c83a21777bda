"""Resume planning: which checkpoint to continue from, reconciled with the rerun's config, and
what to build for the parts it lacks.

The loop's start reads as the Flax examples' does:

  restored = session.restore(...)              # `restore_latest`: the stored state, or None
  state = resume.state_from(restored, ...)     # what the config builds, taken from it where it fits
  position = resume.data_position(restored, ...)
  train_iter = stream(position.global_examples)

Rules (the README's "What may change at a resume"):
- Damage is not difference. A checkpoint whose own files are missing, unreadable or inconsistent is
  quarantined (`checkpoints.quarantine`) and the previous one is tried. A checkpoint that is fine but
  was written under another config is reconciled with the current one (`reconcile`); one of another
  architecture is refused with one line before any array is read. Nothing valid is moved or deleted.
- Elastic: arrays are restored with shardings of the current mesh and the data position is one
  global number, so a checkpoint written by any number of processes and devices resumes on any other
  whose share divides the global batch, reading the examples an uninterrupted run would have read.
  Checkpoints of vae_scale before that (Grain's per-process iterator states in `data/`) resume too:
  the model exactly, the data at step * global batch, with one warning.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vae_scale.data import sampler
from vae_scale.errors import DataError
from vae_scale.run import checkpoints
from vae_scale.run import reconcile
from vae_scale.run import state_tree


@dataclasses.dataclass(frozen=True)
class Restored:
  """The checkpoint a run resumes from.

  Attributes:
    step: its step (steps already trained).
    state: its state as stored (nested dicts of arrays on the current mesh).
    plan: how the rerun's config differs from the stored one, and what to do about it.
    data_start: the global example index at which the train stream continues.
  """

  step: int
  state: Any
  plan: reconcile.Plan
  data_start: int


def _first_line(error: Exception | None, fallback: str) -> str:
  return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}" if (
      error is not None) else fallback


def restore_latest(manager: ocp.CheckpointManager, *, config: ml_collections.ConfigDict,
                   workdir: str, abstract_state: Any, replicated: Any,
                   data_source: str = "") -> Restored | None:
  """The newest usable checkpoint, planned against `config`; None for a fresh run.

  Args:
    manager: the run's checkpoint manager.
    config: the rerun's config (compared with the one stored with each checkpoint).
    workdir: the run directory (messages and the resume log).
    abstract_state: ShapeDtypeStructs (with shardings) of the state `config` builds.
    replicated: the sharding every restored array is placed with.
    data_source: repr() of the train source (a different recorded one is warned about).
  Raises:
    ConfigError: the checkpoint holds another architecture (nothing on disk is touched).
    DataError: the data position was written by a newer vae_scale.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    restored = restore_at(manager, step, config=config, workdir=workdir,
                          abstract_state=abstract_state, replicated=replicated,
                          data_source=data_source)
    if restored is not None:
      return restored
  return None


def restore_at(manager: ocp.CheckpointManager, step: int, *, config: ml_collections.ConfigDict,
               workdir: str, abstract_state: Any, replicated: Any, data_source: str = "",
               log_plan: bool = True) -> Restored | None:
  """Checkpoint `step` planned against `config`, or None when it is damaged (then quarantined).

  Args: as `restore_latest`; log_plan: log the config changes and append them to the resume log.
  Raises: as `restore_latest`.
  """
  directory = epath.Path(manager.directory)
  wanted = state_tree.leaf_shapes(abstract_state)
  try:
    tree, old_config, error = (checkpoints.stored_tree(directory, step),
                               checkpoints.stored_config(directory, step), None)
  except Exception as e:  # pylint: disable=broad-except
    tree, old_config, error = None, None, e
  if not checkpoints.all_ok(error is None):
    checkpoints.quarantine(manager, step, _first_line(error, "another process could not read it"))
    return None
  stored = state_tree.leaf_shapes(tree)
  if old_config is not None:  # Names exact differences; refuses another architecture.
    plan = reconcile.reconcile(old_config, config, step, workdir)
  else:  # Written before configs were stored: the tree says what differs.
    plan = reconcile.Plan(step, reset_data=False)
    state_tree.log_difference(step, stored, wanted)
  if any(stored.get(k) != s for k, s in wanted.items() if k.startswith("params/")) or any(
      k.startswith("params/") and k not in wanted for k in stored):
    raise state_tree.architecture_refusal(workdir, step, stored, wanted)
  if log_plan:
    plan.log()
    reconcile.append_resume_log(workdir, step, plan, enabled=jax.process_index() == 0)
  try:
    raw = checkpoints.restore_stored(manager, step, tree, replicated)
    # A changed data source or seed restarts the stream at the beginning of the new order.
    start = 0 if plan.reset_data else data_start(
        checkpoints.data_record_dir(directory, step), step, config, old_config, data_source)
    error = None
  except DataError:
    raise  # A newer format is the user's to resolve, not a damaged checkpoint.
  except Exception as e:  # pylint: disable=broad-except
    raw, error = None, e
  if checkpoints.all_ok(error is None):
    logging.info("Restored checkpoint %d from %s; the data continues at global example %d",
                 step, directory, start)
    return Restored(step, raw, plan, start)
  checkpoints.quarantine(manager, step, _first_line(error, "another process failed to restore it"))
  return None


def state_from(restored: Restored | None, abstract_state: Any, init: Callable[[], Any], *,
               init_params: Any = None, replicated: Any = None, init_vf_proj: Any = None) -> Any:
  """The state to train: the restored one carried over onto what the config builds (fresh parts
  from `init`, Adam moments reset where `freeze_encoder` switched), or a fresh one.

  Args:
    restored: `restore_latest`'s result, or None.
    abstract_state: the state the config builds (ShapeDtypeStructs).
    init: builds a fresh, sharded state (jitted).
    init_params: autoencoder params a fresh run starts from (config.init_from), or None.
    replicated: their sharding.
    init_vf_proj: the VF projection a fresh run starts from (from an init_from run whose loss had
      the VF term, as LightningDiT's next stage starts from the last one's), or None.
  """
  if restored is not None:
    return state_tree.reset_moments(state_tree.graft(abstract_state, restored.state, init),
                                    restored.plan)
  state = init()
  if init_params is not None:
    params = jax.device_put(init_params, replicated)
    state = state.replace(params=params, ema_params=(
        jax.tree.map(jax.numpy.copy, params) if state.ema_params is not None else None))
  if init_vf_proj is not None and state.vf_proj is not None:
    state = state.replace(vf_proj=jax.device_put(
        np.asarray(init_vf_proj, np.float32), replicated))
  return state


def data_position(restored: Restored | None, config: ml_collections.ConfigDict,
                  data_source: str = "") -> sampler.DataPosition:
  """Where the train stream continues, and what later checkpoints record of it."""
  step, start = (restored.step, restored.data_start) if restored is not None else (0, 0)
  return sampler.DataPosition(step, start, config.global_batch_size, data_source, config.seed)


# --------------------------------------------------------------------------- data position


_GRAIN_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def grain_state_process_count(data_dir: epath.PathLike) -> int | None:
  """How many processes wrote Grain iterator states in `data_dir` (the `data` item of checkpoints
  from vae_scale before elastic data); None: no such state there."""
  d = epath.Path(data_dir)
  if not d.is_dir():
    return None
  counts = {int(m.group(2)) for p in d.iterdir() if (m := _GRAIN_STATE_FILE.search(p.name))}
  return max(counts) if counts else None


def data_start(data_dir: epath.PathLike, step: int, config: ml_collections.ConfigDict,
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
