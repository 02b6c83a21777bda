"""Checkpoint I/O: the run's Orbax CheckpointManager, what a checkpoint holds, and reading it back.

Each checkpoint `WORKDIR/checkpoints/<step>/` holds three items committed together: `state` (the
TrainState), `data` (the train stream's position: global examples consumed, a small JSON record,
see `data.sampler`) and `config` (the run's config as JSON, `config.serialize`). A checkpoint exists
only once Orbax has committed it (written to a temporary directory, then renamed), so a run killed
mid-save leaves a temporary directory that is ignored and cleaned up.

Here: the manager (`create_manager`), `save`, the one listing of a workdir's checkpoints
(`list_steps`), the stored config and tree, restoring the state as stored onto the current mesh,
moving a damaged checkpoint aside (`quarantine`), and the readers behind evaluate, encode, export
and `init_from` (`read_state`, `read_params`), which need no optimizer and no particular topology.
Deciding what to restore belongs to `run.resume`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as policies
from etils import epath
from jax.experimental import multihost_utils

from vae_scale import models
from vae_scale.config import schema
from vae_scale.config import serialize
from vae_scale.data import sampler
from vae_scale.errors import ConversionError
from vae_scale.run import state_tree

ITEMS = ("state", "data", "config")
DIRECTORY = "checkpoints"
DAMAGED_DIRECTORY = "checkpoints_damaged"
ROLLED_BACK_DIRECTORY = "checkpoints_rolled_back"
HEALTHY = "healthy"  # Orbax metric of every checkpoint: 1.0 when saved while the guard saw no trouble.


def directory(workdir: epath.PathLike) -> epath.Path:
  """WORKDIR/checkpoints."""
  return epath.Path(workdir) / DIRECTORY


def list_steps(workdir: epath.PathLike) -> list[int]:
  """The committed checkpoints' steps of a run, ascending ([] when there are none); Orbax's
  temporary directories of unfinished saves are not listed."""
  d = directory(workdir)
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@dataclasses.dataclass
class _NewestHealthy(policies.PreservationPolicy):
  """Keeps the newest checkpoint saved while healthy: a rollback's target is never deleted."""

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
    healthy = [i for i, c in enumerate(checkpoints) if (c.metrics or {}).get(HEALTHY, 1.0) > 0]
    keep = healthy[-1] if healthy else None
    return [i == keep for i in range(len(checkpoints))]


def _metric_fn(metric: str) -> Any:
  """The value Orbax ranks checkpoints by for `metric` (higher is better; absent: the worst)."""
  sign = 1.0 if schema.HIGHER_IS_BETTER[metric] else -1.0
  return lambda metrics: sign * float((metrics or {}).get(metric, -sign * math.inf))


def create_manager(workdir: epath.PathLike, config: ml_collections.ConfigDict, *,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """An asynchronous manager under `workdir/checkpoints` keeping the latest N checkpoints, the
  newest healthy one (a rollback target) and, with checkpoint.keep_best, the best by that metric."""
  keep = [policies.LatestN(n=config.max_checkpoints_to_keep), _NewestHealthy()]
  metric = config.checkpoint.keep_best
  if metric:
    keep.append(policies.BestN(get_metric_fn=_metric_fn(metric), n=1,
                               keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep), create=not read_only,
      read_only=read_only, enable_async_checkpointing=True,
      cleanup_tmp_directories=not read_only,  # Half-written saves of a killed run.
      # Orbax writes a checkpoint's metrics (healthy, the keep_best metric) only with a best_fn.
      best_fn=_metric_fn(metric or "eval/psnr"), best_mode="max")
  return ocp.CheckpointManager(directory(workdir), item_names=ITEMS, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_position: sampler.DataPosition, config: ml_collections.ConfigDict, *,
         healthy: bool = True, metrics: dict[str, float] | None = None) -> None:
  """Starts saving `state` (after `step` steps), the data position and the config; returns
  once the arrays are copied off the devices, so the state may be donated right after.

  Args:
    healthy: whether the guard had seen no trouble up to `step` (stored as Orbax's metric).
    metrics: held-out metrics measured at `step` (e.g. {'eval/psnr': 24.1}) for keep_best.
  """
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(state),
      data=ocp.args.JsonSave(data_position.record(step)),
      config=ocp.args.JsonSave(json.loads(serialize.to_json(config)))), force=True,
      metrics={HEALTHY: 1.0 if healthy else 0.0, **(metrics or {})})


def stored_config(checkpoints_dir: epath.PathLike, step: int) -> dict[str, Any] | None:
  """The config saved with checkpoint `step` (None: written before configs were stored)."""
  path = epath.Path(checkpoints_dir) / str(step) / "config" / "metadata"
  return json.loads(path.read_text()) if path.exists() else None


def stored_tree(checkpoints_dir: epath.PathLike, step: int) -> Any:
  """Orbax's metadata tree of checkpoint `step`'s state (shapes and dtypes, no arrays)."""
  md = ocp.PyTreeCheckpointHandler().metadata(epath.Path(checkpoints_dir) / str(step) / "state")
  return getattr(md, "tree", md)


def data_record_dir(checkpoints_dir: epath.PathLike, step: int) -> epath.Path:
  """Where checkpoint `step`'s data position (or an older format's iterator states) lies."""
  return epath.Path(checkpoints_dir) / str(step) / "data"


def restore_stored(manager: ocp.CheckpointManager, step: int, tree: Any, sharding: Any) -> Any:
  """The state as stored (dicts and lists, whatever its structure), each array placed with
  `sharding` on the current mesh (never gathered on one device): any device and process count."""
  restore_args = jax.tree.map(
      lambda m: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=m.shape, dtype=m.dtype), tree)
  items = {"state": ocp.args.PyTreeRestore(restore_args=restore_args)}
  return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def all_ok(ok: bool) -> bool:
  """True when every process reports ok (all processes take the same decision)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.asarray([ok], np.int32))
  return bool(np.all(flags))


def set_aside(manager: ocp.CheckpointManager, steps: Sequence[int], where: str) -> None:
  """Moves checkpoints to WORKDIR/`where`/STEP-TIME (process 0; nothing is deleted), then syncs
  the processes and reloads the manager. No steps: nothing happens."""
  if not steps:
    return
  if jax.process_index() == 0:
    dst_dir = epath.Path(manager.directory).parent / where
    dst_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
      src, dst = epath.Path(manager.directory) / str(step), dst_dir / f"{step}-{int(time.time())}"
      if src.exists():
        src.rename(dst)
        logging.warning("Moved checkpoint %s to %s", src, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"vae_scale_set_aside_{where}_{min(steps, default=0)}")
  manager.reload()


def quarantine(manager: ocp.CheckpointManager, step: int, why: str) -> None:
  """Moves a damaged checkpoint to WORKDIR/checkpoints_damaged/ (process 0), then syncs."""
  logging.warning("Checkpoint at step %d is damaged and cannot be restored (%s); falling back to "
                  "the previous checkpoint.", step, why)
  set_aside(manager, [step], DAMAGED_DIRECTORY)


def is_healthy(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether checkpoint `step` was saved while the guard saw no trouble (older ones: yes)."""
  return float((manager.metrics(step) or {}).get(HEALTHY, 1.0)) > 0


def rewrite_data_position(checkpoints_dir: epath.PathLike, step: int,
                          position: sampler.DataPosition, **extra: Any) -> None:
  """Replaces checkpoint `step`'s data position (process 0; atomically: a new file, then a rename)
  so that every later resume from it continues at `position`; `extra` fields are recorded too."""
  if jax.process_index() == 0:
    path = data_record_dir(checkpoints_dir, step) / "metadata"
    tmp = path.with_name(f".metadata.tmp-{int(time.time() * 1e6)}")
    tmp.write_text(json.dumps({**position.record(step), **extra}))
    tmp.replace(path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"vae_scale_data_position_{step}")


# --------------------------------------------------------------------------- reading runs


def best_step(workdir: str) -> int:
  """The step of the best checkpoint by the run's checkpoint.keep_best metric.

  Raises:
    ConversionError: the run keeps no best checkpoint, or none has the metric yet.
  """
  steps = list_steps(workdir)
  stored = stored_config(directory(workdir), steps[-1]) if steps else None
  metric = ((stored or {}).get("checkpoint") or {}).get("keep_best", "")
  if not metric:
    raise ConversionError(f"the run in {workdir} keeps no best checkpoint (its "
                          "checkpoint.keep_best is empty); pass --step=N or leave --step out")
  manager = create_manager(workdir, serialize.from_dict(stored), read_only=True)
  try:
    scored = [(s, (manager.metrics(s) or {}).get(metric)) for s in manager.all_steps()]
  finally:
    manager.close()
  scored = [(s, v) for s, v in scored if v is not None]
  if not scored:
    raise ConversionError(f"no checkpoint of {workdir} has {metric} yet (it is measured at "
                          "evaluation steps)")
  higher = schema.HIGHER_IS_BETTER[metric]
  return max(scored, key=lambda sv: sv[1] if higher else -sv[1])[0]


def resolve_step(workdir: str, step: int | str | None) -> tuple[epath.Path, int]:
  """(WORKDIR/checkpoints, checkpoint `step`: a number, 'best' (checkpoint.keep_best) or None for
  the latest).

  Raises:
    ConversionError: no such run or checkpoint (one line listing the steps there are).
  """
  d = directory(workdir)
  if not d.exists():
    raise ConversionError(f"{workdir} has no checkpoints/ (is it a run workdir?)")
  steps = list_steps(workdir)
  if not steps:
    raise ConversionError(f"{d} holds no checkpoint yet")
  if step == "best":
    step = best_step(workdir)
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ConversionError(f"{d} has no checkpoint of step {step}; it has {steps}")
  return d, step


def read_state(workdir: str, step: int | str | None = None, keys: tuple[str, ...] | None = None,
               targets: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
  """Reads parts of a run checkpoint's train state without building the run (no optimizer, any
  topology): the one reader behind evaluate, encode, export and the tests.

  Args:
    workdir: the run directory.
    step: the checkpoint; 'best' = the best by checkpoint.keep_best; None = the latest.
    keys: top-level TrainState fields to read (default: all that are stored).
    targets: for some keys, abstract trees (ShapeDtypeStructs, with shardings to place them on
      devices) the stored arrays must match; the others come back as numpy arrays.
  Returns:
    ({key: tree}, step).
  Raises:
    ConversionError: no such run or checkpoint, or stored shapes that don't match `targets`.
  """
  d, step = resolve_step(workdir, step)
  tree = stored_tree(d, step)
  keys = tuple(k for k in (tree if keys is None else keys) if tree.get(k) is not None)
  targets = targets or {}
  item = {}
  for k in keys:
    if k in targets:
      state_tree.check_shapes(tree[k], targets[k], f"{d / str(step)} {k}")
      item[k] = targets[k]
    else:
      item[k] = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree[k])
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding) if getattr(a, "sharding", None)
      else ocp.RestoreArgs(restore_type=np.ndarray), item)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(d / str(step) / "state", args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  return {k: out[k] for k in keys}, step


def read_params(workdir: str, model_cfg: models.AutoencoderConfig, *,
                step: int | str | None = None,
                weights: str = "auto", sharding: Any = None) -> tuple[dict, int, str]:
  """The autoencoder weights of a run's checkpoint, without its optimizer or discriminator.

  Args:
    workdir: the run directory.
    model_cfg: the run's architecture (the stored shapes must match it).
    step: which checkpoint; 'best' (checkpoint.keep_best) or None (the latest).
    weights: 'auto' (EMA when the run keeps it), 'ema' or 'params'.
    sharding: a jax Sharding for every array (e.g. replicated over a mesh); None = numpy arrays.
  Returns:
    (params, step, 'ema' | 'params').
  """
  d, step = resolve_step(workdir, step)
  has_ema = stored_tree(d, step).get("ema_params") is not None
  if weights == "ema" and not has_ema:
    raise ConversionError(f"the run in {workdir} keeps no EMA weights (ema_decay=0)")
  key = "ema_params" if (weights == "ema" or (weights == "auto" and has_ema)) else "params"
  abstract = models.abstract_params(model_cfg)
  if sharding is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            abstract)
  got, step = read_state(workdir, step, keys=(key,), targets={key: abstract})
  return got[key], step, "ema" if key == "ema_params" else "params"


def read_projection(workdir: str, step: int | str | None = None) -> np.ndarray | None:
  """The VF loss's projection [z_channels, D] stored in a run's checkpoint (latest by default),
  or None when that run has none (its loss had no VF term). Never part of the exported weights."""
  d, step = resolve_step(workdir, step)
  if stored_tree(d, step).get("vf_proj") is None:
    return None
  return read_state(workdir, step, keys=("vf_proj",))[0]["vf_proj"]
