"""launch/: the Cloud TPU lifecycle against a scripted fake gcloud, the worker, GPU-host and SLURM
wrappers against fake python/srun, the pod configs, and shellcheck. No jax, no network."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO, load_config
from launch_helpers import executable
from vae_scale.config import schema

# Every test here starts processes (launcher scripts, stub programs): marked slow as a module.
pytestmark = pytest.mark.slow

LAUNCH = REPO / "launch"
GCP = LAUNCH / "gcp.sh"

# -- A fake gcloud that records every call and plays a scripted story -------------------------

# The story lives in two files of its directory, one answer per line, consumed in order:
# `states` answers `queued-resources describe` (NOT_FOUND -> the error gcloud prints for a
# missing resource), `statuses` answers the worker status ssh (space-separated, one word per
# worker). Every other call succeeds silently. Running out of story is recorded in `overrun`.
FAKE_GCLOUD = """#!{python}
import json, os, sys


story = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(story, "calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\\n")

def pop(name):
  path = os.path.join(story, name)
  lines = open(path).read().splitlines() if os.path.exists(path) else []
  if not lines:
    open(os.path.join(story, "overrun"), "a").write(name + "\\n")
    sys.exit(3)
  open(path, "w").write("".join(line + "\\n" for line in lines[1:]))
  return lines[0]

if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
  state = pop("states")
  if state == "NOT_FOUND":
    sys.stderr.write("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource "
                     "'projects/p/locations/z/queuedResources/%s' was not found\\n" % args[4])
    sys.exit(1)
  print(state)
elif (args[:4] in (["compute", "tpus", "tpu-vm", "ssh"], ["compute", "tpus", "queued-resources", "ssh"])
      and args[-1].endswith("tpu_worker.sh status")):
  for worker, state in enumerate(pop("statuses").split()):
    print("%svae_status t1v-n-fake-w-%d %s" % ("" if worker else "[w0] ", worker, state))
"""

NAME, ZONE, PROJECT = "vae-pod", "us-west4-a", "my-project"
WORKDIR = "gs://my-bucket/vae/run1"
REPO_URL = "https://example.com/org/vae_scale.git"
WATCH_FLAGS = [
    "--accelerator-type=v5litepod-64", "--spot", f"--repo={REPO_URL}", "--ref=v1",
    "--config=configs/pods.py:v5e-64", f"--workdir={WORKDIR}", "--poll-seconds=0",
]
MAIN_ARGS = ["--", "--config.data.path=gs://my-bucket/images", "--config.seed=3"]

# The exact calls gcp.sh makes (argv after `gcloud`).
WHERE = [f"--zone={ZONE}", f"--project={PROJECT}"]
DESCRIBE = ["compute", "tpus", "queued-resources", "describe", NAME, *WHERE,
            "--format=value(state.state)"]
CREATE = ["compute", "tpus", "queued-resources", "create", NAME, f"--node-id={NAME}", *WHERE,
          "--accelerator-type=v5litepod-64", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
DELETE = ["compute", "tpus", "queued-resources", "delete", NAME, *WHERE, "--force", "--quiet"]
SSH = ["compute", "tpus", "tpu-vm", "ssh", NAME, *WHERE]
SETUP = [*SSH, "--worker=all", "--quiet",
         f"--command=set -e; [ -d ~/vae_scale/.git ] || git clone --quiet {REPO_URL} ~/vae_scale;"
         f" git -C ~/vae_scale fetch --quiet {REPO_URL} v1;"
         " git -C ~/vae_scale checkout --quiet --force FETCH_HEAD;"
         " bash ~/vae_scale/launch/tpu_worker.sh setup --extra=tpu --python-version=3.12"]
RUN = [*SSH, "--worker=all", "--quiet",
       f"--command=bash ~/vae_scale/launch/tpu_worker.sh start --copy-logs-to={WORKDIR}/logs --"
       f" --distributed=on --config=configs/pods.py:v5e-64 --workdir={WORKDIR}"
       " --config.data.path=gs://my-bucket/images --config.seed=3"]
STATUS = [*SSH, "--worker=all", "--quiet", "--command=bash ~/vae_scale/launch/tpu_worker.sh status"]

# Two slices (Multislice): one queued resource with nodes vae-pod-0 and vae-pod-1, every
# worker of every node reached through the queued resource.
MS_FLAGS = [f if not f.startswith("--accelerator-type") else "--accelerator-type=v5litepod-256"
            for f in WATCH_FLAGS if not f.startswith("--config=")]
MS_FLAGS += ["--num-slices=2", "--config=configs/pods.py:2xv5e-256"]
MS_CREATE = ["compute", "tpus", "queued-resources", "create", NAME, "--node-count=2",
             f"--node-prefix={NAME}", *WHERE, "--accelerator-type=v5litepod-256",
             "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
MS_SSH = ["compute", "tpus", "queued-resources", "ssh", NAME, *WHERE, "--node=all"]


def _multislice(call):
  """The call as gcp.sh makes it for two slices: tpu-vm ssh becomes queued-resources ssh
  --node=all, the workdir and config stay."""
  if call[:4] == SSH[:4]:
    return [*MS_SSH, *[a.replace("configs/pods.py:v5e-64", "configs/pods.py:2xv5e-256")
                       for a in call[len(SSH):]]]
  return MS_CREATE if call == CREATE else call


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """Puts the fake gcloud first on PATH; returns its story directory."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  executable(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_DIR", str(tmp_path))
  for var in ("VAE_TPU_NAME", "VAE_ZONE", "VAE_PROJECT", "CLOUDSDK_COMPUTE_ZONE",
              "CLOUDSDK_CORE_PROJECT", "VAE_ACCELERATOR_TYPE", "VAE_RUNTIME_VERSION", "VAE_SPOT",
              "VAE_REPO", "VAE_REF", "VAE_CONFIG", "VAE_WORKDIR", "VAE_MAX_RESTARTS",
              "VAE_POLL_SECONDS", "VAE_PYTHON_VERSION", "VAE_NUM_SLICES"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("VAE_TPU_NAME", NAME)
  monkeypatch.setenv("VAE_ZONE", ZONE)
  monkeypatch.setenv("VAE_PROJECT", PROJECT)
  return tmp_path


def _story(story: pathlib.Path, states, statuses=()):
  (story / "states").write_text("".join(s + "\n" for s in states))
  (story / "statuses").write_text("".join(s + "\n" for s in statuses))


def _gcp(*args):
  return subprocess.run(["bash", str(GCP), *args], capture_output=True, text=True, timeout=60,
                        check=False)


def _calls(story: pathlib.Path):
  path = story / "calls.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _assert_calls(story, expected):
  calls = _calls(story)
  assert not (story / "overrun").exists(), f"gcp.sh asked for more than the story: {calls}"
  for i, (got, want) in enumerate(zip(calls, expected)):
    assert got == want, f"call {i}:\n got  {got}\n want {want}"
  assert len(calls) == len(expected), f"{len(calls)} calls, expected {len(expected)}: {calls}"


# -- gcp.sh ------------------------------------------------------------------------------------

# What `watch` does over a story where the slice is preempted once: create, set up, run, watch;
# then delete, recreate, set up and run the same command again.
PREEMPTED_ONCE = [
    DESCRIBE, CREATE,
    DESCRIBE, SETUP, RUN,
    DESCRIBE, STATUS,
    DESCRIBE, DELETE, CREATE,
    DESCRIBE, SETUP, RUN,
    DESCRIBE, STATUS,
]


def test_help_lists_every_subcommand_and_flag():
  result = _gcp("--help")
  assert result.returncode == 0, result.stderr
  for word in ("create", "setup", "run", "watch", "status", "logs", "stop", "delete",
               "--dry-run", "--spot", "--accelerator-type", "--runtime-version", "--zone",
               "--project", "--name", "--repo", "--ref", "--config", "--workdir",
               "--poll-seconds", "--max-restarts", "VAE_TPU_NAME", "42", "143", "--num-slices",
               "VAE_NUM_SLICES", "--node"):
    assert word in result.stdout, word


def test_watch_recovers_a_preempted_spot_slice(fake_gcloud):
  # create -> setup -> run -> training -> PREEMPTED -> delete -> create -> setup -> run (the same
  # workdir, so training resumes) -> every worker exits 0 -> watch ends.
  _story(fake_gcloud, ["NOT_FOUND", "ACTIVE", "ACTIVE", "PREEMPTED", "ACTIVE", "ACTIVE"],
         ["running running", "0 0"])
  result = _gcp("watch", *WATCH_FLAGS, *MAIN_ARGS)
  assert result.returncode == 0, result.stderr
  _assert_calls(fake_gcloud, PREEMPTED_ONCE)
  assert "restart 1" in result.stderr and "training finished" in result.stderr


def test_watch_treats_suspended_and_failed_like_preempted(fake_gcloud):
  # Spot preemption shows on the queued resource as SUSPENDING/SUSPENDED; FAILED also recovers.
  _story(fake_gcloud, ["NOT_FOUND", "ACTIVE", "SUSPENDED", "FAILED", "ACTIVE", "ACTIVE"], ["0 0"])
  result = _gcp("watch", *WATCH_FLAGS, *MAIN_ARGS)
  assert result.returncode == 0, result.stderr
  _assert_calls(fake_gcloud, [
      DESCRIBE, CREATE,
      DESCRIBE, SETUP, RUN,
      DESCRIBE, DELETE, CREATE,
      DESCRIBE, DELETE, CREATE,  # Never set up, so not another restart.
      DESCRIBE, SETUP, RUN,
      DESCRIBE, STATUS,
  ])
  assert "restart 2" not in result.stderr


def test_watch_attaches_to_a_running_slice_and_reruns_exit_42(fake_gcloud):
  # Already ACTIVE and training: leave it alone. Then the workers exit 42 on a slice that stays
  # up (a maintenance event): rerun in place, no new slice and no setup.
  _story(fake_gcloud, ["ACTIVE", "ACTIVE", "ACTIVE"], ["running running", "42 42", "0 0"])
  result = _gcp("watch", *WATCH_FLAGS, *MAIN_ARGS)
  assert result.returncode == 0, result.stderr
  _assert_calls(fake_gcloud, [DESCRIBE, STATUS, DESCRIBE, STATUS, RUN, DESCRIBE, STATUS])
  assert "already running" in result.stderr


def test_watch_reruns_workers_that_died_of_sigterm(fake_gcloud):
  # 143: training died of the SIGTERM before it could handle it (its latest checkpoint stands);
  # like 42, that is a preemption: rerun in place.
  _story(fake_gcloud, ["ACTIVE", "ACTIVE", "ACTIVE"], ["running running", "143 42", "0 0"])
  result = _gcp("watch", *WATCH_FLAGS, *MAIN_ARGS)
  assert result.returncode == 0, result.stderr
  _assert_calls(fake_gcloud, [DESCRIBE, STATUS, DESCRIBE, STATUS, RUN, DESCRIBE, STATUS])
  assert "restart 1" in result.stderr and ":143" in result.stderr


@pytest.mark.parametrize("code, statuses", [
    ("2", "2 running"),  # Bad config, data or weights.
    ("3", "3 running"),  # Diverged.
    ("3", "42 3"),  # Diverged on one worker while another was preempted: still no rerun.
])
def test_watch_does_not_rerun_a_bad_config_or_divergence(fake_gcloud, code, statuses):
  _story(fake_gcloud, ["NOT_FOUND", "ACTIVE", "ACTIVE"], [statuses])
  result = _gcp("watch", *WATCH_FLAGS, "--delete-when-done", *MAIN_ARGS)
  assert result.returncode == int(code), result.stderr
  _assert_calls(fake_gcloud, [DESCRIBE, CREATE, DESCRIBE, SETUP, RUN, DESCRIBE, STATUS, DELETE])
  assert f"training exited {code}" in result.stderr and "not rerunning" in result.stderr


def test_watch_gives_up_after_max_restarts(fake_gcloud):
  _story(fake_gcloud, ["NOT_FOUND", "ACTIVE", "PREEMPTED", "ACTIVE", "PREEMPTED"])
  result = _gcp("watch", *WATCH_FLAGS, "--max-restarts=1", *MAIN_ARGS)
  assert result.returncode == 1
  _assert_calls(fake_gcloud, [
      DESCRIBE, CREATE, DESCRIBE, SETUP, RUN,
      DESCRIBE, DELETE, CREATE, DESCRIBE, SETUP, RUN,
      DESCRIBE,
  ])
  assert "giving up" in result.stderr and "--max-restarts" in result.stderr


def test_watch_recovers_a_preempted_multislice(fake_gcloud):
  # Two v5e-256 slices: one queued resource with --node-count=2; setup, run and status reach
  # every worker of both nodes; a preemption recreates both slices; the same workdir resumes.
  _story(fake_gcloud, ["NOT_FOUND", "ACTIVE", "ACTIVE", "PREEMPTED", "ACTIVE", "ACTIVE"],
         ["running running running running", "0 0 0 0"])
  result = _gcp("watch", *MS_FLAGS, *MAIN_ARGS)
  assert result.returncode == 0, result.stderr
  _assert_calls(fake_gcloud, [_multislice(c) for c in PREEMPTED_ONCE])
  run = _calls(fake_gcloud)[4]
  assert run[-1].endswith(f"--distributed=on --config=configs/pods.py:2xv5e-256 "
                          f"--workdir={WORKDIR} --config.data.path=gs://my-bucket/images "
                          "--config.seed=3")
  assert "2 slices" in result.stderr


def test_multislice_step_by_step(fake_gcloud, monkeypatch):
  monkeypatch.setenv("VAE_NUM_SLICES", "2")  # As the README suggests, for every subcommand.
  _story(fake_gcloud, ["ACTIVE", "ACTIVE"], ["running running 0 running"])
  flags_ = [f for f in MS_FLAGS if not f.startswith("--num-slices")]
  assert _gcp("create", *flags_).returncode == 0
  assert _gcp("run", *flags_, *MAIN_ARGS).returncode == 0
  status = _gcp("status")
  assert status.returncode == 0 and status.stdout.count("vae_status") == 4
  assert _gcp("logs", "--node=1", "--lines=5").returncode == 0
  assert _gcp("stop").returncode == 0
  assert _gcp("delete").returncode == 0
  _assert_calls(fake_gcloud, [
      MS_CREATE, DESCRIBE, _multislice(RUN), DESCRIBE, _multislice(STATUS),
      [*MS_SSH[:-1], "--node=1", "--worker=0", "--quiet",
       "--command=tail -n 5 ~/vae_scale_logs/worker-*.log"],
      [*MS_SSH, "--worker=all", "--quiet", "--command=bash ~/vae_scale/launch/tpu_worker.sh stop"],
      DELETE,
  ])


def test_step_by_step_lifecycle(fake_gcloud):
  _story(fake_gcloud, ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "ACTIVE"],
         ["running running"])
  flags_ = [f for f in WATCH_FLAGS if not f.startswith("--poll")]
  assert _gcp("create", *flags_, "--poll-seconds=0").returncode == 0
  assert _gcp("setup", *flags_).returncode == 0
  assert _gcp("run", *flags_, *MAIN_ARGS).returncode == 0
  status = _gcp("status")
  assert status.returncode == 0 and "ACTIVE" in status.stdout and "running" in status.stdout
  assert _gcp("logs", "--worker=3", "--lines=20").returncode == 0
  assert _gcp("stop").returncode == 0
  assert _gcp("delete").returncode == 0
  _assert_calls(fake_gcloud, [
      CREATE, DESCRIBE, DESCRIBE, DESCRIBE, SETUP, RUN, DESCRIBE, STATUS,
      [*SSH, "--worker=3", "--quiet", "--command=tail -n 20 ~/vae_scale_logs/worker-*.log"],
      [*SSH, "--worker=all", "--quiet", "--command=bash ~/vae_scale/launch/tpu_worker.sh stop"],
      DELETE,
  ])


def test_dry_run_prints_the_lifecycle_and_runs_nothing(fake_gcloud):
  result = _gcp("watch", "--dry-run", *WATCH_FLAGS, *MAIN_ARGS)
  assert result.returncode == 0, result.stderr
  assert not _calls(fake_gcloud)
  commands = [line for line in result.stdout.splitlines() if line.startswith("+ gcloud ")]
  kinds = []
  for line in commands:
    if "queued-resources" in line:
      kinds.append(line.split()[5])
    elif "tpu_worker.sh setup" in line:
      kinds.append("setup")
    elif "tpu_worker.sh start" in line:
      kinds.append("run")
      assert f"--workdir={WORKDIR}" in line
    elif "tpu_worker.sh status" in line:
      kinds.append("status")
  assert kinds == ["describe", "create", "describe", "setup", "run", "describe", "status",
                   "describe", "delete", "create", "describe", "setup", "run", "describe",
                   "status"]
  assert "PREEMPTED" in result.stdout
  for sub in ("create", "setup", "run", "status", "logs", "stop", "delete"):
    sub_result = _gcp(sub, "--dry-run", *WATCH_FLAGS)
    assert sub_result.returncode == 0, (sub, sub_result.stderr)
    assert "+ gcloud compute tpus" in sub_result.stdout, sub
  # Two slices: the same story over a Multislice queued resource.
  result = _gcp("watch", "--dry-run", *MS_FLAGS, *MAIN_ARGS)
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if line.startswith("+ gcloud ")]
  creates = [line for line in lines if "queued-resources create" in line]
  assert len(creates) == 2 and all("--node-count=2 --node-prefix=vae-pod " in c for c in creates)
  remote = [line for line in lines if "tpu_worker.sh" in line]
  assert len(remote) == 6
  assert all(line.startswith("+ gcloud compute tpus queued-resources ssh vae-pod ") and
             "--node=all --worker=all" in line for line in remote)
  assert not _calls(fake_gcloud)


def test_settings_come_from_flags_or_environment(fake_gcloud, monkeypatch):
  monkeypatch.delenv("VAE_ZONE")
  monkeypatch.delenv("VAE_PROJECT")
  monkeypatch.setenv("CLOUDSDK_COMPUTE_ZONE", "europe-west4-b")
  monkeypatch.setenv("CLOUDSDK_CORE_PROJECT", "env-project")
  monkeypatch.setenv("VAE_ACCELERATOR_TYPE", "v4-32")
  out = _gcp("create", "--dry-run").stdout
  assert ("+ gcloud compute tpus queued-resources create vae-pod --node-id=vae-pod "
          "--zone=europe-west4-b --project=env-project --accelerator-type=v4-32 "
          "--runtime-version=tpu-ubuntu2204-base\n") in out  # On demand: no --spot.
  out = _gcp("create", "--dry-run", "--zone", "us-east5-a", "--accelerator-type=v5p-128",
             "--create-flag=--reserved").stdout
  assert ("--zone=us-east5-a --project=env-project --accelerator-type=v5p-128 "
          "--runtime-version=v2-alpha-tpuv5 --reserved\n") in out


@pytest.mark.parametrize("args, message", [
    (["run", "--workdir=/tmp/run1"], "must start with gs://"),
    (["run"], "no workdir"),
    (["create"], "no accelerator type"),
    (["create", "--accelerator-type=tpu-x"], "--runtime-version"),
    (["setup"], "no repository"),
    (["watch", "--accelerator-type=v4-32", "--repo=r", f"--workdir={WORKDIR}",
      "--poll-seconds=soon"], "--poll-seconds"),
    (["launch"], "unexpected argument"),
    (["create", "--colour=red"], "unknown flag --colour"),
    (["create", "--accelerator-type=v4-32", "--num-slices=0"], "--num-slices"),
    (["status", "--num-slices=two"], "--num-slices"),
    (["logs", "--node=first"], "--node"),
    ([], "no subcommand"),
])
def test_usage_errors_exit_2_with_one_clear_line(fake_gcloud, args, message):
  result = _gcp(*args, "--dry-run")
  assert result.returncode == 2
  assert message in result.stderr.splitlines()[0]


# -- tpu_worker.sh, run locally with a fake python ---------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for `python -m vae_scale.main ARGS`: records ARGS, then exits FAKE_EXIT, or with
# FAKE_EXIT=wait runs until SIGTERM and exits 42 like vae_scale.main after its checkpoint, or
# with FAKE_EXIT=hang dies of the SIGTERM (vae_scale.main before its handler is in place).
if [[ "${FAKE_EXIT}" == hang ]]; then
  echo "main $*" >>"${FAKE_RECORD}"
  sleep 30 &
  wait
  exit 1
fi
if [[ "${FAKE_EXIT}" == wait ]]; then
  trap 'echo main got SIGTERM; exit 42' TERM
  echo "main $*" >>"${FAKE_RECORD}"
  sleep 30 &
  wait
  exit 1
fi
echo "main $*" >>"${FAKE_RECORD}"
exit "${FAKE_EXIT}"
"""


@pytest.fixture
def worker(tmp_path, monkeypatch):
  """Runs launch/tpu_worker.sh SUBCOMMAND ... against a fake clone, venv and python."""
  (tmp_path / "clone").mkdir()
  monkeypatch.setenv("VAE_HOME", str(tmp_path / "clone"))
  monkeypatch.setenv("VAE_LOG_DIR", str(tmp_path / "logs"))
  monkeypatch.setenv("VAE_PYTHON", str(executable(tmp_path / "python", FAKE_PYTHON)))
  monkeypatch.setenv("FAKE_RECORD", str(tmp_path / "record"))

  def run(*args, exit_code="0"):
    env = dict(os.environ, FAKE_EXIT=exit_code)
    return subprocess.run(["bash", str(LAUNCH / "tpu_worker.sh"), *args], capture_output=True,
                          text=True, timeout=30, env=env, check=False)
  run.tmp = tmp_path
  return run


def _status(worker):
  result = worker("status")
  assert result.returncode == 0, result.stderr
  word, _, state = result.stdout.split()
  assert word == "vae_status"
  return state


def _wait_for(predicate, seconds=10.0):
  deadline = time.monotonic() + seconds
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


def test_worker_start_status_stop(worker):
  assert _status(worker) == "none"
  result = worker("start", "--", "--config=c.py", "--workdir=gs://b/r", exit_code="wait")
  assert result.returncode == 0, result.stderr
  assert _status(worker) == "running"
  _wait_for((worker.tmp / "record").exists)  # Its SIGTERM handler is in place.
  stop = worker("stop", "--timeout=10")
  assert stop.returncode == 0, stop.stderr
  assert _status(worker) == "42"  # Checkpointed on SIGTERM; the watcher reruns it.
  log = next((worker.tmp / "logs").glob("worker-*.log")).read_text()
  assert "main got SIGTERM" in log and "exit 42" in log
  assert (worker.tmp / "record").read_text() == "main -m vae_scale.main --config=c.py --workdir=gs://b/r\n"


def test_worker_reports_a_death_by_sigterm_as_143(worker):
  assert worker("start", "--", "--workdir=gs://b/r", exit_code="hang").returncode == 0
  _wait_for((worker.tmp / "record").exists)
  assert worker("stop", "--timeout=10").returncode == 0
  assert _status(worker) == "143"  # 128 + SIGTERM: the watcher reruns it, like 42.


@pytest.mark.parametrize("exit_code", ["0", "2", "3", "1"])
def test_worker_reports_the_exit_code(worker, exit_code):
  assert worker("start", "--", "--workdir=gs://b/r", exit_code=exit_code).returncode == 0
  _wait_for(lambda: _status(worker) != "running")
  assert _status(worker) == exit_code


# -- gpu_host.sh and slurm.sbatch, run locally with fake python / srun / scontrol ----------------

COUNTING_PYTHON = """#!/usr/bin/env bash
# Exits with the next code of FAKE_CODES (one per run) and records each run. The code `wait`
# waits for SIGTERM and exits 42, like vae_scale.main after its checkpoint; `hang` waits and
# dies of the SIGTERM (143, vae_scale.main before its handler is in place); `term` dies of a
# SIGTERM sent to it alone (143).
echo "$*" >>"${FAKE_RECORD}"
runs=$(wc -l <"${FAKE_RECORD}")
read -r -a codes <<<"${FAKE_CODES}"
code="${codes[$((runs - 1))]}"
case "${code}" in
  wait) trap 'exit 42' TERM; sleep 30 & wait ;;
  hang) sleep 30 & wait ;;
  term) kill -TERM $$ ;;
esac
exit "${code}"
"""


def _gpu_host(tmp_path, codes, terminate=False):
  python = executable(tmp_path / "python", COUNTING_PYTHON)
  env = dict(os.environ, VAE_PYTHON=str(python), VAE_RESTART_DELAY="0", VAE_MAX_RESTARTS="2",
             FAKE_CODES=codes, FAKE_RECORD=str(tmp_path / "record"))
  proc = subprocess.Popen(["bash", str(LAUNCH / "gpu_host.sh"), "--config=configs/pods.py:gpu8",
                           "--workdir=/ckpt/run1"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env)
  if terminate:  # Like `kill PID` of the script alone: it must pass SIGTERM on to training.
    _wait_for((tmp_path / "record").exists)
    proc.terminate()
  out, _ = proc.communicate(timeout=30)
  runs = (tmp_path / "record").read_text().splitlines()
  assert set(runs) == {"-m vae_scale.main --config=configs/pods.py:gpu8 --workdir=/ckpt/run1"}, out
  return proc.returncode, len(runs)


@pytest.mark.parametrize("codes, expected_exit, expected_runs", [
    ("42 42 0", 0, 3),  # Preempted twice, resumed, finished.
    ("term 42 0", 0, 3),  # Died of a SIGTERM (143), then preempted: both rerun.
    ("2", 2, 1),  # Bad config: not retried.
    ("3", 3, 1),  # Diverged: not retried.
    ("137", 137, 1),  # Killed (out of memory, say): a crash, not retried.
    ("1", 1, 1),  # A crash: not retried.
    ("42 42 42 0", 42, 3),  # VAE_MAX_RESTARTS=2 reruns, then gives up.
])
def test_gpu_host_reruns_only_exit_42(tmp_path, codes, expected_exit, expected_runs):
  assert _gpu_host(tmp_path, codes) == (expected_exit, expected_runs)


@pytest.mark.parametrize("codes", ["wait 0", "hang 0"])
def test_gpu_host_stops_after_the_checkpoint_when_terminated(tmp_path, codes):
  # Training saved and exited 42, or died of the SIGTERM (143) before it could handle it:
  # either way the script stops with 42 (run it again to resume) and does not rerun.
  assert _gpu_host(tmp_path, codes, terminate=True) == (42, 1)


FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for srun: records its argv, exits FAKE_EXIT, or with FAKE_EXIT=wait waits for the
# SIGTERM that fake scancel sends and exits FAKE_TERM_EXIT (default 143: a task killed before
# it could exit 42).
echo "srun $*" >>"${FAKE_RECORD}"
if [[ "${FAKE_EXIT}" == wait ]]; then
  echo $$ >"${FAKE_DIR}/srun.pid"
  trap 'kill "${sleeper}"; exit "${FAKE_TERM_EXIT:-143}"' TERM
  sleep 30 &
  sleeper=$!
  wait
fi
exit "${FAKE_EXIT}"
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >>"${FAKE_RECORD}"
kill -TERM "$(cat "${FAKE_DIR}/srun.pid")"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >>"${FAKE_RECORD}"
"""


def _sbatch(tmp_path, exit_code, restart_count="0", signal_after_start=False, term_exit="143"):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  executable(bin_dir / "srun", FAKE_SRUN)
  executable(bin_dir / "scancel", FAKE_SCANCEL)
  executable(bin_dir / "scontrol", FAKE_SCONTROL)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_EXIT=exit_code,
             FAKE_DIR=str(tmp_path), FAKE_RECORD=str(tmp_path / "record"), SLURM_JOB_ID="4242",
             SLURM_SUBMIT_DIR=str(tmp_path), SLURM_NTASKS="32", SLURM_JOB_NUM_NODES="4",
             SLURM_RESTART_COUNT=restart_count, VAE_WORKDIR="/shared/run1", FAKE_TERM_EXIT=term_exit,
             VAE_CONFIG="configs/pods.py:gpu8x4")
  proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "--config.seed=1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  if signal_after_start:
    _wait_for(lambda: (tmp_path / "srun.pid").exists())
    proc.send_signal(signal.SIGUSR1)  # SLURM: --signal=B:USR1@300, the time limit is near.
  out, _ = proc.communicate(timeout=30)
  record = (tmp_path / "record").read_text().splitlines()
  assert record[0] == ("srun --output=logs/4242/task-%t.log python -m vae_scale.main "
                       "--config=configs/pods.py:gpu8x4 --workdir=/shared/run1 --config.seed=1")
  assert (tmp_path / "logs" / "4242").is_dir()
  return proc.returncode, record[1:], out


@pytest.mark.parametrize("exit_code", ["42", "143"])  # Saved on SIGTERM; died of SIGTERM.
def test_sbatch_requeues_after_a_preemption(tmp_path, exit_code):
  code, record, _ = _sbatch(tmp_path, exit_code)
  assert (code, record) == (0, ["scontrol requeue 4242"])


@pytest.mark.parametrize("term_exit", ["42", "143", "137"])  # 137: SLURM's SIGKILL after KillWait.
def test_sbatch_checkpoints_and_requeues_near_the_time_limit(tmp_path, term_exit):
  code, record, out = _sbatch(tmp_path, "wait", signal_after_start=True, term_exit=term_exit)
  assert (code, record) == (0, ["scancel --signal=TERM 4242", "scontrol requeue 4242"]), out


@pytest.mark.parametrize("term_exit", ["2", "3"])
def test_sbatch_never_requeues_a_bad_config_or_divergence(tmp_path, term_exit):
  # Even when it comes after the time-limit signal: rerunning would fail the same way.
  code, record, out = _sbatch(tmp_path, "wait", signal_after_start=True, term_exit=term_exit)
  assert (code, record) == (int(term_exit), ["scancel --signal=TERM 4242"]), out
  assert "not requeued" in out


@pytest.mark.parametrize("exit_code, restart_count, expected", [
    ("0", "0", 0),  # Finished.
    ("2", "0", 2),  # Bad config.
    ("3", "0", 3),  # Diverged.
    ("1", "0", 1),  # Crash.
    ("42", "20", 42),  # VAE_MAX_REQUEUES (20) used up.
])
def test_sbatch_does_not_requeue(tmp_path, exit_code, restart_count, expected):
  code, record, _ = _sbatch(tmp_path, exit_code, restart_count)
  assert (code, record) == (expected, [])


# -- configs/pods.py -----------------------------------------------------------------------------

# What jax.device_count() reports on each slice, worked out here independently of pods.py:
# v5e (v5litepod-N) names count chips, one TensorCore each; v4-N and v5p-N name TensorCores,
# two per chip, and megacore makes each chip one JAX device (v4-32 = 16 chips = 16 devices).
DEVICES = {"v5e-8": 8, "v5e-64": 64, "v4-32": 32 // 2, "v5p-128": 128 // 2, "gpu8": 8,
           "gpu8x4": 4 * 8, "2xv5e-256": 2 * 256}
# JAX processes: one per TPU VM host (v5e 8 chips, v4 and v5p 4 chips per host), one per GPU
# under SLURM, one for a single GPU host.
PROCESSES = {"v5e-8": 1, "v5e-64": 8, "v4-32": 4, "v5p-128": 16, "gpu8": 1, "gpu8x4": 32,
             "2xv5e-256": 2 * 32}
SLICES = {"2xv5e-256": 2}  # Multislice variants: slices over DCN; the others are one slice.


@pytest.mark.parametrize("variant", sorted(DEVICES))
def test_pod_variants_split_evenly_and_scale_the_learning_rate(variant):
  config = load_config("pods", variant)
  config.data.path = "gs://bucket/images"  # Like ldm_f8, the variants have no dataset path.
  schema.validate(config, num_devices=DEVICES[variant])  # Includes the even split.
  assert config.global_batch_size % DEVICES[variant] == 0
  assert config.global_batch_size % PROCESSES[variant] == 0  # Equal per-host batches.
  assert config.optimizer.learning_rate == pytest.approx(4.5e-6 * config.global_batch_size)
  assert config.disc.learning_rate == pytest.approx(4.5e-6 * config.global_batch_size)
  assert config.model.dtype == "bfloat16"


def test_pods_lists_exactly_the_tested_variants():
  module_config = load_config("pods", "gpu8")  # Loads the module; SLICES is read below.
  assert module_config.global_batch_size == 64
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("pods_module", REPO / "configs" / "pods.py")
  pods = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(pods)
  assert set(pods.SLICES) == set(DEVICES)
  for name, s in pods.SLICES.items():
    assert (s.num_devices, s.num_processes) == (DEVICES[name], PROCESSES[name]), name
    assert s.num_slices == SLICES.get(name, 1), name
    # Every slice gets an equal share of devices and of processes.
    assert s.num_devices % s.num_slices == 0 and s.num_processes % s.num_slices == 0, name


@pytest.mark.parametrize("arg", [None, "v5e-65"])
def test_pods_unknown_variant_lists_the_known_ones(arg):
  with pytest.raises(ValueError, match="v5e-64, v4-32"):
    load_config("pods", arg)


def test_pods_through_config_flags_like_main():
  argv = ["main", f"--config={REPO / 'configs' / 'pods.py'}:v4-32",
          "--config.global_batch_size=256"]
  flag_values = flags.FlagValues()
  # sys_argv: the override flags (--config.FIELD) are defined from the command line.
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert config.global_batch_size == 256 and config.global_batch_size % DEVICES["v4-32"] == 0
  assert config.optimizer.learning_rate == pytest.approx(4.5e-6 * 128)  # Set by the variant.


# -- shellcheck (CI installs it: apt-get install -y shellcheck) ------------------------------------

def test_shellcheck_launch_and_bench_scripts():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.fail("shellcheck is not installed; install it (apt-get install -y shellcheck) - "
                "launch/ and bench/ must pass it")
  scripts = (sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
             + sorted((REPO / "bench").glob("*.sh")))
  assert {p.name for p in scripts} >= {"gcp.sh", "gpu_host.sh", "slurm.sbatch", "tpu_worker.sh",
                                       "gpu_suite.sh", "xpk.sh", "sky_run.sh"}
  result = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
