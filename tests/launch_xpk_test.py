"""launch/xpk.sh against recording stand-ins for xpk, kubectl, docker and gcloud; the JobSet that
the real xpk (1.16.0) generates for it, recorded from its offline dry run; XPK's container wrapper
run locally around a stand-in python; and the Dockerfile. No cloud, no network, no docker engine."""

import json
import os
import pathlib
import re
import runpy
import signal
import subprocess
import sys
import time
import types

import pytest
import yaml

from conftest import REPO
from launch_helpers import executable, recorded, recorders

# Every test here starts processes (the script, stand-in tools): marked slow as a module.
pytestmark = pytest.mark.slow

XPK_SH = REPO / "launch" / "xpk.sh"
MANIFEST = REPO / "tests" / "data" / "xpk_1.16.0_workload.yaml"

PROJECT, ZONE, CLUSTER, WORKLOAD = "my-project", "us-west4-a", "vae-v5e", "vae-run1"
IMAGE = "us-docker.pkg.dev/my-project/vae/vae_scale"
WHERE = [f"--project={PROJECT}", f"--zone={ZONE}"]
RUN_FLAGS = [f"--workload={WORKLOAD}", "--tpu-type=v5litepod-256", "--num-slices=2", "--tag=v1",
             "--config=configs/pods.py:2xv5e-256", "--workdir=gs://my-bucket/vae/run1"]
MAIN_ARGS = ["--", "--config.data.path=gs://my-bucket/images"]
MAIN = ("python3 -m vae_scale.main --distributed=on --config=configs/pods.py:2xv5e-256 "
        "--workdir=gs://my-bucket/vae/run1")
CREDENTIALS = ["gcloud", "container", "clusters", "get-credentials", CLUSTER,
               "--region=us-west4", f"--project={PROJECT}"]


@pytest.fixture
def tools(tmp_path, monkeypatch):
  """Recording xpk, kubectl, docker and gcloud first on PATH; the settings in the environment."""
  bin_dir = recorders(tmp_path / "bin", "xpk", "kubectl", "docker", "gcloud")
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  for var in ("VAE_PROJECT", "VAE_ZONE", "CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE",
              "VAE_XPK_CLUSTER", "VAE_XPK_WORKLOAD", "VAE_TPU_TYPE", "VAE_NUM_SLICES", "VAE_SPOT",
              "VAE_RESERVATION", "VAE_IMAGE", "VAE_IMAGE_TAG", "VAE_CONFIG", "VAE_WORKDIR",
              "VAE_MAX_RESTARTS", "VAE_GRACE_SECONDS"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("VAE_PROJECT", PROJECT)
  monkeypatch.setenv("VAE_ZONE", ZONE)
  monkeypatch.setenv("VAE_XPK_CLUSTER", CLUSTER)
  monkeypatch.setenv("VAE_IMAGE", IMAGE)
  return bin_dir


def _xpk_sh(*args):
  return subprocess.run(["bash", str(XPK_SH), *args], capture_output=True, text=True, timeout=60,
                        check=False)


def _recorded_xpk_argv():
  """The argv the recorded manifest was generated from (its header), MANIFEST for the file."""
  (line,) = [l for l in MANIFEST.read_text().splitlines() if l.startswith("# xpk-argv: ")]
  return json.loads(line[len("# xpk-argv: "):])


def test_help_lists_every_subcommand_flag_and_exit_code():
  result = _xpk_sh("--help")
  assert result.returncode == 0, result.stderr
  for word in ("build", "cluster", "run", "status", "logs", "stop", "delete-cluster", "--dry-run",
               "--xpk-dry-run", "--tpu-type", "--num-slices", "--spot", "--on-demand",
               "--reservation", "--image", "--tag", "--max-restarts", "--grace-seconds",
               "--stack-traces", "--cloud-goodput", "VAE_XPK_CLUSTER", "42", "143", "2 bad config",
               "3\ndiverged"):
    assert word in result.stdout, word


def test_lifecycle_runs_exactly_these_commands(tools):
  for args in (["build", "--tag=v1"], ["cluster", "--tpu-type=v5litepod-256", "--num-slices=2",
                                       "--spot"],
               ["run", *RUN_FLAGS, *MAIN_ARGS], ["status", f"--workload={WORKLOAD}"],
               ["logs", f"--workload={WORKLOAD}", "--slice=1", "--worker=3", "--lines=20"],
               ["logs", f"--workload={WORKLOAD}", "--worker=all", "--follow"],
               ["stop", f"--workload={WORKLOAD}"], ["delete-cluster"]):
    result = _xpk_sh(*args)
    assert result.returncode == 0, (args, result.stderr)
  selector = f"--selector=jobset.sigs.k8s.io/jobset-name={WORKLOAD}"
  assert recorded(tools) == [
      ["gcloud", "auth", "configure-docker", "us-docker.pkg.dev", "--quiet"],
      ["docker", "build", f"--tag={IMAGE}:v1", str(REPO)],
      ["docker", "push", f"{IMAGE}:v1"],
      ["xpk", "cluster", "create", f"--cluster={CLUSTER}", "--tpu-type=v5litepod-256",
       "--num-slices=2", "--spot", *WHERE],
      ["xpk", "workload", "create", f"--cluster={CLUSTER}", f"--workload={WORKLOAD}",
       f"--docker-image={IMAGE}:v1", "--tpu-type=v5litepod-256", "--num-slices=2",
       "--max-restarts=50", "--restart-on-exit-codes=42,143",
       "--termination-grace-period-seconds=300", *WHERE,
       f"--command={MAIN} --config.data.path=gs://my-bucket/images"],
      ["xpk", "workload", "list", f"--cluster={CLUSTER}", f"--filter-by-job={WORKLOAD}", *WHERE],
      CREDENTIALS,
      ["kubectl", "get", "jobset", WORKLOAD],
      ["kubectl", "get", "pods", selector, "--output=wide"],
      CREDENTIALS,
      ["kubectl", "logs", selector + ",jobset.sigs.k8s.io/job-index=1,"
       "batch.kubernetes.io/job-completion-index=3", "--all-containers", "--prefix", "--tail=20"],
      CREDENTIALS,
      ["kubectl", "logs", selector + ",jobset.sigs.k8s.io/job-index=0", "--all-containers",
       "--prefix", "--tail=100", "--follow", "--max-log-requests=1000"],
      ["xpk", "workload", "delete", f"--cluster={CLUSTER}", f"--workload={WORKLOAD}", *WHERE,
       "--force"],
      ["xpk", "cluster", "delete", f"--cluster={CLUSTER}", *WHERE, "--force"],
  ]


def test_capacity_and_extra_flags(tools):
  assert _xpk_sh("cluster", "--tpu-type=v4-32", "--reservation=res-1",
                 "--cluster-flag=--num-nodes=3").returncode == 0
  assert _xpk_sh("cluster", "--tpu-type=v4-32").returncode == 0  # Default: on demand.
  assert _xpk_sh("run", *RUN_FLAGS, "--max-restarts=7", "--grace-seconds=60", "--cloud-goodput",
                 "--workload-flag=--priority=high").returncode == 0
  cluster, on_demand, run = recorded(tools)
  assert cluster[-4:] == ["--reservation=res-1", *WHERE, "--num-nodes=3"]
  assert on_demand[-3:] == ["--on-demand", *WHERE]
  assert "--max-restarts=7" in run and "--termination-grace-period-seconds=60" in run
  assert run[-2:] == ["--priority=high", f"--command={MAIN} --cloud_goodput "
                      "--cloud_goodput_upload_seconds=300"]


def test_image_tag_defaults_to_the_git_commit(tools):
  assert _xpk_sh("build").returncode == 0
  commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
  dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                         text=True, check=True).stdout.strip()
  assert recorded(tools)[-1] == ["docker", "push", f"{IMAGE}:{commit}{'-dirty' if dirty else ''}"]


def test_dry_run_prints_every_command_and_runs_none(tools):
  out = []
  for args in (["build", "--tag=v1"], ["cluster", "--tpu-type=v5litepod-256", "--spot"],
               ["run", *RUN_FLAGS, "--stack-traces", *MAIN_ARGS],
               ["status", f"--workload={WORKLOAD}"], ["logs", f"--workload={WORKLOAD}"],
               ["stop", f"--workload={WORKLOAD}"], ["delete-cluster"]):
    result = _xpk_sh("--dry-run", *args)  # Before `--`: what follows it goes to vae_scale.main.
    assert result.returncode == 0, (args, result.stderr)
    out += result.stdout.splitlines()
  assert not recorded(tools)
  assert out == [
      "+ gcloud auth configure-docker us-docker.pkg.dev --quiet",
      f"+ docker build --tag={IMAGE}:v1 {REPO}",
      f"+ docker push {IMAGE}:v1",
      f"+ xpk cluster create --cluster={CLUSTER} --tpu-type=v5litepod-256 --num-slices=1 --spot "
      f"--project={PROJECT} --zone={ZONE}",
      f"+ xpk workload create --cluster={CLUSTER} --workload={WORKLOAD} "
      f"--docker-image={IMAGE}:v1 --tpu-type=v5litepod-256 --num-slices=2 --max-restarts=50 "
      "--restart-on-exit-codes=42,143 --termination-grace-period-seconds=300 "
      f"--deploy-stacktrace-sidecar --project={PROJECT} --zone={ZONE} "
      f"'--command={MAIN} --hang_diagnostics --stack_trace_to_cloud "
      "--config.data.path=gs://my-bucket/images'",
      f"+ xpk workload list --cluster={CLUSTER} --filter-by-job={WORKLOAD} --project={PROJECT} "
      f"--zone={ZONE}",
      f"+ gcloud container clusters get-credentials {CLUSTER} --region=us-west4 "
      f"--project={PROJECT}",
      f"+ kubectl get jobset {WORKLOAD}",
      f"+ kubectl get pods --selector=jobset.sigs.k8s.io/jobset-name={WORKLOAD} --output=wide",
      f"+ gcloud container clusters get-credentials {CLUSTER} --region=us-west4 "
      f"--project={PROJECT}",
      f"+ kubectl logs --selector=jobset.sigs.k8s.io/jobset-name={WORKLOAD},"
      "jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0 "
      "--all-containers --prefix --tail=100",
      f"+ xpk workload delete --cluster={CLUSTER} --workload={WORKLOAD} --project={PROJECT} "
      f"--zone={ZONE} --force",
      f"+ xpk cluster delete --cluster={CLUSTER} --project={PROJECT} --zone={ZONE} --force",
  ]


def test_xpk_dry_run_passes_xpks_own_dry_run(tools):
  assert _xpk_sh("run", *RUN_FLAGS, "--xpk-dry-run").returncode == 0
  assert recorded(tools)[0][-1] == "--dry-run"


@pytest.mark.parametrize("args, message", [
    (["run", *RUN_FLAGS[1:]], "no workload name"),
    (["run", *RUN_FLAGS, "--workload=Run_1"], "--workload 'Run_1'"),
    (["run", *RUN_FLAGS, "--workdir=/tmp/run1"], "must start with gs://"),
    (["run", *RUN_FLAGS, f"--image={IMAGE}:latest"], "carries a tag"),
    (["run", *RUN_FLAGS, "--tag=a b"], "not a valid image tag"),
    (["run", *RUN_FLAGS, "--max-restarts=many"], "--max-restarts"),
    (["cluster", "--tpu-type=v4-8", "--spot", "--reservation=r"], "exclude each other"),
    (["cluster"], "no TPU type"),
    (["cluster", "--tpu-type=v4-8", "--num-slices=0"], "--num-slices"),
    (["logs", f"--workload={WORKLOAD}", "--slice=first"], "--slice"),
    (["deploy"], "unexpected argument"),
    (["status", "--colour=red"], "unknown flag --colour"),
    ([], "no subcommand"),
])
def test_usage_errors_exit_2_with_one_clear_line(tools, args, message):
  result = _xpk_sh(*args, "--dry-run")
  assert result.returncode == 2, result.stdout
  assert message in result.stderr.splitlines()[0]
  assert not recorded(tools)


# -- The JobSet the real xpk made of `xpk.sh run` --------------------------------------------------

def test_the_recorded_manifest_is_what_xpk_sh_asks_for_today(tools):
  # If this fails, launch/xpk.sh changed what it passes xpk: record the manifest again with the
  # command in its header (xpk 1.16.0 in any venv; --xpk-dry-run needs no cloud).
  assert _xpk_sh("run", *RUN_FLAGS, "--stack-traces", "--xpk-dry-run",
                 "--workload-flag=--output-manifest-file=MANIFEST", *MAIN_ARGS).returncode == 0
  (call,) = recorded(tools)
  assert call == ["xpk", *_recorded_xpk_argv()]


def _main_container(manifest):
  pod = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  (main,) = [c for c in pod["containers"] if c["name"] == "jax-tpu"]
  return pod, main


def test_jobset_restarts_on_42_and_143_and_fails_on_2_and_3():
  manifest = yaml.safe_load(MANIFEST.read_text())
  job = manifest["spec"]["replicatedJobs"][0]
  assert job["replicas"] == 2  # --num-slices=2: one Job per slice.
  assert manifest["spec"]["failurePolicy"] == {
      "rules": [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
      "maxRestarts": 50}
  (rule,) = job["template"]["spec"]["podFailurePolicy"]["rules"]
  assert rule["action"] == "FailJob" and rule["onExitCodes"]["containerName"] == "jax-tpu"
  assert rule["onExitCodes"]["operator"] == "NotIn"
  restart_codes = set(rule["onExitCodes"]["values"])

  def outcome(code):  # A pod's exit code -> what the JobSet does (Kubernetes' semantics).
    return "restart" if code in restart_codes else "fail for good"
  assert {c: outcome(c) for c in (42, 143, 137, 2, 3, 1)} == {
      42: "restart", 143: "restart", 137: "restart",  # Preempted; SIGTERM; SIGKILL (OOM).
      2: "fail for good", 3: "fail for good", 1: "fail for good"}  # Config, divergence, crash.
  pod, main = _main_container(manifest)
  assert pod["terminationGracePeriodSeconds"] == 300
  assert main["image"] == f"{IMAGE}:v1"
  assert f"({MAIN} --hang_diagnostics --stack_trace_to_cloud " \
         "--config.data.path=gs://my-bucket/images) & PID=$!;" in main["command"][2]
  # --stack-traces: XPK's sidecar reads /tmp/debugging, which vae_scale writes with
  # --stack_trace_to_cloud (cloud-tpu-diagnostics' directory).
  assert {"name": "tpu-stack-trace", "mountPath": "/tmp/debugging"} in main["volumeMounts"]
  assert "stacktrace-explorer" in {c["name"] for c in pod["containers"]}


# XPK's container wrapper, run here around a stand-in python3: exits with FAKE_EXIT, or with
# FAKE_EXIT=wait waits for SIGTERM and exits 42 (vae_scale.main after its checkpoint), or with
# FAKE_EXIT=die dies of SIGTERM.
FAKE_PYTHON3 = """#!/usr/bin/env bash
echo "$*" >>"${FAKE_RECORD}"
case "${FAKE_EXIT}" in
  wait) trap 'exit 42' TERM; sleep 60 & wait ;;
  die) sleep 60 & wait ;;
  *) exit "${FAKE_EXIT}" ;;
esac
"""


def test_xpks_container_wrapper_keeps_the_exit_code_and_passes_sigterm(tmp_path):
  _, main = _main_container(yaml.safe_load(MANIFEST.read_text()))
  assert main["command"][:2] == ["bash", "-c"]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  executable(bin_dir / "python3", FAKE_PYTHON3)
  # The sidecar's shared volume is not here; the wrapper's `touch` of it fails harmlessly.
  procs = {}
  for case in ("0", "2", "3", "42", "wait", "die"):
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_EXIT=case,
               FAKE_RECORD=str(tmp_path / f"record-{case}"))
    procs[case] = subprocess.Popen(main["command"], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
  for case in ("wait", "die"):  # Like the kubelet stopping the pod: SIGTERM to PID 1.
    record, deadline = tmp_path / f"record-{case}", time.monotonic() + 30
    while not record.exists():  # python3 has started (and set its trap).
      assert time.monotonic() < deadline, "the wrapper never started python3"
      time.sleep(0.05)
    time.sleep(0.2)
    procs[case].send_signal(signal.SIGTERM)
  codes = {case: proc.wait(timeout=60) for case, proc in procs.items()}
  assert codes == {"0": 0, "2": 2, "3": 3, "42": 42, "wait": 42, "die": 143}
  argv = (tmp_path / "record-0").read_text().split()
  assert argv[:3] == ["-m", "vae_scale.main", "--distributed=on"]


# -- Dockerfile ------------------------------------------------------------------------------------

def _dockerfile():
  """(instruction, argument) pairs of the Dockerfile, continuation lines joined."""
  text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
  lines = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
  return [tuple(l.split(None, 1)) for l in lines]


def _setup_extras():
  captured = {}
  fake = types.ModuleType("setuptools")
  fake.setup = lambda **kwargs: captured.update(kwargs)
  fake.find_packages = lambda **kwargs: []
  saved = sys.modules.get("setuptools")
  sys.modules["setuptools"] = fake
  cwd = os.getcwd()
  try:
    os.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"))
  finally:
    os.chdir(cwd)
    if saved is not None:
      sys.modules["setuptools"] = saved
  return captured["extras_require"]


def test_dockerfile_pins_a_jax_tpu_base_and_installs_the_package():
  steps = _dockerfile()
  instructions = [s[0] for s in steps]
  assert instructions[:2] == ["ARG", "FROM"]
  name, _, default = steps[0][1].partition("=")
  assert name == "BASE_IMAGE" and steps[1][1] == "${BASE_IMAGE}"
  image, tag = default.rsplit(":", 1)
  assert image == "us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu"
  assert re.fullmatch(r"jax\d+\.\d+\.\d+-rev\d+", tag), tag  # A version tag: never `latest`.
  runs = [arg for op, arg in steps if op == "RUN"]
  extras = _setup_extras()
  installs = [re.search(r"pip install --no-cache-dir '\.\[([a-z,]+)\]'", r) for r in runs]
  (requested,) = [m.group(1).split(",") for m in installs if m]
  assert requested == ["tpu", "gcp"] and set(requested) <= set(extras)
  assert any("pip install --no-cache-dir --no-deps ." in r for r in runs)  # The package itself.
  assert ("WORKDIR", "/app") in steps and ("COPY", ". .") in steps
  # The dependency layer comes before the code is copied, so code changes reuse it.
  dependencies = steps.index(("RUN", next(m.string for m in installs if m)))
  assert dependencies < steps.index(("COPY", ". ."))
  assert [s for s in steps if s[0] in ("CMD", "ENTRYPOINT")] == [
      ("CMD", '["python3", "-m", "vae_scale.main", "--help"]')]
  # What the image imports at its end is importable from this checkout.
  (check,) = [r for r in runs if "python3 -c" in r]
  statement = re.search(r'python3 -c "([^"]+)"', check).group(1)
  subprocess.run([sys.executable, "-c", statement], cwd=REPO, check=True, timeout=120)


def test_dockerignore_keeps_the_code_and_drops_the_clutter():
  patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
  for needed in (".git", ".venv", ".ci-venv", "**/__pycache__", "*.egg-info"):
    assert needed in patterns, needed
  for kept in ("setup.py", "README.md", "vae_scale", "configs", "launch"):
    assert not any(pathlib.PurePath(kept).match(p) for p in patterns), kept
