"""vae_scale.local_launch and launch/local.sh: exit codes and signal handling, against stub processes
that exit 0/2/3/42, die of a signal, hang or ignore SIGTERM. No jax, nothing compiles."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from launch_helpers import alive
from vae_scale.tools import local_launch

# Every test here starts processes (launcher scripts, stub programs): marked slow as a module.
pytestmark = pytest.mark.slow

# Stands in for vae_scale.main. FAKE_PLAN holds one behaviour per process id, comma-separated:
#   exit:N       exit N 0.2 s after the waiting peers below are ready
#   term_exit:N  wait; on SIGTERM exit N (term_exit:42 is vae_scale.main after its checkpoint)
#   hang         wait with SIGTERM's default action: die of it (a process still starting up)
#   slow:N       like term_exit:N, but only after 1 s of "start-up" without a handler
#   stubborn     wait, ignoring SIGTERM (only SIGKILL ends it)
#   die:SIG      kill itself with signal SIG (TERM, KILL), timed like exit:N
#   family       like term_exit:42, with a child process in its group (as Grain's workers are)
#                whose pid it writes to child-I
# Every process writes argv-I (its argv, pid and environment), ready-I once its behaviour is in
# place, and signal-I with the names of the signals it handled.
FAKE_MAIN = r'''
import json, os, signal, subprocess, sys, time


args = sys.argv[1:]
pid = int(next(a for a in args if a.startswith("--process_id=")).split("=")[1])
out = os.environ["FAKE_DIR"]
kind, _, value = os.environ["FAKE_PLAN"].split(",")[pid].partition(":")
delay = 0.2

def write(name, text, mode="w"):
  with open(os.path.join(out, f"{name}-{pid}"), mode) as f:
    f.write(text)

write("argv", json.dumps({"argv": args, "pid": os.getpid(),
                          "xla_flags": os.environ.get("XLA_FLAGS"),
                          "platforms": os.environ.get("JAX_PLATFORMS"),
                          "session": os.getsid(0) == os.getpid()}))

def record(signum, _):
  write("signal", signal.Signals(signum).name + "\n", "a")

def exit_on_term(code):
  def handler(signum, frame):
    record(signum, frame)
    sys.exit(code)
  return handler

def wait_for_peers():
  # Ends only once the waiting peers have their handlers in place, so that what they do with
  # the launcher's SIGTERM does not depend on how fast a loaded machine starts them.
  plan = os.environ["FAKE_PLAN"].split(",")
  waiting = [i for i, k in enumerate(plan)
             if k.split(":")[0] in ("term_exit", "stubborn", "hang", "family")]
  deadline = time.monotonic() + 20
  while (not all(os.path.exists(os.path.join(out, f"ready-{i}")) for i in waiting)
         and time.monotonic() < deadline):
    time.sleep(0.02)
  time.sleep(delay)

signal.signal(signal.SIGINT, record)  # Records a Ctrl-C that reached it (it must not).
if kind == "exit":
  wait_for_peers()
  sys.exit(int(value))
if kind == "die":
  wait_for_peers()
  os.kill(os.getpid(), getattr(signal, "SIG" + value))
if kind == "slow":
  time.sleep(1.0)
if kind == "family":
  child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
  write("child", str(child.pid))
if kind in ("term_exit", "slow", "family"):
  signal.signal(signal.SIGTERM, exit_on_term(int(value or 42)))
elif kind == "stubborn":
  signal.signal(signal.SIGTERM, record)
write("ready", "")
while True:
  time.sleep(0.05)
'''


@pytest.fixture
def fake(tmp_path):
  """Writes the stub module; returns its directory (also where the stubs record things)."""
  (tmp_path / "fake_main.py").write_text(FAKE_MAIN)
  return tmp_path


def _env(fake_dir, plan, **extra):
  env = dict(os.environ, FAKE_DIR=str(fake_dir), FAKE_PLAN=plan,
             PYTHONPATH=os.pathsep.join([str(fake_dir), str(REPO)]), **extra)
  env.pop("XLA_FLAGS", None)
  return env


def _launch(fake_dir, plan, *launcher_args, script=False, **extra):
  """Starts the launcher (or launch/local.sh) over len(plan) stub processes, in its own session
  like a command typed in a terminal."""
  n = len(plan.split(","))
  if script:
    argv = ["bash", str(REPO / "launch" / "local.sh"), str(n), "--module=fake_main",
            "--grace_seconds=2", *launcher_args, "--config=c.py", "--workdir=/tmp/w"]
  else:
    argv = [sys.executable, "-m", "vae_scale.local_launch", f"--num_processes={n}",
            "--devices_per_process=2", "--module=fake_main", "--grace_seconds=2",
            *launcher_args, "--", "--config=c.py", "--workdir=/tmp/w"]
  return subprocess.Popen(argv, env=_env(fake_dir, plan, VAE_PYTHON=sys.executable, **extra),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, cwd=REPO)


def _finish(proc, timeout=30):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    raise
  return proc.returncode, err


def _wait_ready(fake_dir, n, timeout=20):
  deadline = time.monotonic() + timeout
  while not all((fake_dir / f"ready-{i}").exists() for i in range(n)):
    assert time.monotonic() < deadline, "the stub processes did not start"
    time.sleep(0.05)


def _signals(fake_dir, i):
  path = fake_dir / f"signal-{i}"
  return path.read_text().split() if path.exists() else []


# -- exit codes when the processes end by themselves ------------------------------------------

@pytest.mark.parametrize("plan, expected", [
    ("exit:0,exit:0", 0),  # Finished.
    ("exit:2,term_exit:42", 2),  # Bad config: the peer is stopped, 2 is reported (don't rerun).
    ("term_exit:42,exit:3", 3),  # Too many non-finite steps (don't rerun).
    ("exit:42,term_exit:42", 42),  # Preempted on its own: rerun.
    ("die:TERM,term_exit:42", 143),  # Died of SIGTERM before it could handle it: 128 + 15.
    ("term_exit:42,die:KILL", 137),  # Killed outright: 128 + 9.
    ("exit:1,hang", 1),  # A crash; the hanging peer dies of the SIGTERM that follows.
])
def test_exit_code_is_the_first_failure(fake, plan, expected):
  code, err = _finish(_launch(fake, plan))
  assert code == expected, err
  assert f"exit code {expected}" in err
  # The survivor (if any) was sent SIGTERM: it recorded it and exited 42.
  for i, kind in enumerate(plan.split(",")):
    if kind.startswith("term_exit"):
      assert _signals(fake, i) == ["SIGTERM"], (i, err)


def test_a_peer_that_ignores_sigterm_is_killed_after_the_grace_period(fake):
  start = time.monotonic()
  code, err = _finish(_launch(fake, "exit:3,stubborn"))
  elapsed = time.monotonic() - start
  assert code == 3, err  # The first failure, not the SIGKILL that followed it.
  assert _signals(fake, 1) == ["SIGTERM"]
  assert 2 <= elapsed < 15  # --grace_seconds=2, then SIGKILL.
  assert "(3, 137)" in err


def test_processes_get_their_command_line_and_devices(fake):
  code, err = _finish(_launch(fake, "exit:0,exit:0", "--port=23456"))
  assert code == 0, err
  for i in range(2):
    record = json.loads((fake / f"argv-{i}").read_text())
    assert record["argv"] == ["--config=c.py", "--workdir=/tmp/w",
                              "--coordinator_address=127.0.0.1:23456", "--num_processes=2",
                              f"--process_id={i}", "--heartbeat_timeout_seconds=30"]
    assert record["xla_flags"] == "--xla_force_host_platform_device_count=2"
    assert record["platforms"] == "cpu"
    assert record["session"]  # Its own session: a terminal's Ctrl-C reaches only the launcher.


# -- the launcher itself is stopped -------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_launcher_forwards_sigterm_and_exits_42(fake, signum):
  proc = _launch(fake, "term_exit:42,term_exit:42,hang")
  _wait_ready(fake, 3)
  os.killpg(proc.pid, signum)  # Like Ctrl-C in a terminal: the launcher's whole group.
  code, err = _finish(proc)
  assert code == 42, err
  # Every process got SIGTERM, never the SIGINT: they saved (42) or died of it (143).
  assert _signals(fake, 0) == _signals(fake, 1) == ["SIGTERM"]
  assert "(42, 42, 143)" in err and "exit code 42" in err


def test_stopping_the_launcher_during_start_up_exits_42(fake):
  # The processes have no SIGTERM handler yet (still importing, say): they die of the signal,
  # their latest checkpoint stands, and a rerun resumes.
  proc = _launch(fake, "slow:42,slow:42")
  deadline = time.monotonic() + 20
  while not all((fake / f"argv-{i}").exists() for i in range(2)):
    assert time.monotonic() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  code, err = _finish(proc)
  assert code == 42, err
  assert "(143, 143)" in err


def test_stopping_the_launcher_reports_a_process_that_fails_while_stopping(fake):
  proc = _launch(fake, "term_exit:42,term_exit:3")
  _wait_ready(fake, 2)
  proc.send_signal(signal.SIGTERM)
  code, err = _finish(proc)
  assert code == 3, err


def test_stopping_the_launcher_kills_what_outlives_the_grace_period(fake):
  proc = _launch(fake, "term_exit:42,stubborn")
  _wait_ready(fake, 2)
  proc.send_signal(signal.SIGTERM)
  code, err = _finish(proc)
  assert code == 137, err  # Killed, so not "stopped after a checkpoint".
  assert _signals(fake, 1) == ["SIGTERM"]


@pytest.mark.parametrize("target", ["launcher", "group"])
def test_a_killed_launcher_takes_its_processes_and_their_children_with_it(fake, target):
  # SIGKILL to the launcher alone (the OOM killer) or to its process group (`kill -9 -PGID`, a
  # batch system): the processes run in their own sessions, so neither reaches them directly.
  proc = _launch(fake, "family,family")
  _wait_ready(fake, 2)
  pids = [json.loads((fake / f"argv-{i}").read_text())["pid"] for i in range(2)]
  pids += [int((fake / f"child-{i}").read_text()) for i in range(2)]
  try:
    assert all(alive(p) for p in pids)
    if target == "group":
      os.killpg(proc.pid, signal.SIGKILL)
    else:
      proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
      time.sleep(0.05)
    survivors = [p for p in pids if alive(p)]
    assert not survivors, f"still running 5 s after the launcher's SIGKILL: {survivors} of {pids}"
  finally:
    for p in pids:  # Leave nothing behind, whatever the outcome.
      try:
        os.kill(p, signal.SIGKILL)
      except ProcessLookupError:
        pass
    proc.communicate(timeout=30)
  # Killed outright, not asked to save: a SIGKILLed launcher's grace period is gone.
  assert _signals(fake, 0) == _signals(fake, 1) == []


# -- launch/local.sh wraps the launcher ---------------------------------------------------------

def test_local_sh_passes_the_exit_code_through(fake):
  code, err = _finish(_launch(fake, "term_exit:42,exit:2", script=True))
  assert code == 2, err
  record = json.loads((fake / "argv-0").read_text())
  assert record["argv"][:2] == ["--config=c.py", "--workdir=/tmp/w"]
  assert record["xla_flags"] == "--xla_force_host_platform_device_count=4"  # local.sh's default.


def test_local_sh_sigterm_is_a_rehearsed_preemption(fake):
  proc = _launch(fake, "term_exit:42,term_exit:42", "--devices_per_process=1", script=True)
  _wait_ready(fake, 2)
  proc.send_signal(signal.SIGTERM)  # The script's pid: exec made it the launcher.
  code, err = _finish(proc)
  assert code == 42, err
  assert _signals(fake, 0) == _signals(fake, 1) == ["SIGTERM"]
  assert json.loads((fake / "argv-1").read_text())["xla_flags"].endswith("count=1")


def test_help_documents_the_exit_codes():
  result = subprocess.run([sys.executable, "-m", "vae_scale.local_launch", "--help"],
                          capture_output=True, text=True, timeout=30, check=False, cwd=REPO)
  assert result.returncode == 0
  for text in ("Exit codes", "42", "128 + N", "FIRST", "--grace_seconds", "--module"):
    assert text in result.stdout, text
  result = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "--help"],
                          capture_output=True, text=True, timeout=30, check=False)
  assert result.returncode == 0 and "42" in result.stdout and "128+N" in result.stdout


# -- the exit-code rule itself --------------------------------------------------------------------

@pytest.mark.parametrize("codes, stopped, expected", [
    ([0, 0], False, 0),
    ([2, -15], False, 2),
    ([-15, 42], False, 143),  # Shell convention for a signal death.
    ([-9, 1], False, 137),
    ([42, 42], True, 42),
    ([-15, 42], True, 42),  # Died of the forwarded SIGTERM: still a clean stop.
    ([0, 42], True, 42),
    ([0, 0], True, 0),  # Finished before the stop reached them.
    ([], True, 42),  # Stopped before anything started.
    ([42, -9], True, 137),  # Outlived the grace period.
    ([3, 42], True, 3),
])
def test_exit_code_rule(codes, stopped, expected):
  assert local_launch.exit_code(codes, stopped) == expected
