"""Tests of vae_scale.goodput: accounting across restarts with a simulated clock (pure Python)."""

from __future__ import annotations

import json

import pytest

from vae_scale.run import goodput


class Clock:
  """A settable wall clock."""

  def __init__(self, t: float = 1000.0):
    self.t = t

  def __call__(self) -> float:
    return self.t

  def advance(self, seconds: float) -> None:
    self.t += seconds


def _recorder(workdir, clock, startup: float = 0.0, **kw) -> goodput.Recorder:
  return goodput.Recorder(workdir, clock=clock, start_time=clock.t - startup, **kw)


def _train(rec, clock, first: int, last: int, step_s: float = 1.0, data_s: float = 0.0,
           checkpoints=(), flush_every: int = 0, checkpoint_s: float = 0.0) -> None:
  """Steps first..last (completed-step numbers), each `step_s` of step time after `data_s` of
  data wait; checkpoints (with `checkpoint_s` of blocking) after the listed steps."""
  for step in range(first, last + 1):
    with rec.phase("data"):
      clock.advance(data_s)
    clock.advance(step_s)
    rec.step_end(step)
    if step in checkpoints:
      with rec.phase("checkpoint"):
        clock.advance(checkpoint_s)
      rec.checkpoint_committed(step)
    if flush_every and step % flush_every == 0:
      rec.flush()


def _start(rec, clock, step: int, restore_s: float = 2.0, compile_s: float = 5.0) -> None:
  """Restore, then the first step of the session inside a compile phase."""
  with rec.phase("restore"):
    clock.advance(restore_s)
  rec.restored(step)
  with rec.phase("compile"):
    clock.advance(compile_s)
  rec.step_end(step + 1)


def _shares_sum_to_one(values: dict[str, float]) -> None:
  shares = [values[f"goodput/{b}_share"] for b in goodput.BUCKETS]
  assert sum(shares) == pytest.approx(1.0)
  seconds = sum(values[f"goodput/{b}_s"] for b in goodput.BUCKETS)
  assert seconds == pytest.approx(values["goodput/wall_s"])
  assert values["goodput/goodput"] == values["goodput/productive_share"]


def _record(workdir) -> dict:
  return json.loads((workdir / goodput.FILENAME).read_text())


def test_fresh_run(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock, startup=10.0)
  assert (tmp_path / goodput.FILENAME).exists()  # Written at once: a kill now is still seen.
  _start(rec, clock, 0, restore_s=2.0, compile_s=5.0)
  with rec.phase("eval"):
    clock.advance(3.0)
  _train(rec, clock, 2, 10, step_s=1.5, data_s=0.5, checkpoints=(10,), checkpoint_s=4.0)
  clock.advance(1.0)  # After the last step: "other".
  v = rec.close()
  assert v["goodput/startup_s"] == pytest.approx(10.0)
  assert v["goodput/restore_s"] == pytest.approx(2.0)
  assert v["goodput/compile_s"] == pytest.approx(5.0)
  assert v["goodput/eval_s"] == pytest.approx(3.0)
  assert v["goodput/data_s"] == pytest.approx(9 * 0.5)
  assert v["goodput/productive_s"] == pytest.approx(9 * 1.5)
  assert v["goodput/checkpoint_s"] == pytest.approx(4.0)
  assert v["goodput/other_s"] == pytest.approx(1.0)
  assert v["goodput/recomputed_s"] == 0 and v["goodput/recomputed_steps"] == 0
  assert v["goodput/wall_s"] == pytest.approx(43.0)
  assert v["goodput/goodput"] == pytest.approx(13.5 / 43.0)
  assert v["goodput/sessions"] == 1 and v["goodput/unaccounted_s"] == 0
  _shares_sum_to_one(v)
  assert _record(tmp_path)["sessions"][0]["end"] == "clean"
  assert rec.summary().startswith("goodput 31.4% of 43.0s over 1 session; badput: startup 23.3%")


def test_unphased_time_before_the_first_step_is_startup(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock, startup=1.0)
  clock.advance(2.0)  # Building the model, say.
  rec.restored(0)
  clock.advance(3.0)  # The first step (not wrapped in compile).
  rec.step_end(1)
  clock.advance(4.0)
  rec.step_end(2)
  v = rec.flush()
  assert v["goodput/startup_s"] == pytest.approx(6.0)
  assert v["goodput/productive_s"] == pytest.approx(4.0)
  _shares_sum_to_one(v)


def test_restart_after_a_checkpoint_recomputes_the_lost_steps(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock)
  _start(rec, clock, 0)
  # Steps 2..5 take 1 s, 6..10 take 2 s; checkpoint at 5; a flush at 10, then preempted/killed.
  _train(rec, clock, 2, 5, step_s=1.0, checkpoints=(5,))
  _train(rec, clock, 6, 10, step_s=2.0)
  rec.flush()
  clock.advance(30.0)  # Killed some time after the write; restarted.
  rec2 = _recorder(tmp_path, clock, startup=5.0)
  _start(rec2, clock, 5)
  v = rec2.flush()
  assert v["goodput/recomputed_steps"] == 5
  assert v["goodput/recomputed_s"] == pytest.approx(10.0)
  assert v["goodput/productive_s"] == pytest.approx(4.0)
  assert v["goodput/unaccounted_s"] == pytest.approx(25.0)  # 30 s, less the 5 s of startup.
  assert v["goodput/sessions"] == 2
  _shares_sum_to_one(v)
  _train(rec2, clock, 7, 10, step_s=2.0)
  v = rec2.close()
  assert v["goodput/productive_s"] == pytest.approx(4.0 + 8.0)
  assert v["goodput/recomputed_steps"] == 5
  _shares_sum_to_one(v)
  summary = rec2.summary()
  assert "over 2 sessions" in summary and "recomputed" in summary and "(5 steps)" in summary
  assert "25.0s unaccounted after the last writes of 1 killed session" in summary


def test_restore_between_marks_interpolates(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock)
  _start(rec, clock, 0)
  rec.checkpoint_committed(1)
  _train(rec, clock, 2, 11, step_s=1.0, checkpoints=(11,))
  rec.flush()
  rec2 = _recorder(tmp_path, clock)
  rec2.restored(6)  # No mark at 6: 5 of the 10 counted seconds (steps 2..11) are recomputed.
  v = rec2.flush()
  assert v["goodput/recomputed_steps"] == 5
  assert v["goodput/recomputed_s"] == pytest.approx(5.0)


def test_sigkill_without_flush(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock)
  _start(rec, clock, 0)
  _train(rec, clock, 2, 6, step_s=1.0, checkpoints=(3,), flush_every=2)  # Last write at step 6.
  _train(rec, clock, 7, 9, step_s=1.0)  # Never written.
  last_write = _record(tmp_path)["sessions"][0]["last_write"]
  del rec  # SIGKILL: no flush, no close.
  clock.advance(60.0)
  rec2 = _recorder(tmp_path, clock)
  _start(rec2, clock, 3)
  v = rec2.flush()
  # Steps 4..6 were counted (3 s) and are lost; 7..9 were never written: part of the gap.
  assert v["goodput/recomputed_steps"] == 3
  assert v["goodput/recomputed_s"] == pytest.approx(3.0)
  assert v["goodput/productive_s"] == pytest.approx(2.0)  # Steps 2..3 (step 1 was compile).
  assert v["goodput/unaccounted_s"] == pytest.approx(clock.t - 7.0 - last_write)
  record = _record(tmp_path)
  assert [s["end"] for s in record["sessions"]] == ["killed", "open"]
  assert record["sessions"][0]["kept_step"] == 3
  _shares_sum_to_one(v)


def test_repeated_restarts_count_each_lost_step_once(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock)
  _start(rec, clock, 0)
  _train(rec, clock, 2, 10, step_s=1.0, checkpoints=(5,), flush_every=1)
  rec2 = _recorder(tmp_path, clock)  # Killed at 10; resumes at 5.
  _start(rec2, clock, 5)
  _train(rec2, clock, 7, 8, step_s=1.0, flush_every=1)
  rec3 = _recorder(tmp_path, clock)  # Killed at 8 before its next checkpoint; resumes at 5 again.
  _start(rec3, clock, 5)
  v = rec3.flush()
  assert v["goodput/recomputed_steps"] == 5 + 3
  assert v["goodput/recomputed_s"] == pytest.approx(5.0 + 2.0)  # rec2's step 6 was compile.
  assert v["goodput/productive_s"] == pytest.approx(4.0)  # rec's steps 2..5.
  _shares_sum_to_one(v)


def test_checkpoint_after_the_last_write_leaves_unrecorded_steps(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock)
  _start(rec, clock, 0)
  _train(rec, clock, 2, 4, flush_every=4)
  _train(rec, clock, 5, 6, checkpoints=(6,))  # Committed, but killed before the next write.
  rec2 = _recorder(tmp_path, clock)
  rec2.restored(6)
  v = rec2.flush()
  assert v["goodput/unrecorded_steps"] == 2 and v["goodput/recomputed_steps"] == 0
  assert "2 kept steps with unrecorded time" in rec2.summary()


def test_clean_end_adds_no_gap(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock)
  _start(rec, clock, 0)
  _train(rec, clock, 2, 4, checkpoints=(4,))
  wall = rec.close()["goodput/wall_s"]
  clock.advance(3600.0)  # Preempted cleanly, rescheduled an hour later.
  rec2 = _recorder(tmp_path, clock)
  _start(rec2, clock, 4)
  v = rec2.flush()
  assert v["goodput/unaccounted_s"] == 0 and v["goodput/recomputed_steps"] == 0
  assert v["goodput/wall_s"] == pytest.approx(wall + 7.0)
  assert rec.scalars()["goodput/wall_s"] == wall  # A closed session does not grow.


def test_nested_phases_and_pending_step_time(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock)
  _start(rec, clock, 0)
  with rec.phase("eval"):
    clock.advance(2.0)
    with rec.phase("checkpoint"):
      clock.advance(3.0)
    clock.advance(1.0)
  clock.advance(0.5)  # Logging between steps: part of the next step.
  v = rec.flush()
  assert v["goodput/eval_s"] == pytest.approx(3.0)
  assert v["goodput/checkpoint_s"] == pytest.approx(3.0)
  assert v["goodput/other_s"] == pytest.approx(0.5)  # Not yet attributed at this write.
  clock.advance(1.0)
  rec.step_end(2)
  v = rec.flush()
  assert v["goodput/productive_s"] == pytest.approx(1.5) and v["goodput/other_s"] == 0
  with pytest.raises(ValueError, match="unknown goodput phase"):
    with rec.phase("lunch"):
      pass


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 99, "sessions": []}',
                                     '{"version": 1, "sessions": [{"start": 1}]}'])
def test_corrupt_record_starts_fresh(tmp_path, content):
  (tmp_path / goodput.FILENAME).write_text(content)
  clock = Clock()
  rec = _recorder(tmp_path, clock)
  _start(rec, clock, 7)
  v = rec.flush()
  assert v["goodput/sessions"] == 1 and v["goodput/recomputed_steps"] == 0
  assert (tmp_path / (goodput.FILENAME + ".bad")).read_text() == content
  assert _record(tmp_path)["sessions"][0]["restored_step"] == 7


def test_unwritable_workdir_never_fails_the_run(tmp_path):
  workdir = tmp_path / "file"
  workdir.write_text("a file where the workdir should be")
  clock = Clock()
  rec = _recorder(workdir, clock)
  _start(rec, clock, 0)
  _train(rec, clock, 2, 3, checkpoints=(3,))
  v = rec.close()
  assert v["goodput/productive_s"] == pytest.approx(2.0)
  assert rec.summary().startswith("goodput")


def test_disabled_recorder_is_a_no_op(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock, enabled=False)
  _start(rec, clock, 0)
  _train(rec, clock, 2, 3, checkpoints=(3,))
  assert rec.flush() == {} and rec.close() == {} and rec.summary() == ""
  assert not list(tmp_path.iterdir())


def test_no_temp_files_left(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock)
  _start(rec, clock, 0)
  rec.close()
  assert [p.name for p in tmp_path.iterdir()] == [goodput.FILENAME]


def test_marks_are_bounded(tmp_path):
  clock = Clock()
  rec = _recorder(tmp_path, clock)
  _start(rec, clock, 0)
  _train(rec, clock, 2, 201, checkpoints=range(2, 202, 2))
  rec.flush()
  assert len(_record(tmp_path)["sessions"][0]["marks"]) == goodput.MAX_MARKS
  rec2 = _recorder(tmp_path, clock)
  rec2.restored(190)  # Within the kept marks: exact.
  assert rec2.flush()["goodput/recomputed_s"] == pytest.approx(11.0)


# --------------------------------------------------------------------------- a real run, killed


@pytest.mark.slow
def test_a_run_killed_with_sigkill_reports_the_recomputed_steps(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time as time_lib  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  from conftest import cpu_env  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  env = cpu_env()
  cmd = [sys.executable, "-m", "vae_scale.main", f"--config={REPO / 'tests' / 'tiny_config.py'}",
         f"--workdir={workdir}", "--config.num_train_steps=400", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=8", "--config.eval_every_steps=400",
         "--config.image_every_steps=400"]
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  record_file = workdir / goodput.FILENAME
  deadline = time_lib.time() + 240
  try:
    while time_lib.time() < deadline:  # Until steps past checkpoint 8 were counted and written.
      steps = sorted(int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*")
                     if p.name.isdigit()) if (workdir / "checkpoints").exists() else []
      if record_file.exists() and steps and steps[-1] == 8:
        counted = max((s.get("last_step") or 0) for s in json.loads(record_file.read_text())[
            "sessions"])
        if counted >= 12:
          break
      time_lib.sleep(0.05)
    else:
      pytest.fail("the run never got past step 12")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  res = subprocess.run(cmd[:-5] + ["--config.num_train_steps=16", "--config.log_every_steps=1",
                                   "--config.checkpoint_every_steps=8",
                                   "--config.eval_every_steps=16",
                                   "--config.image_every_steps=16"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  record = json.loads(record_file.read_text())
  seconds = goodput.totals(record)
  recomputed_steps = sum(s["recomputed_steps"] for s in record["sessions"])
  assert len(record["sessions"]) == 2 and recomputed_steps >= 4, record["sessions"]
  assert seconds["recomputed"] > 0 and seconds["productive"] > 0, seconds
  assert "goodput" in res.stderr.splitlines()[-1] or any("goodput" in l for l in
                                                         res.stderr.splitlines()[-5:])
