"""One process's share of a training run's lifecycle: the workdir's lease, preemption, goodput and
checkpoints.

A `Session` owns what decides whether and how a run goes on: the lease on the workdir (process 0
holds it; a second run on a live workdir is refused before anything is written), the SIGTERM policy
(`preemption.Watch`, and JAX's preemption sync point on several processes), the goodput record
(`goodput.Recorder`, mirrored to Cloud Logging when asked), the hang diagnostics when asked, and the
Orbax checkpoint manager. The loop talks to it in one vocabulary of phases (`PHASES`), which serves
both preemption (the fault injection of tests) and goodput:

  startup     process start to the first step (counted by goodput without being entered)
  restore     reading the checkpoint a run resumes from
  compile     the first call of each step variant
  data        waiting for the next batch
  step        a train step (productive time)
  eval        an evaluation
  checkpoint  a save (or waiting for one to commit)

  rollback    rolling back to an earlier checkpoint (the guard)

and calls it at three points: `restore` once, `run_step` for each step, `after_step` after each step
(hooks such as logging and evaluation, then roll back, save or stop). A SIGTERM or preemption notice
ends the run in `after_step`: the reached step is saved and `Preempted` raised (exit 42). The
loop's log hook hands the logged metrics to `observe`, where the guard (`run.guard`) judges them;
a verdict makes the next `after_step` roll back and return the checkpoint to continue from.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import jax
import ml_collections
from absl import logging

from vae_scale.data import sampler
from vae_scale.errors import LeaseError
from vae_scale.errors import NonFiniteError
from vae_scale.errors import Preempted
from vae_scale.eval import report
from vae_scale.run import checkpoints
from vae_scale.run import cloud
from vae_scale.run import cloud_goodput
from vae_scale.run import goodput
from vae_scale.run import guard as guard_lib
from vae_scale.run import hang_watch
from vae_scale.run import lease as lease_lib
from vae_scale.run import preemption
from vae_scale.run import resume

PHASES = ("startup", "restore", "compile", "data", "step", "eval", "checkpoint", "rollback")
Hook = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class Options:
  """How this process runs its session, from main's flags; nothing of it is stored with the run.

  Attributes:
    force_lease: take the workdir's lease from its holder (--force_lease: the operator knows that
      run is gone).
    cloud: hang diagnostics and goodput in Cloud Monitoring (`run.cloud`'s opt-in flags:
      `run.hang_watch`, `run.cloud_goodput`).
  """

  force_lease: bool = False
  cloud: cloud.Options = dataclasses.field(default_factory=cloud.Options)


class Session:
  """The lifecycle of one training session of a run, in this process; a context manager whose
  exit releases the lease and the diagnostics however the session ends.

  Args:
    workdir: the run directory (local or gs://).
    config: the run's config (checkpoint interval and retention, non-finite limit).
    watch: the process's SIGTERM policy, installed first thing by `main`; None: a fresh one (tests
      and library use: SIGTERM then keeps its default meaning until a step completes).
    options: the operator's flags (`Options`); None: the defaults.
  Raises:
    LeaseError: another live run holds the workdir (nothing was written to it).

  The lease is taken at construction; `begin` starts writing into the workdir.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict,
               watch: preemption.Watch | None = None, options: Options | None = None):
    self.workdir, self.config = str(workdir), config
    self.watch = watch or preemption.Watch()
    options = options or Options()
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.chief = self.process_index == 0
    self._options = options
    self._exit = contextlib.ExitStack()
    self.lease = self._take_lease(options.force_lease)  # Before anything is written.
    self.hooks: list[Hook] = []  # Called with the step after each step, before saving, in order.
    self.guard = guard_lib.Guard(config)
    self._verdict: guard_lib.Verdict | None = None  # Seen at a log step, acted on after it.
    self._unhealthy = False  # A verdict the guard (off) did not act on: later saves are suspect.
    self._evaluated: tuple[int, dict[str, float]] = (-1, {})
    self._restore_target: tuple[Any, Any] | None = None  # (abstract state, sharding).
    self._lr_scaled_until = -1
    self._compiled: set[str] = set()
    self._pending_commit: int | None = None  # A step whose asynchronous save may not be done.

  def begin(self) -> "Session":
    """Starts writing into the workdir: the goodput record, the checkpoint manager, the opt-in
    diagnostics. The loop calls it once its input, weights and config have passed their checks,
    so a run refused for bad input leaves nothing behind but a released lease."""
    options = self._options
    try:
      self.recorder = goodput.Recorder(self.workdir, enabled=self.chief,
                                       start_time=self.watch.start_time)
      self.cloud_goodput = cloud_goodput.CloudGoodput(
          self.workdir, enabled=options.cloud.cloud_goodput and self.chief,
          run_name=options.cloud.cloud_goodput_run_name,
          upload_interval_s=options.cloud.cloud_goodput_upload_s,
          start_time=self.watch.start_time)
      self._exit.callback(self.cloud_goodput.close)
      self.hang = self._exit.enter_context(hang_watch.hang_diagnostics(
          options.cloud.hang_diagnostics, options.cloud.hang_timeout_s,
          options.cloud.stack_trace_to_cloud))
      self.manager = checkpoints.create_manager(self.workdir, self.config)
    except BaseException:
      self._exit.close()
      raise
    return self

  def _take_lease(self, force: bool) -> lease_lib.Lease | None:
    """Process 0 takes the workdir's lease; every process learns whether it did (the others trust
    it: they share the run). Released when the session ends, and before an immediate exit 42."""
    held, error = None, None
    if self.chief:
      held = lease_lib.Lease(self.workdir)
      try:
        held.acquire(force=force)
      except LeaseError as e:
        held, error = None, e
      else:
        self.watch.at_exit(held.release)
        self._exit.callback(held.release)
    if not checkpoints.all_ok(error is None):
      raise error or LeaseError(f"process 0 could not take the lease on {self.workdir}; its log "
                                "names the run holding it")
    return held

  def __enter__(self) -> "Session":
    return self

  def __exit__(self, *exc) -> None:
    self._exit.close()

  # ------------------------------------------------------------------------- phases

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Marks the block as phase `name` (one of PHASES) for preemption and goodput."""
    if name not in PHASES:
      raise ValueError(f"unknown phase {name!r}; use one of {', '.join(PHASES)}")
    self.watch.phase_entered(name)
    if name == "step":  # Productive time: what goodput attributes to steps by default.
      yield
      return
    with self.recorder.phase(name), self.cloud_goodput.phase(name):
      yield

  # ------------------------------------------------------------------------- the three calls

  def restore(self, *, abstract_state: Any, replicated: Any,
              data_source: str = "") -> resume.Restored | None:
    """The newest usable checkpoint planned against the config (`resume.restore_latest`), or None;
    tells goodput where this session starts and JAX's preemption sync where it stands."""
    self._restore_target = (abstract_state, replicated)
    with self.phase("restore"):
      restored = resume.restore_latest(
          self.manager, config=self.config, workdir=self.workdir, abstract_state=abstract_state,
          replicated=replicated, data_source=data_source)
    start = restored.step if restored is not None else 0
    self.recorder.restored(start)
    self.cloud_goodput.restored(start)
    if self.process_count > 1:
      # Tell JAX's preemption sync where this session starts: a notice that lands before the loop
      # first asks (during the first evaluation) is then agreed for a step still ahead, not for
      # step 1 of a run resumed at a later one (observed: the notice was lost, the run went on).
      self.manager.reached_preemption(start)
    return restored

  def run_step(self, variant: str, step_fn: Callable[..., tuple[Any, Any]], state: Any,
               batch: Any, lr_scale: float = 1.0) -> tuple[Any, Any]:
    """`step_fn(state, batch, lr_scale)`; its first call per `variant` is the compile phase (timed
    to the end of the step), the others the step phase (dispatched asynchronously)."""
    if variant in self._compiled:
      with self.phase("step"):
        return step_fn(state, batch, lr_scale)
    with self.phase("compile"):
      out = step_fn(state, batch, lr_scale)
      jax.block_until_ready(out[1])
    self._compiled.add(variant)
    return out

  def lr_scale(self, step: int) -> float:
    """The learning-rate factor of the step after `step` (guard.lr_factor after a rollback)."""
    return float(self.config.guard.lr_factor) if step < self._lr_scaled_until else 1.0

  def observe(self, step: int, values: dict[str, float], state: Any) -> None:
    """At a log step: the guard judges the window's logged scalars (`values`) and the current
    non-finite streak (read from `state` here, at log steps only).

    Raises:
      NonFiniteError: the guard is off and the streak reached optimizer.max_consecutive_nonfinite.
    """
    verdict = self.guard.observe(step, values, int(state.opt_state.notfinite_count))
    if verdict is None:
      self._unhealthy = False
    elif self.guard.enabled:
      self._verdict = verdict
    elif verdict.trigger == "nonfinite":
      self.wait_for_saves()
      raise NonFiniteError(
          f"{verdict.streak} consecutive steps up to step {step} had a non-finite loss or gradient "
          f"(optimizer.max_consecutive_nonfinite={self.guard.max_nonfinite}, guard off); those "
          f"updates were skipped, and the latest checkpoint {self.manager.latest_step()} holds the "
          "last good state. Lower the learning rate, enable optimizer.grad_clip_norm, or check the "
          "data.")
    else:
      self._unhealthy = True
      logging.warning("guard (off): %s at step %d; checkpoints from here on are marked unhealthy",
                      verdict.detail, step)

  def note_eval(self, step: int, metrics: dict[str, float]) -> None:
    """The held-out metrics evaluated at `step` ('eval/psnr', ...), for checkpoint.keep_best."""
    self._evaluated = (step, metrics)

  def after_step(self, step: int, state: Any,
                 data_position: sampler.DataPosition) -> resume.Restored | None:
    """After `step` steps: the hooks (logging, evaluation), then a rollback if the guard saw
    trouble, else save on the checkpoint interval, at the last step, at evaluations when keeping
    the best, and when preempted.

    Returns:
      None; or after a rollback, the checkpoint to continue from (`resume.state_from` builds the
      state, `resume.data_position` the stream's new position past the skipped window).
    Raises:
      Diverged: the guard's rollbacks are used up (exit 3); NonFiniteError: the same, guard off.
      Preempted: a SIGTERM or preemption notice arrived; `step` was saved.
    """
    self.watch.steps_completed()
    self.recorder.step_end(step)
    self.cloud_goodput.step_end(step)
    self.hang.beat()
    if self.lease is not None:
      self.lease.check()  # Another run took the workdir over: stop without writing to it.
    self._note_commit()
    for hook in self.hooks:
      hook(step)
    if self._verdict is not None:
      return self._roll_back(data_position)
    preempted = (self.watch.requested() if self.process_count == 1
                 else self.manager.reached_preemption(step))
    last = step == self.config.num_train_steps
    evaluated = self._evaluated[1] if self._evaluated[0] == step else {}
    keep_best = self.config.checkpoint.keep_best
    if (step % self.config.checkpoint_every_steps == 0 or last or preempted or (
        keep_best and keep_best in evaluated)) and self.manager.latest_step() != step:
      with self.phase("checkpoint"):
        checkpoints.save(self.manager, step, state, data_position, self.config,
                         healthy=not self._unhealthy, metrics=evaluated)
      if self._pending_commit is not None:  # Orbax finishes a save before it starts the next.
        self.recorder.checkpoint_committed(self._pending_commit)
      self._pending_commit = step
      self.recorder.flush()
    if preempted:
      self.wait_for_saves()
      logging.warning("Preempted: saved step %d to %s; rerun the same command to resume.", step,
                      self.manager.directory)
      raise Preempted(step)

  # ------------------------------------------------------------------------- the rest

  def scalars(self) -> dict[str, float]:
    """The run's goodput so far ('goodput/...'; {} on processes other than 0); writes its record."""
    return self.recorder.flush()

  def wait_for_saves(self) -> None:
    """Waits until every save started has committed."""
    with self.phase("checkpoint"):
      self.manager.wait_until_finished()
    self._note_commit()

  def close(self) -> str:
    """Waits for the saves, closes the manager and the goodput record, releases the lease and the
    diagnostics; returns goodput's summary."""
    self.wait_for_saves()
    self.manager.close()
    self.recorder.close()
    self._exit.close()
    return self.recorder.summary()

  def _note_commit(self) -> None:
    """Tells goodput about a checkpoint once it has committed (a later session may restore it)."""
    if self._pending_commit is not None and not self.manager.is_saving_in_progress():
      self.recorder.checkpoint_committed(self._pending_commit)
      self._pending_commit = None

  def _roll_back(self, data_position: sampler.DataPosition) -> resume.Restored:
    """Acts on the guard's verdict (`guard.roll_back`); records it in goodput and the history."""
    verdict, self._verdict = self._verdict, None
    self.wait_for_saves()
    suspect = max(self.config.log_every_steps, verdict.streak)
    abstract_state, replicated = self._restore_target
    with self.phase("rollback"):
      restored = guard_lib.roll_back(
          verdict, manager=self.manager, config=self.config, workdir=self.workdir,
          abstract_state=abstract_state, replicated=replicated, position=data_position,
          suspect_steps=suspect)
    self.recorder.rolled_back(restored.step)
    self.guard.reset()
    self._lr_scaled_until = restored.step + self.config.guard.lr_steps
    if self.chief:
      report.append_event(self.workdir, verdict.step,
                          f"rollback ({verdict.trigger}): back to step {restored.step}")
    return restored
