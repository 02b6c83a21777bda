"""SIGTERM at any moment means "preempted, rerun": exit 42, and the reruns end exactly where an
uninterrupted run does. The moment is chosen with the fault injection of `preemption.Watch`
(VAE_SCALE_SIGTERM_AT=PHASE[:N]: the process signals itself on its N-th entry into PHASE)."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from vae_scale.run import checkpoints
from vae_scale.run import preemption

NUM_STEPS = 16
FLAGS = [f"--config={REPO / 'tests' / 'tiny_config.py'}", f"--config.num_train_steps={NUM_STEPS}",
         "--config.checkpoint_every_steps=4", "--config.log_every_steps=2",
         "--config.eval_every_steps=4", "--config.image_every_steps=8"]


def _main(workdir, fault=None, timeout=300):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  env.pop(preemption.FAULT_ENV, None)
  if fault:
    env[preemption.FAULT_ENV] = fault
  return subprocess.run([sys.executable, "-m", "vae_scale.main", *FLAGS, f"--workdir={workdir}"],
                        capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _digest(root):
  h = hashlib.sha256()
  for d, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      h.update(f.encode())
      h.update(open(os.path.join(d, f), "rb").read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  res = _main(workdir)
  assert res.returncode == 0, res.stderr[-3000:]
  return checkpoints.read_state(workdir)[0]


@pytest.mark.slow
def test_sigterm_in_every_phase_exits_42_and_the_reruns_match_an_uninterrupted_run(
    tmp_path, uninterrupted):
  workdir = str(tmp_path / "run")
  # Before the first step completes there is nothing to save: exit 42 at once, nothing written.
  for fault in ("startup", "eval:1", "compile:1"):
    res = _main(workdir, fault)
    assert res.returncode == 42, (fault, res.stderr[-3000:])
    assert "preempted" in res.stderr and _steps(workdir) == [], fault
  # Mid-loop: the step finishes, the reached step is saved (beside the periodic one at 4).
  res = _main(workdir, "step:6")
  assert res.returncode == 42 and _steps(workdir) == [4, 7], (_steps(workdir), res.stderr[-2000:])
  assert "checkpoint saved at step 7" in res.stderr
  # While restoring: exit at once, the checkpoint being read untouched.
  before = _digest(os.path.join(workdir, "checkpoints"))
  res = _main(workdir, "restore")
  assert res.returncode == 42, res.stderr[-3000:]
  assert _digest(os.path.join(workdir, "checkpoints")) == before
  # During an evaluation (at step 8) and during a save (at 12): finish it, save, exit 42.
  res = _main(workdir, "eval:1")
  assert res.returncode == 42 and _steps(workdir)[-1] == 8, (_steps(workdir), res.stderr[-2000:])
  res = _main(workdir, "checkpoint:1")
  assert res.returncode == 42 and _steps(workdir)[-2:] == [12, 13], _steps(workdir)
  res = _main(workdir)
  assert res.returncode == 0, res.stderr[-3000:]
  final = checkpoints.read_state(workdir)[0]
  assert int(final["step"]) == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, uninterrupted["params"], final["params"])
  jax.tree.map(np.testing.assert_array_equal, uninterrupted["opt_state"], final["opt_state"])


@pytest.mark.slow
def test_sigterm_while_the_main_thread_is_inside_native_code_exits_at_once():
  """The watcher thread acts on the wakeup pipe even while Python code can't run (a compile)."""
  code = ("from vae_scale.run import preemption; w = preemption.Watch().install(); "
          "import time; print('ready', flush=True); time.sleep(60)")
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=REPO)
  assert proc.stdout.readline().strip() == "ready"
  start = time.time()
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=20) == 42
  assert time.time() - start < 5
  assert "nothing to save" in proc.stderr.read()


def test_after_steps_completed_sigterm_is_left_to_the_loop():
  watch = preemption.Watch().install() if threading.current_thread() is threading.main_thread() \
      else None
  if watch is None:
    pytest.fail("tests run on the main thread")
  previous = signal.getsignal(signal.SIGTERM)
  try:
    watch.steps_completed()
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not watch.requested() and time.time() < deadline:
      time.sleep(0.01)
    assert watch.requested()  # Set, and the process is still alive: the loop saves and stops.
  finally:
    signal.signal(signal.SIGTERM, previous)
    signal.set_wakeup_fd(-1)
