r"""Rehearses a multi-host run on one machine: N processes of vae_scale.main on localhost.

  python -m vae_scale.local_launch --num_processes=2 --devices_per_process=4 -- \
      --config=configs/demo.py --workdir=/tmp/rehearsal

Each process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i` and
`devices_per_process` simulated CPU devices, so jax.distributed, the mesh over all processes'
devices, per-process data shares, checkpoints and preemption behave as on a pod.

Supervision:
  * SIGTERM, SIGINT (Ctrl-C) or SIGHUP to the launcher is a rehearsed preemption: every process
    gets SIGTERM (they agree on a step, save and exit 42). Each process runs in its own session,
    so a terminal's Ctrl-C reaches only the launcher, which turns it into that SIGTERM.
  * If one process exits non-zero or dies, the others get SIGTERM, so a dead peer never leaves
    the rest hanging.
  * Processes still running `--grace_seconds` after their SIGTERM are killed (SIGKILL, with
    their own children such as Grain workers).
  * If the launcher dies without that chance (SIGKILL, the out-of-memory killer), its processes
    die with it within a moment, with their own children: SIGKILL from the kernel (Linux's
    parent-death signal) and from a watchdog process (vae_scale/tools/parent_death.py, also on
    macOS). They lose the steps since their latest checkpoint; a rerun resumes from it.

Exit codes (shell convention: a process that died of signal N counts as 128 + N):
  0    every process finished.
  42   stopped by SIGTERM/SIGINT/SIGHUP to the launcher, and every process stopped with 42 (it
       saved a checkpoint) or died of that SIGTERM before it could handle it (its latest
       complete checkpoint stands): rerun the same command to resume.
  N    otherwise the code of the FIRST process that failed, e.g. 2 (bad config, data or
       weights, or a workdir another live run holds: don't rerun), 3 (too many non-finite
       steps: don't rerun), 42 (a process was preempted on its own: rerun), 143 (a process
       died of SIGTERM), 137 (a process was killed: SIGKILL, the out-of-memory killer, or it
       outlived --grace_seconds), 1 (a crash).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

from vae_scale.tools import parent_death

from vae_scale import errors  # Stdlib only, like this module: the launcher imports no JAX.
from vae_scale.errors import PREEMPTED_EXIT_CODE

# The launcher forwards SIGTERM for each of these.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_POLL_SECONDS = 0.05


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int) -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [
      f"--xla_force_host_platform_device_count={devices_per_process}"])
  return env


def command(process_id: int, num_processes: int, port: int, main_args: list[str],
            heartbeat_timeout_seconds: int, module: str = "vae_scale.main") -> list[str]:
  """The argv of process `process_id`: `python -m MODULE ARGS` plus the jax.distributed flags."""
  return [sys.executable, "-m", module, *main_args,
          f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
          f"--process_id={process_id}",
          f"--heartbeat_timeout_seconds={heartbeat_timeout_seconds}"]


def shell_code(returncode: int) -> int:
  """Popen's returncode as a shell reports it: -N (died of signal N) becomes 128 + N."""
  return 128 - returncode if returncode < 0 else returncode


def describe(code: int) -> str:
  """One word or phrase for an exit code (shell convention)."""
  if code in errors.EXIT_MEANINGS:
    return errors.EXIT_MEANINGS[code]
  if code > 128:
    try:
      return f"died of {signal.Signals(code - 128).name}"
    except ValueError:
      pass
  return "failed"


def exit_code(returncodes: Sequence[int], stopped: bool) -> int:
  """The launcher's exit code from its processes' Popen returncodes, in the order they exited.

  Args:
    returncodes: Popen.returncode of every process, first to exit first (-N: died of signal N).
    stopped: whether the launcher was told to stop (and sent every process SIGTERM).
  Returns:
    0 if all finished; 42 if `stopped` and every process stopped cleanly (42, 0, or died of the
    SIGTERM); otherwise the first failure's code, 128 + N for signal N.
  """
  clean = {0, PREEMPTED_EXIT_CODE, -signal.SIGTERM} if stopped else {0}
  failures = [c for c in returncodes if c not in clean]
  if failures:
    return shell_code(failures[0])
  if stopped and (not returncodes or any(c != 0 for c in returncodes)):
    return PREEMPTED_EXIT_CODE  # Stopped before or while running: rerun to resume.
  return 0


def _terminate(procs: Sequence[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        p.send_signal(signal.SIGTERM)
      except ProcessLookupError:
        pass


def _kill(p: subprocess.Popen) -> None:
  """SIGKILL for the process and, when it leads its own process group, everything in it."""
  try:
    if os.getpgid(p.pid) == p.pid:
      os.killpg(p.pid, signal.SIGKILL)
    else:
      p.kill()
  except (ProcessLookupError, PermissionError):
    pass


def supervise(procs: Sequence[subprocess.Popen], grace_seconds: float,
              stop: threading.Event | None = None,
              on_exit: Callable[[subprocess.Popen], None] | None = None) -> int:
  """Waits for all processes, stopping the rest when one fails or when `stop` is set.

  Args:
    procs: the started processes.
    grace_seconds: how long processes have after their SIGTERM before they are killed.
    stop: set (e.g. by a signal handler) to send every process SIGTERM: a preemption.
    on_exit: called once for each process, when it has exited and been reaped.
  Returns:
    The launcher's exit code (see `exit_code`).
  """
  exited: dict[int, int] = {}  # Index -> returncode, in the order they were seen to exit.
  stopped, deadline = False, None
  while True:
    for i, p in enumerate(procs):
      if i not in exited and p.poll() is not None:
        exited[i] = p.returncode
        if on_exit is not None:
          on_exit(p)
    if stop is not None and stop.is_set() and not stopped:
      stopped = True
      _terminate(procs)
      deadline = deadline or time.monotonic() + grace_seconds
    if deadline is None and any(c != 0 for c in exited.values()):
      _terminate(procs)  # One failed: stop the rest rather than let them wait for it.
      deadline = time.monotonic() + grace_seconds
    if len(exited) == len(procs):
      return exit_code(list(exited.values()), stopped)
    if deadline is not None and time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          _kill(p)
    time.sleep(_POLL_SECONDS)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m vae_scale.local_launch", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--port", type=int, default=0, help="Coordinator port (0: a free one).")
  parser.add_argument("--grace_seconds", type=float, default=30.0,
                      help="How long processes have to exit after their SIGTERM (a failed "
                      "peer or a stop) before they are killed.")
  parser.add_argument("--heartbeat_timeout_seconds", type=int, default=30)
  parser.add_argument("--log_dir", default=None,
                      help="Write each process's output to LOG_DIR/process_<i>.log.")
  parser.add_argument("--module", default="vae_scale.main",
                      help="The program each process runs as `python -m MODULE` (tests pass a "
                      "stub).")
  parser.add_argument("main_args", nargs=argparse.REMAINDER,
                      help="Arguments for vae_scale.main, after --.")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  main_args = [a for a in args.main_args if a != "--"]
  port = args.port or free_port()
  env = process_env(args.devices_per_process)
  # Before any process, and all from this (main) thread: the parent-death signal is tied to the
  # thread that forks, and the watchdog must know every process from its first moment.
  watchdog = parent_death.Watchdog()
  preexec = parent_death.death_signal_preexec()
  stop = threading.Event()
  # Handlers first: a signal while processes start must stop the ones already running.
  previous = {s: signal.signal(s, lambda *_: stop.set()) for s in STOP_SIGNALS}
  procs: list[subprocess.Popen] = []
  try:
    for i in range(args.num_processes):
      if stop.is_set():
        break
      out = None
      if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        out = open(os.path.join(args.log_dir, f"process_{i}.log"), "w")  # pylint: disable=consider-using-with
      try:
        procs.append(subprocess.Popen(
            command(i, args.num_processes, port, main_args, args.heartbeat_timeout_seconds,
                    module=args.module),
            env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True, preexec_fn=preexec))
        watchdog.watch(procs[-1].pid)
      finally:
        if out is not None:
          out.close()  # The process has its own descriptor.
    code = supervise(procs, args.grace_seconds, stop, on_exit=lambda p: watchdog.reaped(p.pid))
  except BaseException:
    _terminate(procs)
    for p in procs:
      try:
        p.wait(timeout=args.grace_seconds)
      except subprocess.TimeoutExpired:
        _kill(p)
        p.wait()
      watchdog.reaped(p.pid)
    raise
  finally:
    watchdog.close()
    for s, handler in previous.items():
      signal.signal(s, handler)
  codes = ", ".join(f"{shell_code(p.returncode)}" for p in procs)
  print(f"local_launch: {len(procs)} processes exited ({codes}); exit code {code}: "
        f"{describe(code)}", file=sys.stderr)
  return code


def entry() -> None:
  """`python -m vae_scale.local_launch`: runs `main` and exits with its code."""
  sys.exit(main())
