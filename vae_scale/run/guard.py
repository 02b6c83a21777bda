"""A run's guard against divergence: when to roll back, read off the metrics logging already reads.

At every log step the loop hands the guard the window's train metrics (`train/*`, the means over
the steps since the last log line: what TensorBoard gets) and the optimizer's current non-finite
streak, so the guard adds no device-to-host copy of its own. Three triggers (`config.guard`):

  nonfinite      the last optimizer.max_consecutive_nonfinite steps or more were all non-finite
                 (optax skipped their updates; the model is intact but not learning)
  spike          past `guard.warmup_steps`, the window's reconstruction loss (train/rec_loss: the
                 part of the loss that is never negative) exceeds `guard.spike_factor` times the
                 running median of the last `guard.window` windows
  disc_collapse  the adversarial term is on and the discriminator's hinge loss has stayed within
                 `guard.collapse_tolerance` of its bound 0 for `guard.collapse_windows` windows in a
                 row: it separates every patch, and the decoder gets no useful signal from it

Every process sees the same replicated metrics, so every process reaches the same verdict without
talking to the others (as they agree on a step for preemption). A spiking window is not added to
the median, so a spike cannot raise the bar for the next one.

`roll_back` is what a verdict sets off (the session calls it): back to the newest healthy
checkpoint from before the suspect window, with the data position moved past the window
[that checkpoint, the verdict's step + guard.skip_extra]: PaLM's remedy (restart ~100 steps
earlier, skip a few hundred batches), exact and independent of the process layout because the
data position is one global number. The checkpoints after the target are set aside
(WORKDIR/checkpoints_rolled_back/, nothing is deleted), the target's data position is rewritten
so that every later resume from it skips the window too, and one JSON line goes to
WORKDIR/resume_log.jsonl. At most guard.max_rollbacks per run (counted in that log); then exit 3.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from vae_scale.data import sampler
from vae_scale.errors import Diverged
from vae_scale.run import checkpoints
from vae_scale.run import resume
from vae_scale.run import resume_log

TRIGGERS = ("nonfinite", "spike", "disc_collapse")


@dataclasses.dataclass(frozen=True)
class Verdict:
  """Why the run must roll back.

  Attributes:
    trigger: one of TRIGGERS.
    step: the log step at which it was seen (the steps since the previous log step are suspect).
    detail: one clause for the log line, e.g. 'rec_loss 0.912 > 4 x median 0.101'.
    streak: for 'nonfinite', the consecutive non-finite steps up to `step` (all suspect).
  """

  trigger: str
  step: int
  detail: str
  streak: int = 0


class Guard:
  """Watches the logged train metrics of one session (see the module docstring).

  Args:
    config: the run config (`guard.*`, optimizer.max_consecutive_nonfinite, disc.*).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    g = config.guard
    self.enabled = bool(g.enabled)
    self.spike_factor, self.warmup_steps = float(g.spike_factor), int(g.warmup_steps)
    self.collapse_windows, self.tolerance = int(g.collapse_windows), float(g.collapse_tolerance)
    self.max_nonfinite = int(config.optimizer.max_consecutive_nonfinite)
    self.adversarial_from = int(config.disc.start_step) if config.disc.enabled else None
    self._losses: collections.deque[float] = collections.deque(maxlen=int(g.window))
    self._collapsed = 0
    self.last_healthy_step: int | None = None  # The last log step whose window was healthy.

  def observe(self, step: int, values: dict[str, float], nonfinite_streak: int) -> Verdict | None:
    """Judges the window that ends at log step `step`.

    Args:
      step: the log step.
      values: the logged scalars of the window ('train/rec_loss', 'train/d_loss', ...).
      nonfinite_streak: consecutive non-finite steps up to `step` (the optimizer's counter).
    Returns:
      None when the window is healthy, else why to roll back (whether the guard is on or not:
      `enabled` says whether to act).
    """
    verdict = self._judge(step, values, nonfinite_streak)
    if verdict is None:
      self.last_healthy_step = step
    return verdict

  def reset(self) -> None:
    """Forgets the collapse count after a rollback (the median of healthy windows stays)."""
    self._collapsed = 0

  def _judge(self, step: int, values: dict[str, float], streak: int) -> Verdict | None:
    if self.max_nonfinite and streak >= self.max_nonfinite:
      return Verdict("nonfinite", step, f"{streak} consecutive non-finite steps "
                     f"(optimizer.max_consecutive_nonfinite={self.max_nonfinite})", streak)
    loss = values.get("train/rec_loss")
    if loss is not None:
      if loss != loss:  # NaN although some steps were finite: judged by the streak alone.
        return None
      if step > self.warmup_steps and len(self._losses) >= 2:
        median = statistics.median(self._losses)
        if loss > self.spike_factor * median:
          return Verdict("spike", step, f"rec_loss {loss:.4g} > guard.spike_factor "
                         f"{self.spike_factor:g} x the median {median:.4g} of the last "
                         f"{len(self._losses)} windows")
      self._losses.append(loss)
    d_loss = values.get("train/d_loss")
    if self.adversarial_from is not None and step > self.adversarial_from and d_loss is not None:
      self._collapsed = self._collapsed + 1 if d_loss <= self.tolerance else 0
      if self.collapse_windows and self._collapsed >= self.collapse_windows:
        return Verdict("disc_collapse", step, f"the discriminator's hinge loss stayed within "
                       f"{self.tolerance:g} of 0 for {self._collapsed} windows")
    return None


def roll_back(verdict: Verdict, *, manager: ocp.CheckpointManager,
              config: ml_collections.ConfigDict, workdir: str, abstract_state: Any,
              replicated: Any, position: sampler.DataPosition,
              suspect_steps: int) -> resume.Restored:
  """Rolls the run back past the suspect window of `verdict` (see the module docstring).

  Args:
    verdict: why.
    manager: the run's checkpoint manager (no save in progress).
    config, workdir: the run's.
    abstract_state, replicated: what the run's state is restored onto.
    position: where the train stream stood (the session's data position).
    suspect_steps: how many steps up to the verdict's step are suspect (the log window, or the
      non-finite streak if longer): the target is at or before verdict.step - suspect_steps.
  Returns:
    The target checkpoint as stored, with `data_start` past the skipped window.
  Raises:
    Diverged: guard.max_rollbacks are used up, or no healthy checkpoint precedes the window.
  """
  guard = config.guard
  done = resume_log.read(workdir, kind="rollback")
  what = f"{verdict.trigger} at step {verdict.step} ({verdict.detail})"
  if len(done) >= guard.max_rollbacks:
    earlier = ", ".join(f"step {e['step']} -> {e['to_step']} ({e['trigger']})" for e in done)
    raise Diverged(f"{what}, after {len(done)} rollback(s) already ({earlier or 'none'}; "
                   f"guard.max_rollbacks={guard.max_rollbacks}); the checkpoints are intact. Lower "
                   "the learning rate, enable optimizer.grad_clip_norm, or check the data.")
  before = verdict.step - max(1, int(suspect_steps))
  steps = sorted(manager.all_steps())
  candidates = [s for s in steps if s <= before and checkpoints.is_healthy(manager, s)]
  if not candidates:
    raise Diverged(f"{what}: no healthy checkpoint at or before step {before} to roll back to "
                   f"(the run has {steps}); lower checkpoint_every_steps, or rerun from scratch "
                   "with a lower learning rate.")
  target = candidates[-1]
  checkpoints.set_aside(manager, [s for s in steps if s > target],
                        checkpoints.ROLLED_BACK_DIRECTORY)
  restored = resume.restore_at(manager, target, config=config, workdir=workdir,
                               abstract_state=abstract_state, replicated=replicated,
                               data_source=position.source, log_plan=False)
  if restored is None:
    raise Diverged(f"{what}: the rollback target, checkpoint {target}, is damaged (moved to "
                   f"{checkpoints.DAMAGED_DIRECTORY}/); rerun to resume from the one before it.")
  skip_to = verdict.step + int(guard.skip_extra)
  start = position.at(skip_to)
  skipped_examples = start - position.at(target)
  entry = {"time": time.time(), "step": verdict.step, "kind": "rollback",
           "trigger": verdict.trigger, "to_step": target, "skipped_steps": [target + 1, skip_to],
           "skipped_examples": skipped_examples, "continue_at_example": start, "message": (
               f"guard: {what}: rolled back to checkpoint {target} and skipped the batches of steps "
               f"{target + 1}-{skip_to} ({skipped_examples} images)")}
  checkpoints.rewrite_data_position(
      checkpoints.directory(workdir), target,
      dataclasses.replace(position, step=target, global_examples=start),
      rollbacks=[{k: e[k] for k in ("step", "trigger", "skipped_steps")} for e in [*done, entry]])
  if jax.process_index() == 0:
    resume_log.append(workdir, [entry])
  logging.warning("%s", entry["message"])
  return dataclasses.replace(restored, data_start=start)
