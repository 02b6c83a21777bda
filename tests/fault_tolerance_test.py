"""Preemption and faults on real multi-process runs (2 processes x 2 CPU devices on localhost):
SIGTERM in every phase, a SIGKILLed process (a dead peer) at a random moment, a damaged checkpoint,
non-finite steps."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest

from conftest import REPO
from conftest import tiny_config
from vae_scale.run import checkpoints
from vae_scale.data import pipeline
from vae_scale.tools import local_launch
from vae_scale.run import loop
from vae_scale.errors import NonFiniteError

NUM_STEPS = 24
RUN_FLAGS = [f"--config={REPO / 'tests' / 'tiny_config.py'}",
             f"--config.num_train_steps={NUM_STEPS}", "--config.checkpoint_every_steps=4",
             "--config.log_every_steps=4", f"--config.eval_every_steps={NUM_STEPS}",
             f"--config.image_every_steps={NUM_STEPS}"]


def _start(workdir, log_name):
  """Starts the two processes of one run; returns their Popen objects."""
  port = local_launch.free_port()
  env = local_launch.process_env(2)
  procs = []
  for i in range(2):
    log = open(os.path.join(workdir, f"{log_name}_p{i}.log"), "w")  # pylint: disable=consider-using-with
    cmd = local_launch.command(i, 2, port, RUN_FLAGS + [f"--workdir={workdir}"], 10)
    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
  return procs


def _wait(procs, timeout=240):
  deadline = time.time() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"processes still running after {timeout}s")
  return codes


def _wait_for_checkpoint(workdir, step, procs, timeout=180):
  path = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      pytest.fail(f"no checkpoint {step} in {workdir}: codes {[p.poll() for p in procs]}")
    time.sleep(0.2)


def _params(workdir, step=None):
  state, got = checkpoints.read_state(workdir, step)
  return state["params"], state["opt_state"], got


def _digest(root):
  h = hashlib.sha256()
  for d, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      h.update(f.encode())
      h.update(open(os.path.join(d, f), "rb").read())
  return h.hexdigest()


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  assert _wait(_start(workdir, "run")) == [0, 0]
  params, opt, step = _params(workdir)
  assert step == NUM_STEPS
  return params, opt


@pytest.mark.slow
def test_launcher_stops_the_others_when_one_process_fails():
  sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
  failer = [sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit(7)"]
  procs = [subprocess.Popen(sleeper), subprocess.Popen(failer)]
  start = time.time()
  assert local_launch.supervise(procs, grace_seconds=2) == 7
  assert time.time() - start < 10
  assert all(p.poll() is not None for p in procs)


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  config = tiny_config(num_train_steps=4, checkpoint_every_steps=2)
  workdir = str(tmp_path)
  loop.train_and_evaluate(config, workdir)
  good, _ = checkpoints.read_state(workdir, 2)
  # Damage the committed checkpoint 4: remove its array data.
  state_dir = os.path.join(workdir, "checkpoints", "4", "state")
  for name in os.listdir(state_dir):
    if name.startswith("ocdbt") or name.startswith("d") or name == "manifest.ocdbt":
      path = os.path.join(state_dir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  config6 = tiny_config(num_train_steps=6, checkpoint_every_steps=2)
  with caplog.at_level("WARNING"):
    state = loop.train_and_evaluate(config6, workdir)
  assert any("step 4 is damaged" in r.getMessage() for r in caplog.records)
  assert int(state.step) == 6
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged"))[0].startswith("4-")
  # It resumed from step 2: the result equals an uninterrupted 6-step run.
  straight = loop.train_and_evaluate(config6, str(tmp_path / "straight"))
  _assert_same(jax.tree.map(np.asarray, straight.params), jax.tree.map(np.asarray, state.params))
  del good


class _NaNAfter(grain.DatasetIterator):
  """Wraps a train iterator: batches from the k-th on are all NaN."""

  def __init__(self, parent, k):
    super().__init__(parent)
    self.k, self.n = k, 0

  def __next__(self):
    batch = next(self._parent)
    self.n += 1
    if self.n > self.k:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


@pytest.mark.slow
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
  config = tiny_config(num_train_steps=12, checkpoint_every_steps=2, log_every_steps=1,
                       **{"optimizer.max_consecutive_nonfinite": 3, "guard.enabled": False})
  real = pipeline.create_train_dataset

  class _Dataset:
    def __init__(self, ds):
      self.ds = ds

    def __iter__(self):
      return _NaNAfter(iter(self.ds), 4)

  monkeypatch.setattr(pipeline, "create_train_dataset",
                      lambda *a, **k: _Dataset(real(*a, **k)))
  with pytest.raises(NonFiniteError, match="3 consecutive steps up to step 7"):
    loop.train_and_evaluate(config, str(tmp_path))
  # Checkpoint 6 was saved during the skipped steps: its parameters are those of step 4, intact.
  at4, _ = checkpoints.read_state(str(tmp_path), 4)
  at6, _ = checkpoints.read_state(str(tmp_path), 6)
  _assert_same(at4["params"], at6["params"])
  for leaf in jax.tree.leaves(at6["params"]):
    assert np.isfinite(leaf).all()
  assert int(at6["opt_state"]["total_notfinite"]) == 2


def _launch(workdir, fault=None, timeout=300):
  """One run of 2 processes x 2 devices under launch/local.sh; returns the launcher's exit code."""
  env = dict(os.environ, VAE_PYTHON=sys.executable)
  env.pop("VAE_SCALE_SIGTERM_AT", None)
  if fault:
    env["VAE_SCALE_SIGTERM_AT"] = fault
  cmd = ["bash", str(REPO / "launch" / "local.sh"), "2", "--devices_per_process=2",
         "--heartbeat_timeout_seconds=10", f"--log_dir={workdir}/logs_{fault or 'clean'}",
         *RUN_FLAGS, "--config.eval_every_steps=8", f"--workdir={workdir}"]
  return subprocess.run(cmd, env=env, cwd=REPO, timeout=timeout, capture_output=True,
                        text=True).returncode


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_and_sigkill_in_every_phase_then_resume_gives_identical_parameters(
    tmp_path, uninterrupted):
  """One story of 2 processes x 2 devices, each stop checked as it happens, the end compared with
  an uninterrupted run: stops before the first step, a notice heard by one process only (both
  agree on a step and save it), a stop while restoring (the checkpoint read left as it was), one
  process SIGKILLed at a random moment (mid-step, mid-save or mid-eval; the survivor exits non-zero
  in bounded time), a stop during an evaluation and during a save. Run under launch/local.sh
  where the processes hear the notice together (as on a pod, where every VM gets it)."""
  workdir = str(tmp_path)
  ckpts = lambda: sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                         if s.isdigit()) if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
  for fault in ("startup", "compile:1"):  # Nothing to save yet: exit 42 at once.
    assert _launch(workdir, fault) == 42, fault
    assert ckpts() == [], fault
  procs = _start(workdir, "one_hears")
  _wait_for_checkpoint(workdir, 4, procs)
  procs[1].send_signal(signal.SIGTERM)  # Only one process hears the preemption notice.
  assert _wait(procs) == [42, 42]
  saved = ckpts()[-1]
  assert 4 <= saved < NUM_STEPS, ckpts()  # Stopped early, at the step both agreed on.
  record = json.loads(open(os.path.join(workdir, "checkpoints", str(saved), "data",
                                        "metadata")).read())
  assert record["global_examples"] == saved * 8  # One global data position, at the agreed step.
  before = _digest(os.path.join(workdir, "checkpoints"))
  assert _launch(workdir, "restore") == 42 and ckpts()[-1] == saved
  assert _digest(os.path.join(workdir, "checkpoints")) == before  # The one being read untouched.
  # A VM dies (SIGKILL) anywhere: mid-step, mid-save or mid-eval. Its peer, blocked in a
  # collective, exits non-zero in bounded time (the coordinator's heartbeat timeout, 10 s here).
  procs = _start(workdir, "killed")
  _wait_for_checkpoint(workdir, (saved // 4 + 1) * 4, procs)
  time.sleep(random.Random(1234).uniform(0.0, 3.0))
  procs[1].kill()
  died = time.time()
  assert _wait([procs[0]], timeout=120)[0] != 0
  assert time.time() - died < 90
  procs[1].wait()
  assert _launch(workdir, "eval:1") == 42 and ckpts()[-1] >= 8, ckpts()
  at = ckpts()[-1]
  assert _launch(workdir, "checkpoint:1") == 42 and ckpts()[-1] > at, ckpts()
  assert _launch(workdir) == 0
  params, opt, step = _params(workdir)
  assert step == NUM_STEPS
  _assert_same(uninterrupted[0], params)
  _assert_same(uninterrupted[1], opt)
  # No half-written checkpoint survives the restarts.
  assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
