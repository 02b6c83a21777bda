"""Config changes at resume: what differs from the config a checkpoint was saved with, what to do.

Every checkpoint stores its run's config (`config.serialize.to_json`); before restoring, resume
planning calls `reconcile(stored, config, step, workdir)`: a `Plan` (log lines and the flags the
loop acts on), or a ConfigError when the run cannot continue. Pure decision logic (no arrays). What
a change of each field means is the `resume` column of `config.schema.FIELDS`; the kinds of change:

  architecture  refused, nothing on disk touched: a parameter shape or module of the autoencoder
                (resume='architecture'; attn_resolutions / image_size when attention moves to other
                levels), model.norm_groups (same shapes, but the weights were trained for another
                function: continuing it must be asked for with init_from), and, when enabled before
                and after, the discriminator's architecture (group norm has no statistics).
  ema           ema_decay switched between 0 and > 0: the average starts from the restored
                parameters / is dropped from new checkpoints (older ones keep it).
  disc          disc.enabled switched: discriminator and optimizer start fresh / their state is
                dropped from new checkpoints (older ones keep it).
  freeze        freeze_encoder switched: the encoder side's Adam moments reset, the decoder's stay.
  vf            loss.vf_weight switched between 0 and > 0: the VF loss's 1x1 projection and its Adam
                moments start fresh / are dropped from new checkpoints (older ones keep them); a
                new loss.vf_feature_dim (another DINOv2 width) starts them fresh too.
  data          the train stream reads something else (source, path, tfds name/split/key, a folder's
                held-out split, synthetic size, seed): the model continues,
                the stream restarts from its beginning.
  continue      the same state: optimizer, schedule, loss, dtype, remat, intervals, evaluation...;
                a learning rate that jumps more than 1% at the resume step is warned about.

`seed` is `data`: the step's random stream is in the checkpoint (TrainState.rng) and continues; the
seed only orders the data and picks a folder's held-out files, so the stream restarts under the new
shuffle, with a warning (louder when held-out files change: some were trained on).
`global_batch_size` is `continue` with a warning: Grain counts its position in examples, so the
stream goes on where it stood, but every step-counted setting now covers other numbers of images.
Fields in only one of the configs (another vae_scale version) are `continue` with a warning.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import ml_collections
from absl import logging

from vae_scale.config import schema
from vae_scale.config import serialize
from vae_scale.errors import ConfigError
from vae_scale.run import resume_log
from vae_scale.training import optim

KINDS = ("architecture", "ema", "disc", "freeze", "vf", "data", "continue")
LR_JUMP = 0.01  # Relative change of the learning rate at the resume step that is warned about.
LDM_BASE_LEARNING_RATE = 4.5e-6  # LDM: learning rate = this x global batch (configs/pods.py).

_RESTART = ("the model continues from the checkpoint, the data stream restarts from its beginning "
            "(epoch 0 of the seeded shuffle)")


class _Absent:
  """A field missing from one of the two configs."""

  def __repr__(self) -> str:
    return "<absent>"


ABSENT = _Absent()


@dataclasses.dataclass(frozen=True)
class Change:
  """One field that differs. `old`/`new` are JSON-like values (lists for tuples) or ABSENT."""

  field: str  # Dotted name, e.g. "model.ch_mult".
  old: Any
  new: Any
  kind: str  # One of KINDS.
  note: str  # What happens, e.g. "EMA turned on; the average starts from the restored ...".
  warn: bool = False  # Log as a warning.

  def line(self, step: int) -> str:
    return f"resume at step {step}: {self.field} {_fmt(self.old)} -> {_fmt(self.new)}: {self.note}"


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the loop does at a resume with a changed config: log `lines` (`warnings` as warnings),
  then act on the flags. ema_on: EMA from the restored params; ema_off: drop it; disc_on: fresh
  discriminator and optimizer; disc_off: drop their state; freeze_changed: reset the Adam moments of
  optim.ENCODER_SIDE; reset_data: restore without the data iterator. learning_rates: (old, new)
  rate at `step` when a schedule field changed."""

  step: int
  changes: tuple[Change, ...] = ()
  lines: tuple[str, ...] = ()
  warnings: tuple[str, ...] = ()
  ema_on: bool = False
  ema_off: bool = False
  disc_on: bool = False
  disc_off: bool = False
  freeze_changed: bool = False
  reset_data: bool = False
  learning_rates: tuple[float, float] | None = None

  def log(self) -> None:
    """Logs every line (warnings as warnings) with absl."""
    for line in self.lines:
      (logging.warning if line in self.warnings else logging.info)("%s", line)


def _fmt(value: Any) -> str:
  return repr(tuple(value)) if isinstance(value, list) else repr(value)


def _attention_levels(f: dict[str, Any]) -> tuple[int, ...] | None:
  """The levels of the autoencoder with self-attention (besides the mid block); None: unknown."""
  try:
    res, attn = int(f["image_size"]), set(f["model.attn_resolutions"])
    return tuple(i for i in range(len(f["model.ch_mult"])) if res // 2**i in attn)
  except (KeyError, TypeError, ValueError):
    return None


def _data_effect(field: str, o: dict[str, Any], n: dict[str, Any]) -> str:
  """'train' (changes what the train stream reads), 'eval' (only the eval set), or 'none', for a
  field whose resume kind is 'stream' or 'eval_set'."""
  source = n.get("data.source")
  row = schema.FIELDS[field]
  if field == "data.source" or o.get("data.source") != source:
    return "train"
  if row.resume == "stream":
    return "train" if source in row.sources else "none"
  if field == "num_eval_images":
    return "eval"
  if source == "folder" and field == "data.eval_path":
    # With an eval_path all of data.path trains; without, a held-out share is taken out of it.
    return "train" if bool(o.get(field)) != bool(n.get(field)) else "eval"
  if source == "folder" and field == "data.eval_fraction":
    return "train" if not (o.get("data.eval_path") or n.get("data.eval_path")) else "none"
  if source == "tfds" and field == "data.eval_split":
    return "eval"
  return "none"


def _classify(field: str, old: Any, new: Any, o: dict[str, Any],
              n: dict[str, Any]) -> tuple[str, str, bool]:
  """(kind, note, warn) of one changed field; o and n are the flattened old and new configs."""
  if old is ABSENT or new is ABSENT:
    where = "added to" if old is ABSENT else "removed from"
    return ("continue", f"a field {where} the config since the checkpoint (another vae_scale "
            "version?); assumed not to change the saved state", True)
  kind = schema.FIELDS[field].resume if field in schema.FIELDS else "continue"
  if kind == "architecture":
    return "architecture", "changes the autoencoder's parameter shapes or modules", False
  if kind == "norm_groups":
    return ("architecture", "same parameter shapes, but the weights were trained to compute "
            "another function", False)
  if kind == "attention":
    before, after = _attention_levels(o), _attention_levels(n)
    if before != after or before is None:
      return "architecture", "moves self-attention to other levels of the autoencoder", False
    if field == "model.attn_resolutions":
      return "continue", "no level gains or loses attention at this image_size", False
    if n.get("data.source") in ("synthetic", "samples"):
      return "data", f"the {n['data.source']} source is built at the image size: {_RESTART}", True
    return "continue", "the model is fully convolutional: same parameters, other crop size", False
  if kind == "disc_architecture":
    if o.get("disc.enabled") and n.get("disc.enabled"):
      return "architecture", "changes the discriminator's architecture", False
    return "continue", "no saved discriminator state is affected (it is off before or after)", False
  dropped = "is dropped from new checkpoints (older checkpoints keep it)"
  if kind == "disc":
    return "disc", ("discriminator turned on; it and its optimizer start from a fresh init"
                    if new else f"discriminator turned off; its state {dropped}"), False
  if kind == "ema":
    if (old > 0) != (new > 0):
      return "ema", ("EMA turned on; the average starts from the restored parameters" if new > 0
                     else f"EMA turned off; the average {dropped}"), False
    return "continue", "EMA decay changed; the average continues", False
  if kind == "vf":
    return _vf_change(field, old, new, o, n)
  if kind == "freeze":
    side = " and ".join(optim.ENCODER_SIDE)
    return "freeze", (f"encoder frozen: {side} stop training and their Adam moments are reset"
                      if new else f"encoder unfrozen: {side} train again with Adam moments from "
                      "zero") + "; the decoder's are kept", False
  if kind == "init":
    return "continue", "only read when a run starts (step 0); no effect on a resumed run", True
  if kind == "seed":
    note = ("the data order changes (the train step's random stream is saved in the checkpoint "
            f"and continues): {_RESTART}")
    if n.get("data.source") == "folder" and not n.get("data.eval_path"):
      note += ("; the held-out evaluation files change and some were trained on: eval metrics are "
               "not comparable with earlier ones")
    return "data", note, True
  if kind == "batch":
    base = LDM_BASE_LEARNING_RATE
    return ("continue", f"each step now takes {new} images instead of {old}; the data position "
            "(counted in images) is kept, but step-counted settings (num_train_steps, schedule, "
            f"disc.start_step, intervals) now cover {new / old:.3g}x as many images (LDM scales "
            f"learning rates with the batch: {base:g} x {new} = {base * new:.3g}; "
            f"optimizer.learning_rate is {n.get('optimizer.learning_rate')!r})", True)
  if kind == "decode":  # The data position is global; workers and prefetching only decode.
    return "continue", "decoding and prefetching only; the data position and order are kept", False
  if kind in ("stream", "eval_set"):
    effect = _data_effect(field, o, n)
    if effect == "train":
      return "data", f"changes what the train stream reads: {_RESTART}", True
    if effect == "eval":
      return ("continue", "changes the evaluation set: eval metrics from here on are not "
              "comparable with earlier ones", True)
    return "continue", f"no effect with data.source={n.get('data.source')!r}", False
  if kind == "disc_learning_rate" and o.get("disc.enabled") and n.get("disc.enabled"):
    jump = abs(new - old) > LR_JUMP * max(abs(old), abs(new))
    return "continue", "the discriminator's constant learning rate changes", jump
  if kind == "compute":
    return "continue", "computation only; the parameters are unchanged", False
  return "continue", "same state; training continues", False


def _vf_change(field: str, old: Any, new: Any, o: dict[str, Any], n: dict[str, Any]
               ) -> tuple[str, str, bool]:
  """(kind, note, warn) of a changed loss.vf_weight or loss.vf_feature_dim."""
  was, now = o.get("loss.vf_weight", 0) > 0, n.get("loss.vf_weight", 0) > 0
  if field == "loss.vf_weight":
    if was != now:
      return "vf", ("VF loss turned on; its 1x1 projection and Adam moments start fresh" if now
                    else "VF loss turned off; its projection is dropped from new checkpoints "
                    "(older checkpoints keep it)"), False
    return ("continue", "the VF weight changes (as between VA-VAE's stages); the projection "
            "continues", False)
  if was and now:
    return "vf", (f"the projection now maps to DINOv2's width {new}: it and its Adam moments "
                  "start fresh"), True
  return "continue", "no effect with the VF loss off", False


def diff(old: dict[str, Any], new: ml_collections.ConfigDict | dict[str, Any]) -> list[Change]:
  """Every field that differs between a stored config and the rerun's, classified.

  Args:
    old: the config the checkpoint was saved with (`serialize.from_json` output, or any config).
    new: the rerun's config.
  Returns:
    The changes, sorted by dotted field name; fields in only one config have old or new ABSENT.
  """
  o, n = serialize.flatten(old), serialize.flatten(new)
  changes = []
  for field in sorted(set(o) | set(n)):
    a, b = o.get(field, ABSENT), n.get(field, ABSENT)
    # Same value and type; 1 and 1.0 are the same setting, True and 1 are not.
    if a == b and (type(a) is type(b) or {type(a), type(b)} <= {int, float}):
      continue
    kind, note, warn = _classify(field, a, b, o, n)
    changes.append(Change(field, a, b, kind, note, warn))
  return changes


def _architecture_error(arch: list[Change], step: int, workdir: str) -> ConfigError:
  names = [f"config.{c.field}: {_fmt(c.old)} -> {_fmt(c.new)}" for c in arch]
  what = names[0] + (f" (and {'; '.join(names[1:])})" if names[1:] else "")
  # init_from loads the autoencoder's weights into the new architecture: only when shapes fit.
  fits = all(c.field == "model.norm_groups" or c.field.startswith("disc.") for c in arch)
  second = (f"start a new run from these weights with --workdir=NEW --config.init_from={workdir}"
            if fits else "rerun with the checkpoint's values to resume it (its weights do not fit "
            "the new shapes, so --config.init_from cannot start from them either)")
  return ConfigError(f"{what} changes the architecture of the run in {workdir} (checkpoint step "
                     f"{step}); nothing was changed on disk. Either train in a new --workdir, or "
                     f"{second}")


def plan(changes: list[Change], step: int, old_config: dict[str, Any] | ml_collections.ConfigDict,
         new_config: ml_collections.ConfigDict | dict[str, Any], *,
         workdir: str = "WORKDIR") -> Plan:
  """Decides how to resume at checkpoint `step` with `changes` (from `diff`).

  Args:
    changes: from `diff(old_config, new_config)`.
    step: the checkpoint step the run resumes from.
    old_config, new_config: the stored and the rerun's config (dicts or ConfigDicts).
    workdir: the run's workdir, named in the error message.
  Raises:
    ConfigError: architecture changes: one line with each field old -> new and the ways forward.
  """
  arch = [c for c in changes if c.kind == "architecture"]
  if arch:
    raise _architecture_error(arch, step, workdir)
  o, n = serialize.flatten(old_config), serialize.flatten(new_config)
  rates, lr_checked, out = None, False, []
  for c in changes:
    note, warn = c.note, c.warn
    if c.old is ABSENT or c.new is ABSENT:
      out.append(c)
      continue
    if schema.FIELDS.get(c.field, schema.Field(str)).resume == "learning_rate" and not lr_checked:
      lr_checked = True
      try:
        rates = tuple(float(optim.learning_rate_schedule(g.optimizer, g.num_train_steps)(step))
                      for g in (serialize.from_dict(old_config),
                                 serialize.from_dict(new_config)))
      except (AttributeError, KeyError, TypeError, ValueError) as e:
        note += f"; the learning rates at step {step} cannot be compared ({e})"
      else:
        a, b = rates
        if abs(b - a) > LR_JUMP * max(abs(a), abs(b)):
          change = f"{100 * (b - a) / a:+.1f}%" if a else "from 0"
          note += f"; the learning rate at step {step} jumps {a:.4g} -> {b:.4g} ({change})"
          warn = True
        else:
          note += f"; the learning rate at step {step} stays {b:.4g}"
    if c.field == "num_train_steps" and c.new <= step:
      note, warn = note + f"; the run already has {step} steps: nothing is left to train", True
    if c.field == "disc.start_step" and o.get("disc.enabled") and n.get("disc.enabled"):
      if (step >= c.old) != (step >= c.new):
        note, warn = note + ("; the adversarial term starts at this step" if step >= c.new else
                             f"; the adversarial term pauses until step {c.new}"), True
    if c.field == "disc.enabled" and c.new and step >= n.get("disc.start_step", 0):
      note, warn = note + (f"; disc.start_step={n.get('disc.start_step')} has passed, so it "
                           "trains from this step on against a trained autoencoder"), True
    out.append(dataclasses.replace(c, note=note, warn=warn))
  lines = tuple(c.line(step) for c in out)
  has = lambda kind, on: any(c.kind == kind and bool(c.new) == on for c in out)
  return Plan(
      step=step, changes=tuple(out), lines=lines,
      warnings=tuple(line for c, line in zip(out, lines) if c.warn),
      ema_on=has("ema", True), ema_off=has("ema", False),
      disc_on=has("disc", True), disc_off=has("disc", False),
      freeze_changed=any(c.kind == "freeze" for c in out),
      reset_data=any(c.kind == "data" for c in out), learning_rates=rates)


def reconcile(old: dict[str, Any] | str, new: ml_collections.ConfigDict, step: int,
              workdir: str = "WORKDIR") -> Plan:
  """`plan(diff(old, new), ...)`; `old` may be the stored JSON text itself."""
  old = serialize.from_json(old) if isinstance(old, str) else old
  return plan(diff(old, new), step, old, new, workdir=workdir)


def append_resume_log(workdir: str | os.PathLike, step: int, resume_plan: Plan, *,
                      enabled: bool = True, clock=time.time) -> None:
  """Appends one entry per change to WORKDIR/resume_log.jsonl (`resume_log`); a no-op unless
  `enabled`. Entries: time (`clock()`), step, field, old, new ("<absent>" for a missing field),
  kind, warn, message (the plan's line)."""
  if not enabled:
    return
  now, _json = clock(), lambda v: repr(v) if v is ABSENT else v
  resume_log.append(workdir, [
      {"time": now, "step": step, "field": c.field, "old": _json(c.old), "new": _json(c.new),
       "kind": c.kind, "warn": c.warn, "message": line}
      for c, line in zip(resume_plan.changes, resume_plan.lines)])
