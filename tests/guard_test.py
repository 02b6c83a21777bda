"""run.guard: detection on hand-made metrics, and rollbacks of real runs with injected faults (the
test-only `run.faults` hook corrupts chosen global examples: a NaN burst and a finite spike)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import cpu_env
from conftest import REPO
from conftest import tiny_config
from vae_scale.data import sampler
from vae_scale.errors import Diverged
from vae_scale.eval import report
from vae_scale.run import checkpoints
from vae_scale.run import faults
from vae_scale.run import goodput
from vae_scale.run import guard as guard_lib
from vae_scale.run import loop
from vae_scale.run import preemption
from vae_scale.run import resume_log
from vae_scale.run import state_tree

# --------------------------------------------------------------------------- detection


def _guard(**overrides):
  return guard_lib.Guard(tiny_config(**{"guard.warmup_steps": 20, "guard.window": 4,
                                        "guard.spike_factor": 3.0, **overrides}))


def test_a_spike_after_the_warm_up_is_judged_against_the_median_of_healthy_windows():
  guard = _guard()
  for step, loss in ((10, 9.0), (20, 1.0), (30, 1.1), (40, 0.9), (50, 1.0)):
    assert guard.observe(step, {"train/rec_loss": loss}, 0) is None  # 9.0 is in the warm-up.
  verdict = guard.observe(60, {"train/rec_loss": 3.5}, 0)
  assert (verdict.trigger, verdict.step) == ("spike", 60) and "median 1" in verdict.detail
  # The spike did not join the median: the next spike is judged against the healthy windows.
  assert guard.observe(70, {"train/rec_loss": 3.2}, 0).trigger == "spike"
  assert guard.observe(80, {"train/rec_loss": 2.9}, 0) is None
  assert guard.last_healthy_step == 80


def test_a_nonfinite_streak_at_the_limit_is_a_verdict_and_shorter_ones_are_not():
  guard = _guard(**{"optimizer.max_consecutive_nonfinite": 3})
  assert guard.observe(5, {"train/rec_loss": float("nan")}, 2) is None
  verdict = guard.observe(6, {"train/rec_loss": float("nan")}, 3)
  assert (verdict.trigger, verdict.streak) == ("nonfinite", 3)


def test_a_discriminator_pinned_at_zero_for_the_window_count_is_a_collapse():
  guard = _guard(**{"disc.enabled": True, "disc.start_step": 10, "guard.collapse_windows": 3})
  assert guard.observe(10, {"train/d_loss": 0.0}, 0) is None  # Before the adversarial term.
  assert guard.observe(20, {"train/d_loss": 0.001}, 0) is None
  assert guard.observe(30, {"train/d_loss": 0.5}, 0) is None  # Resets the count.
  assert guard.observe(40, {"train/d_loss": 0.0}, 0) is None
  assert guard.observe(50, {"train/d_loss": 0.005}, 0) is None
  assert guard.observe(60, {"train/d_loss": 0.0}, 0).trigger == "disc_collapse"


def test_the_fault_hook_corrupts_the_batches_holding_the_chosen_examples():
  corrupt = faults.from_env({faults.ENV: "nan:16-17,spike:40-40"})
  x = {"image": np.ones((8, 2, 2, 3), np.float32)}
  assert np.isnan(corrupt(x, 16, 24)["image"]).all() and not np.isnan(corrupt(x, 0, 8)["image"]).any()
  assert corrupt(x, 40, 48)["image"].max() == 50.0 and corrupt(x, 48, 56)["image"].max() == 1.0
  assert faults.from_env({}) is None
  with pytest.raises(ValueError, match="KIND:FIRST-LAST"):
    faults.from_env({faults.ENV: "zero:1-2"})


def test_goodput_counts_the_steps_a_rollback_throws_away_as_badput(tmp_path):
  clock = iter(range(1000, 2000)).__next__
  rec = goodput.Recorder(str(tmp_path), clock=lambda: float(clock()))
  rec.restored(0)
  for step in range(1, 11):
    rec.step_end(step)
  rec.checkpoint_committed(4)
  rec.rolled_back(4)
  for step in range(5, 9):
    rec.step_end(step)
  values = rec.scalars()
  assert values["goodput/rollback_steps"] == 6 and values["goodput/rollback_s"] > 0
  assert "rollback" in rec.summary() and "6 steps thrown away" in rec.summary()


# --------------------------------------------------------------------------- real runs

STEPS = 16
# Global batch 8; checkpoints every 2 steps; a log line (the guard's look) every step. Step 6 reads
# examples 40-47: NaN. The rollback goes back to checkpoint 4 and the stream continues at example
# 48, so step 5 now reads 48-55 and step 11 reads 96-103: the spike. Back to 10, on from 104.
NAN_STEP, SPIKE_STEP = 6, 11
CORRUPT = "nan:40-47,spike:96-103"


def _config(**overrides):
  return tiny_config(**{"num_train_steps": STEPS, "checkpoint_every_steps": 2,
                        "log_every_steps": 1, "eval_every_steps": 100, "image_every_steps": 100,
                        "optimizer.max_consecutive_nonfinite": 1, "guard.warmup_steps": 3,
                        "guard.window": 4, "guard.spike_factor": 4.0, "guard.max_rollbacks": 2,
                        **overrides})


def _params(state):
  return jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def rolled(tmp_path_factory):
  """A run whose NaN burst and spike each trigger one rollback: (workdir, final state)."""
  workdir = str(tmp_path_factory.mktemp("rolled"))
  os.environ[faults.ENV] = CORRUPT
  try:
    state = loop.train_and_evaluate(_config(), workdir)
  finally:
    del os.environ[faults.ENV]
  return workdir, state


@pytest.mark.slow
def test_each_fault_rolls_back_once_and_the_run_equals_one_that_skipped_the_windows(rolled,
                                                                                   tmp_path):
  workdir, state = rolled
  entries = resume_log.read(workdir, kind="rollback")
  assert [(e["trigger"], e["step"], e["to_step"], e["continue_at_example"]) for e in entries] == [
      ("nonfinite", NAN_STEP, 4, 48), ("spike", SPIKE_STEP, 10, 104)]
  assert entries[0]["skipped_steps"] == [5, NAN_STEP] and entries[0]["skipped_examples"] == 16
  assert int(state.step) == STEPS
  events = [e["event"] for e in report.read_events(workdir)]
  assert events == ["rollback (nonfinite): back to step 4", "rollback (spike): back to step 10"]
  # An uninterrupted run without faults that skips the same data windows from the start: run to
  # each rollback's target, move its checkpoint's data position past the window, go on.
  ref = str(tmp_path / "ref")
  for entry, until in ((entries[0], entries[1]["to_step"]), (entries[1], STEPS)):
    loop.train_and_evaluate(_config(num_train_steps=entry["to_step"]), ref)
    position = sampler.DataPosition(entry["to_step"], entry["continue_at_example"], 8, "", 0)
    checkpoints.rewrite_data_position(checkpoints.directory(ref), entry["to_step"], position)
    final = loop.train_and_evaluate(_config(num_train_steps=until), ref)
  jax.tree.map(np.testing.assert_array_equal, _params(state), _params(final))


@pytest.mark.slow
def test_rollbacks_used_up_stop_with_exit_3_naming_the_steps(tmp_path, monkeypatch):
  monkeypatch.setenv(faults.ENV, CORRUPT)
  with pytest.raises(Diverged, match=r"spike at step 11 .* after 1 rollback\(s\) already "
                                     r"\(step 6 -> 4 \(nonfinite\)"):
    loop.train_and_evaluate(_config(**{"guard.max_rollbacks": 1}), str(tmp_path))
  assert Diverged.exit_code == 3


@pytest.mark.slow
def test_sigterm_during_a_rollback_exits_42_and_the_rerun_ends_where_the_run_without_it_does(
    rolled, tmp_path):
  workdir = str(tmp_path / "run")
  env = cpu_env(**{faults.ENV: CORRUPT})
  argv = [sys.executable, "-m", "vae_scale.main", f"--config={REPO / 'tests' / 'tiny_config.py'}",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in (
              ("num_train_steps", STEPS), ("checkpoint_every_steps", 2), ("log_every_steps", 1),
              ("eval_every_steps", 100), ("image_every_steps", 100),
              ("optimizer.max_consecutive_nonfinite", 1), ("guard.warmup_steps", 3),
              ("guard.window", 4), ("guard.spike_factor", 4.0), ("guard.max_rollbacks", 2))]
  first = subprocess.run(argv, env=dict(env, **{preemption.FAULT_ENV: "rollback:1"}), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
  assert first.returncode == 42, first.stderr[-3000:]
  assert len(resume_log.read(workdir, kind="rollback")) == 1
  second = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert [e["step"] for e in resume_log.read(workdir, kind="rollback")] == [NAN_STEP, SPIKE_STEP]
  final, _ = checkpoints.read_state(workdir, STEPS)
  want, got = state_tree.flat(_params(rolled[1])), state_tree.flat(final["params"])
  assert sorted(want) == sorted(got)
  for name, leaf in want.items():
    np.testing.assert_array_equal(leaf, got[name], err_msg=name)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_agree_on_the_rollback(tmp_path):
  """2 processes x 4 devices: each reaches the same verdict from the replicated metrics, so both
  roll back to the same checkpoint and skip the same window (one resume-log line, process 0's)."""
  workdir = str(tmp_path / "run")
  env = dict(os.environ, VAE_PYTHON=sys.executable, **{faults.ENV: "nan:40-47"})
  flags = [f"--config={REPO / 'tests' / 'tiny_config.py'}", "--config.num_train_steps=8",
           "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
           "--config.eval_every_steps=100", "--config.image_every_steps=100",
           "--config.optimizer.max_consecutive_nonfinite=1"]
  proc = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "2", "--devices_per_process=4",
                         "--heartbeat_timeout_seconds=20", f"--log_dir={tmp_path}/logs", *flags,
                         f"--workdir={workdir}"], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  logs = [open(os.path.join(tmp_path, "logs", f), encoding="utf-8").read()
          for f in sorted(os.listdir(os.path.join(tmp_path, "logs")))]
  assert proc.returncode == 0, proc.stderr[-2000:] + "".join(l[-2000:] for l in logs)
  assert len(logs) == 2
  for log in logs:
    assert "guard: nonfinite at step 6" in log and "rolled back to checkpoint 4" in log
  (entry,) = resume_log.read(workdir, kind="rollback")
  assert (entry["step"], entry["to_step"], entry["continue_at_example"]) == (6, 4, 48)
  assert checkpoints.list_steps(workdir)[-1] == 8
