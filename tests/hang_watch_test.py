"""vae_scale/run/hang_watch.py against the real cloud-tpu-diagnostics (the `gcp` extra, installed
with `test`), in child processes: the watch takes over signal handlers and faulthandler."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO


# -- hang diagnostics, in a child process (they take over signal handlers and faulthandler) -------

# The main thread blocks inside C (a pthread mutex another thread holds for a few seconds), the
# way it waits inside XLA for a collective that never completes.
_HANG = textwrap.dedent("""
    import ctypes, sys, threading, time
    from cloud_tpu_diagnostics.src.util import default
    from vae_scale.run import hang_watch
    default.STACK_TRACE_DIR_DEFAULT = sys.argv[2]  # The library's /tmp/debugging/, for the test.
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # All zero: PTHREAD_MUTEX_INITIALIZER (glibc).
    locked = threading.Event()
    def hold():
      libc.pthread_mutex_lock(mutex); locked.set(); time.sleep(4.5); libc.pthread_mutex_unlock(mutex)
    with hang_watch.hang_diagnostics(True, 1.0, to_cloud=sys.argv[1] == "cloud") as watch:
      threading.Thread(target=hold).start()
      locked.wait()
      print("main: blocked", file=sys.stderr, flush=True)
      libc.pthread_mutex_lock(mutex)  # HANG_LINE
      print("main: back in Python", file=sys.stderr, flush=True)
      watch.beat()
    print("main: left hang_diagnostics", file=sys.stderr, flush=True)
    """)


def _hang(tmp_path, where):
  script = tmp_path / "hang.py"
  script.write_text(_HANG)
  result = subprocess.run([sys.executable, str(script), where, str(tmp_path / "debugging")],
                          capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert result.returncode == 0, result.stderr
  line = _HANG.splitlines().index("  libc.pthread_mutex_lock(mutex)  # HANG_LINE") + 1
  return result.stderr, f'File "{script}", line {line} in <module>'


@pytest.mark.slow
def test_watchdog_dumps_every_thread_while_the_main_thread_waits_in_c(tmp_path):
  err, hang_frame = _hang(tmp_path, "stderr")
  blocked, snapshot = err.index("main: blocked"), err.index("Not a crash. cloud-tpu-diagnostics")
  # faulthandler's watchdog: every thread, every second of the wait, showing where main waits.
  dumps = [i for i in range(len(err)) if err.startswith("Timeout (0:00:01)!", i)]
  assert len(dumps) >= 2 and blocked < dumps[0], err
  assert hang_frame in err[dumps[0]:dumps[1]] and "in hold" in err[dumps[0]:dumps[1]]
  # cloud-tpu-diagnostics' snapshot, due every second too, is a Python signal handler: it could
  # not run while the main thread waited in C (why the watchdog is there), only once it was back.
  assert snapshot > dumps[1] and snapshot < err.index("main: back in Python")
  # Leaving the block does not wait out the library's interval, and disarms the watchdog.
  assert err.rstrip().endswith("main: left hang_diagnostics")


@pytest.mark.slow
def test_stack_traces_to_cloud_go_to_the_sidecars_directory(tmp_path):
  err, hang_frame = _hang(tmp_path, "cloud")
  assert "Timeout (" not in err  # Nothing on stderr: all of it in the file XPK's sidecar tails.
  (trace,) = (tmp_path / "debugging").glob("stack_trace_*.txt")
  text = trace.read_text()
  assert text.count("Timeout (0:00:01)!") >= 2 and hang_frame in text
  assert "Not a crash. cloud-tpu-diagnostics" in text
