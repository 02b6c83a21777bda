"""vae_scale/run/cloud.py against the real cloud-tpu-diagnostics and ml-goodput-measurement (the
`gcp` extra, installed with `test`). Nothing reaches the cloud: the recorder's Cloud Logging writer
is replaced by a list, and the monitor process gets a stand-in package first on its path."""

import datetime
import json
import os
import subprocess
import sys
import textwrap

import pytest
from absl import flags
from ml_goodput_measurement import goodput as mgm_goodput  # The `test` extra installs it.

from conftest import REPO
from vae_scale import errors
from vae_scale.run import goodput
from vae_scale.run import cloud



# -- flags ---------------------------------------------------------------------------------------

def _holders(argv):
  values = flags.FlagValues()
  holders = cloud.define_flags(values)
  values(["main", *argv])
  return holders


def test_flags_default_to_nothing_and_parse():
  assert cloud.options_from_flags(_holders([])) == cloud.Options()
  options = cloud.options_from_flags(_holders([
      "--hang_diagnostics", "--hang_timeout_seconds=600", "--stack_trace_to_cloud",
      "--cloud_goodput", "--cloud_goodput_run_name=vae-run1", "--cloud_goodput_upload_seconds=300"]))
  assert options == cloud.Options(True, 600, True, True, "vae-run1", 300)


@pytest.mark.parametrize("argv, message", [
    (["--stack_trace_to_cloud"], "--stack_trace_to_cloud needs --hang_diagnostics"),
    (["--cloud_goodput_upload_seconds=60"], "need --cloud_goodput"),
    (["--cloud_goodput", "--cloud_goodput_run_name=Run_1"], "--cloud_goodput_run_name 'Run_1'"),
])
def test_flag_mistakes_are_one_config_error(argv, message):
  with pytest.raises(errors.ConfigError, match=message) as info:
    cloud.options_from_flags(_holders(argv))
  assert "\n" not in str(info.value)


def test_flag_bounds_are_absl_errors():
  with pytest.raises(flags.IllegalFlagValueError):
    _holders(["--hang_timeout_seconds=10"])


@pytest.mark.parametrize("modules, options, message", [
    (("cloud_tpu_diagnostics", "cloud_tpu_diagnostics.src.debug"), cloud.Options(
        hang_diagnostics=True), "--hang_diagnostics needs the cloud-tpu-diagnostics package"),
    (("ml_goodput_measurement",), cloud.Options(cloud_goodput=True),
     "--cloud_goodput needs the ml-goodput-measurement package"),
])
def test_missing_library_is_one_line_naming_the_extra(monkeypatch, modules, options, message):
  for name in modules:
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError.
  with pytest.raises(errors.ConfigError, match=message) as info:
    cloud.check_installed(options)
  assert "pip install 'vae_scale[gcp]'" in str(info.value) and "\n" not in str(info.value)
  assert info.value.exit_code == 2


def test_nothing_is_imported_unless_asked(monkeypatch):
  for name in ("cloud_tpu_diagnostics", "ml_goodput_measurement"):
    monkeypatch.setitem(sys.modules, name, None)
  cloud.check_installed(cloud.Options())
  with cloud.hang_diagnostics(False, 60) as watch:
    watch.beat()
  sink = cloud.CloudGoodput("gs://b/run", enabled=False)
  sink.restored(0)
  with sink.phase("eval"):
    sink.step_end(1)
  sink.close()


def test_default_run_name_is_stable_and_valid():
  a = cloud.default_run_name("gs://my-bucket/vae/Run_1/")
  assert a == cloud.default_run_name("gs://my-bucket/vae/Run_1") and a.startswith("vae-run-1-")
  assert a != cloud.default_run_name("gs://other-bucket/vae/Run_1")
  for workdir in ("/tmp/x", "gs://b/" + "A" * 90, "gs://b/___"):
    assert cloud._RUN_NAME.match(cloud.default_run_name(workdir)), workdir  # pylint: disable=protected-access


# -- hang diagnostics, in a child process (they take over signal handlers and faulthandler) -------

# The main thread blocks inside C (a pthread mutex another thread holds for a few seconds), the
# way it waits inside XLA for a collective that never completes.
_HANG = textwrap.dedent("""
    import ctypes, sys, threading, time
    from cloud_tpu_diagnostics.src.util import default
    from vae_scale.run import cloud
    default.STACK_TRACE_DIR_DEFAULT = sys.argv[2]  # The library's /tmp/debugging/, for the test.
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # All zero: PTHREAD_MUTEX_INITIALIZER (glibc).
    locked = threading.Event()
    def hold():
      libc.pthread_mutex_lock(mutex); locked.set(); time.sleep(4.5); libc.pthread_mutex_unlock(mutex)
    with cloud.hang_diagnostics(True, 1.0, to_cloud=sys.argv[1] == "cloud") as watch:
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


# -- goodput through ml-goodput-measurement's real GoodputRecorder --------------------------------

class _CloudLogging:
  """Stands in for the library's Cloud Logging writer (its _CloudLogger): keeps the entries."""

  def __init__(self, job_name, log_name, **unused_kwargs):
    self.job_name, self.log_name = job_name, log_name
    self.entries, self.flushed = [], 0
    _CloudLogging.last = self

  def write_cloud_logging_entry(self, entry):
    self.entries.append(entry)

  def flush(self):
    self.flushed += 1


class _Clock:
  def __init__(self, t):
    self.t = t

  def __call__(self):
    return self.t


def test_goodput_events_reach_the_recorder_in_its_vocabulary(monkeypatch):
  monkeypatch.setattr(mgm_goodput, "_CloudLogger", _CloudLogging)
  clock = _Clock(1000.0)
  sink = cloud.CloudGoodput("gs://my-bucket/vae/run1", enabled=True, start_time=990.0, clock=clock)
  log = _CloudLogging.last
  assert (log.job_name, log.log_name) == (sink.run_name, f"goodput_{sink.run_name}")
  for name, t in (("startup", 1001.0), ("restore", 1003.0)):
    clock.t = t
    with sink.phase(name):
      clock.t += 1
  clock.t = 1010.0
  sink.restored(20)
  with sink.phase("data"):
    clock.t = 1011.0
  with sink.phase("compile"):
    clock.t = 1030.0
  clock.t = 1031.0
  sink.step_end(21)
  with sink.phase("eval"):
    clock.t = 1040.0
  with sink.phase("checkpoint"):
    clock.t = 1042.0
  sink.step_end(22)
  sink.close()
  sink.close()  # Idempotent.
  stamps = [{k: v for k, v in e.items() if k != "job_name"} for e in log.entries]
  assert all(e["job_name"] == sink.run_name for e in log.entries)
  assert stamps == [
      {"job_start_time": 990.0},
      {"tpu_init_start_time": 1001.0}, {"tpu_init_end_time": 1002.0},
      {"training_prep_start_time": 1003.0}, {"training_prep_end_time": 1004.0},
      {"step_count": 20, "step_start_time": 1010.0},
      {"data_loading_start_time": 1010.0}, {"data_loading_end_time": 1011.0},
      {"custom_badput_event_type": "COMPILE", "custom_badput_event_start_time": 1011.0},
      {"custom_badput_event_type": "COMPILE", "custom_badput_event_end_time": 1030.0},
      {"step_count": 21, "step_start_time": 1031.0},
      {"custom_badput_event_type": "EVAL", "custom_badput_event_start_time": 1031.0},
      {"custom_badput_event_type": "EVAL", "custom_badput_event_end_time": 1040.0},
      {"custom_badput_event_type": "CHECKPOINT_SAVE",
       "custom_badput_event_start_time": 1040.0},
      {"custom_badput_event_type": "CHECKPOINT_SAVE", "custom_badput_event_end_time": 1042.0},
      {"step_count": 22, "step_start_time": 1042.0},
      {"job_end_time": 1042.0},
  ]
  assert log.flushed == 1


def test_every_goodput_phase_has_an_event():
  assert set(cloud.PHASE_EVENTS) == set(goodput.CAUSES)
  for event in cloud.PHASE_EVENTS.values():
    for method in event if isinstance(event, tuple) else ():
      assert callable(getattr(mgm_goodput.GoodputRecorder, method)), method
  with pytest.raises(ValueError, match="unknown goodput phase 'lunch'"):
    with cloud.CloudGoodput("gs://b/r", enabled=False).phase("lunch"):
      pass


def test_no_credentials_is_one_config_error(monkeypatch):
  def no_credentials(*unused_args, **unused_kwargs):
    raise RuntimeError("Your default credentials were not found.\n  To set up ...")
  monkeypatch.setattr(mgm_goodput, "_CloudLogger", no_credentials)
  with pytest.raises(errors.ConfigError, match="--cloud_goodput: cannot write to Cloud Logging "
                     r"\(RuntimeError: Your default credentials were not found. To set up") as info:
    cloud.CloudGoodput("gs://b/r", enabled=True)
  assert "\n" not in str(info.value)


# -- the monitor process -------------------------------------------------------------------------

# A stand-in ml_goodput_measurement for the monitor process: records how GoodputMonitor was made
# and what was called on it.
_FAKE_LIBRARY = textwrap.dedent("""
    import json, os, types
    def _record(*event):
      with open(os.environ["FAKE_MONITOR_RECORD"], "a") as f:
        f.write(json.dumps(event) + "\\n")
    class GoodputMonitor:
      def __init__(self, **kwargs):
        options = kwargs.pop("gcp_options")
        _record("init", kwargs, vars(options))
      def start_goodput_uploader(self):
        _record("start")
      def stop_goodput_uploader(self):
        _record("stop")
    class GCPOptions:
      def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
    monitoring = types.SimpleNamespace(GoodputMonitor=GoodputMonitor)
    goodput_utils = types.SimpleNamespace(GCPOptions=GCPOptions)
    """)


@pytest.mark.slow
def test_monitor_runs_in_its_own_process_until_close(tmp_path, monkeypatch):
  monkeypatch.setattr(mgm_goodput, "_CloudLogger", _CloudLogging)
  fake = tmp_path / "fake" / "ml_goodput_measurement"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text(_FAKE_LIBRARY)
  record = tmp_path / "record.jsonl"
  monkeypatch.setenv("FAKE_MONITOR_RECORD", str(record))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake.parent), str(REPO)]))
  sink = cloud.CloudGoodput("gs://my-bucket/vae/run1", enabled=True, run_name="vae-run1",
                            upload_interval_s=300)
  monitor = sink._monitor  # pylint: disable=protected-access
  assert monitor.poll() is None  # Running, until close() ends its stdin.
  sink.close(monitor_timeout_s=60)
  assert monitor.returncode == 0
  events = [json.loads(line) for line in record.read_text().splitlines()]
  assert events == [
      ["init", {"job_name": "vae-run1", "logger_name": "goodput_vae-run1",
                "tensorboard_dir": "gs://my-bucket/vae/run1", "upload_interval": 300,
                "monitoring_enabled": True, "include_badput_breakdown": True},
       {"enable_gcp_goodput_metrics": True, "enable_gcp_step_deviation_metrics": False}],
      ["start"], ["stop"]]


def test_utc_timestamps_round_trip():
  assert cloud._utc(1234.5).timestamp() == 1234.5  # pylint: disable=protected-access
  assert cloud._utc(0).tzinfo == datetime.timezone.utc  # pylint: disable=protected-access
