"""The run session: one phase vocabulary for preemption and goodput, hooks, save or stop (no
compile: a small pytree stands in for the train state)."""

import json
import os
import signal
import subprocess
import sys
import time

import flax
import jax.numpy as jnp
import pytest

from conftest import cpu_env
from conftest import REPO
from conftest import tiny_config
from vae_scale.data import sampler
from vae_scale.errors import NonFiniteError
from vae_scale.errors import Preempted
from vae_scale.run import checkpoints
from vae_scale.run import goodput
from vae_scale.run import preemption
from vae_scale.run import session as session_lib


@flax.struct.dataclass
class _OptState:
  notfinite_count: jnp.ndarray


@flax.struct.dataclass
class _State:
  params: dict
  opt_state: _OptState


def _state(bad_steps: int = 0) -> _State:
  return _State({"w": jnp.arange(4.0)}, _OptState(jnp.asarray(bad_steps, jnp.int32)))


def _session(tmp_path, watch=None, **overrides):
  config = tiny_config(**{"num_train_steps": 6, "checkpoint_every_steps": 4, **overrides})
  return session_lib.Session(str(tmp_path), config, watch).begin(), config


def _position(config):
  return sampler.DataPosition(0, 0, config.global_batch_size, "Test()", config.seed)


def test_phases_are_one_vocabulary_for_goodput_and_preemption(tmp_path):
  session, _ = _session(tmp_path)
  with pytest.raises(ValueError, match="unknown phase 'save'"):
    with session.phase("save"):
      pass
  assert set(session_lib.PHASES) == set(goodput.CAUSES) | {"step"}
  with session.phase("data"):
    pass
  with session.phase("step"):  # Productive: no goodput cause.
    pass
  session.close()


def test_after_step_runs_the_hooks_then_saves_on_the_interval_and_at_the_end(tmp_path):
  session, config = _session(tmp_path)
  seen = []
  session.hooks = [lambda step: seen.append(("a", step)), lambda step: seen.append(("b", step))]
  for step in range(1, 7):
    session.after_step(step, _state(), _position(config))
  summary = session.close()
  assert seen == [(k, s) for s in range(1, 7) for k in ("a", "b")]
  assert checkpoints.list_steps(tmp_path) == [4, 6]
  record = json.loads((tmp_path / goodput.FILENAME).read_text())
  (current,) = record["sessions"]
  # Goodput heard of both checkpoints once they had committed (a later session may restore them).
  assert [m[0] for m in current["marks"]] == [4, 6] and current["end"] == "clean"
  assert summary.startswith("goodput ")


def test_a_sigterm_saves_the_reached_step_and_raises_preempted(tmp_path):
  watch = preemption.Watch()
  session, config = _session(tmp_path, watch)
  session.after_step(1, _state(), _position(config))
  watch._event.set()  # What the SIGTERM handler does (the loop then saves and stops).  pylint: disable=protected-access
  with pytest.raises(Preempted) as err:
    session.after_step(2, _state(), _position(config))
  assert err.value.step == 2 and checkpoints.list_steps(tmp_path) == [2]
  assert not session.manager.is_saving_in_progress()  # Committed before raising.
  session.manager.close()


def test_too_many_nonfinite_steps_with_the_guard_off_stop_naming_the_latest_checkpoint(tmp_path):
  session, config = _session(tmp_path, **{"optimizer.max_consecutive_nonfinite": 3,
                                          "guard.enabled": False})
  for step in range(1, 5):
    session.after_step(step, _state(), _position(config))
  session.observe(5, {"train/rec_loss": 0.5}, _state(bad_steps=2))  # Not yet.
  with pytest.raises(NonFiniteError, match=r"3 consecutive steps up to step 6 .* checkpoint 4 "):
    session.observe(6, {"train/rec_loss": float("nan")}, _state(bad_steps=3))
  session.manager.close()


def test_the_checkpoint_fault_fires_at_the_first_save_not_at_every_step(tmp_path, monkeypatch):
  monkeypatch.setenv(preemption.FAULT_ENV, "checkpoint:1")
  sent = []
  monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig))
  session, config = _session(tmp_path, preemption.Watch())
  for step in range(1, 4):
    session.after_step(step, _state(), _position(config))
  assert not sent
  session.after_step(4, _state(), _position(config))  # The first save.
  assert sent == [signal.SIGTERM]
  session.close()


# --------------------------------------------------------------------------- one run per workdir


def _main_argv(workdir, steps):
  return [sys.executable, "-m", "vae_scale.main", f"--config={REPO / 'tests' / 'tiny_config.py'}",
          f"--config.num_train_steps={steps}", "--config.checkpoint_every_steps=2",
          "--config.log_every_steps=2", "--config.eval_every_steps=1000",
          "--config.image_every_steps=1000", f"--workdir={workdir}"]


def _env():
  return cpu_env()


def _files(root):
  """{relative path: bytes} of every file under `root`."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      with open(os.path.join(d, n), "rb") as f:
        out[os.path.relpath(os.path.join(d, n), root)] = f.read()
  return out


@pytest.mark.slow
def test_a_live_runs_workdir_refuses_a_second_run_and_a_killed_ones_is_taken_over(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(_main_argv(workdir, 100_000), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 600
    while not checkpoints.list_steps(workdir) and time.time() < deadline:
      time.sleep(0.5)
    assert checkpoints.list_steps(workdir), "the first run saved no checkpoint"
    os.kill(holder.pid, signal.SIGSTOP)  # Alive but still: the workdir must not change below.
    time.sleep(1.0)  # Let a save under way reach the disk.
    before = _files(workdir)
    second = subprocess.run(_main_argv(workdir, 6), env=_env(), cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 2, second.stderr[-2000:]
    (line,) = [l for l in second.stderr.splitlines() if l.startswith("error:")]
    assert f"kill -TERM {holder.pid}" in line and "another --workdir" in line, line
    assert _files(workdir) == before  # Nothing written: no events, goodput, checkpoints, lease.
  finally:
    holder.kill()  # SIGKILL: the lease stays behind, its holder dead.
    holder.wait()
  saved = checkpoints.list_steps(workdir)[-1]
  rerun = subprocess.run(_main_argv(workdir, saved + 2), env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Took over the lease" in rerun.stderr and f"Resuming at step {saved}" in rerun.stderr
  assert checkpoints.list_steps(workdir)[-1] == saved + 2
