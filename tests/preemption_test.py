"""`preemption.Watch`: SIGTERM means "preempted, rerun" (exit 42), at once while nothing is saved,
else left to the loop, which saves and stops. That a SIGTERM in every phase of a real run exits 42
and the reruns end exactly where an uninterrupted run does is fault_tolerance_test's story (2
processes; the phase is chosen with VAE_SCALE_SIGTERM_AT=PHASE[:N])."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from vae_scale.run import preemption


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
