"""vae_scale.tools.parent_death: each of its two mechanisms alone stops a SIGKILLed launcher's
processes, against small stand-in launchers. No jax."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from launch_helpers import alive
from vae_scale.tools import parent_death

# A stand-in launcher: starts one process in its own session (as local_launch does) which starts
# a child of its own (as Grain's workers are), prints both pids as JSON, and waits to be killed.
# argv[1] says which mechanism it uses: "watchdog", "pdeathsig" or "none".
LAUNCHER = r'''
import json, subprocess, sys, time
from vae_scale.tools import parent_death

how = sys.argv[1]
watchdog = parent_death.Watchdog() if how == "watchdog" else None
preexec = parent_death.death_signal_preexec() if how == "pdeathsig" else None
worker = subprocess.Popen(
    [sys.executable, "-c",
     "import subprocess, sys, time\n"
     "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
     "print(child.pid, flush=True)\n"
     "time.sleep(600)\n"],
    stdout=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=preexec)
if watchdog:
  watchdog.watch(worker.pid)
child = int(worker.stdout.readline())
print(json.dumps({"worker": worker.pid, "child": child}), flush=True)
time.sleep(600)
'''


def _kill_launcher(how: str, wait_s: float = 5.0) -> dict[str, bool]:
  """Starts the stand-in launcher, SIGKILLs it, and says which of its processes still run
  `wait_s` later (then kills them)."""
  launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, how], stdout=subprocess.PIPE,
                              text=True, cwd=REPO, start_new_session=True)
  pids = json.loads(launcher.stdout.readline())
  try:
    assert all(alive(p) for p in pids.values())
    launcher.kill()
    launcher.wait(timeout=30)
    deadline = time.monotonic() + wait_s
    while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
      time.sleep(0.05)
    return {name: alive(pid) for name, pid in pids.items()}
  finally:
    for pid in pids.values():
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    launcher.stdout.close()


@pytest.mark.slow
def test_the_watchdog_alone_kills_the_process_and_its_children():
  # What macOS gets: no parent-death signal.
  assert _kill_launcher("watchdog") == {"worker": False, "child": False}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's prctl")
def test_the_parent_death_signal_alone_kills_the_process_but_not_its_children():
  # Why the watchdog is needed on Linux too: the child (a Grain worker) has another parent.
  assert _kill_launcher("pdeathsig", wait_s=2.0) == {"worker": False, "child": True}


@pytest.mark.slow
def test_without_either_the_processes_outlive_their_launcher():
  # The failure the module exists for (issue 30): orphans that train on.
  assert _kill_launcher("none", wait_s=1.0) == {"worker": True, "child": True}


@pytest.mark.slow
def test_the_watchdog_spares_what_the_launcher_reaped():
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True)
  try:
    lines = f"watch {sleeper.pid}\nreaped {sleeper.pid}\nwatch 999999999\nnonsense\n".encode()
    # 999999999 is no pid: nothing to kill, and not reported as killed.
    assert parent_death.watchdog_main(io.BytesIO(lines)) == []
    assert sleeper.poll() is None
    assert parent_death.watchdog_main(io.BytesIO(f"watch {sleeper.pid}\n".encode())) == [
        sleeper.pid]
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
  finally:
    sleeper.kill()
    sleeper.wait()
