"""launch/sky.yaml and launch/sky_run.sh: the task's fields, its recovery rule over vae_scale's exit
codes, and its setup and run blocks executed here as SkyPilot runs them on a node (bash, its
environment variables), against stand-in python and uv. No SkyPilot, no cloud."""

import os
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO, load_config
from launch_helpers import executable, recorded, recorders

# Every test here starts processes (the node scripts, stand-in programs): marked slow as a module.
pytestmark = pytest.mark.slow

SKY_YAML = REPO / "launch" / "sky.yaml"
TASK = yaml.safe_load(SKY_YAML.read_text())


def _recovers(job_recovery, exit_codes):
  """SkyPilot's rule for a managed job whose run exited non-zero (StrategyExecutor.
  should_restart_on_failure in SkyPilot 0.14.1; a preempted cluster is recovered regardless):
  recover when any node's code is in recover_on_exit_codes, else while the count of such
  failures stays within max_restarts_on_errors (a first failure here)."""
  if any(code in job_recovery.get("recover_on_exit_codes", []) for code in exit_codes):
    return True
  return 1 <= job_recovery.get("max_restarts_on_errors", 0)


def test_task_is_n_gpu_nodes_on_spot():
  assert TASK["num_nodes"] == 4
  resources = TASK["resources"]
  assert resources["accelerators"] == "H100:8" and resources["use_spot"] is True
  assert TASK["workdir"] == "."
  # The run's directories have no default: `sky jobs launch` refuses the task until given.
  assert TASK["envs"]["WORKDIR"] is None and TASK["envs"]["DATA"] is None


def test_recovery_reruns_42_and_143_and_never_2_or_3():
  rule = TASK["resources"]["job_recovery"]
  assert rule == {"strategy": "FAILOVER", "max_restarts_on_errors": 0,
                  "recover_on_exit_codes": [42, 143]}
  # When one node fails SkyPilot force-cancels the others, which report 137.
  for codes, expected in (([42], True), ([143], True), ([42, 137, 137, 137], True),
                          ([2], False), ([3], False), ([3, 137, 137, 137], False),
                          ([2, 137], False), ([1], False), ([137], False)):
    assert _recovers(rule, codes) == expected, codes


def test_default_config_fits_the_nodes():
  variant = TASK["envs"]["CONFIG"].split(":", 1)[1]
  config = load_config("pods", variant)
  devices, processes = TASK["num_nodes"] * 8, TASK["num_nodes"]  # One process per node.
  assert config.global_batch_size % devices == 0 and config.global_batch_size % processes == 0


def test_setup_and_run_blocks_pass_shellcheck(tmp_path):
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.fail("shellcheck is not installed; install it (apt-get install -y shellcheck)")
  paths = []
  for block in ("setup", "run"):
    paths.append(tmp_path / f"{block}.sh")
    paths[-1].write_text(TASK[block])
  result = subprocess.run([shellcheck, "--shell=bash", *map(str, paths)], capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


# A node's stand-in ~/vae_venv/bin/python: records its argv, then exits FAKE_EXIT, or with
# FAKE_EXIT=die dies of SIGTERM (143 through bash).
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >>"${FAKE_RECORD}"
[[ "${FAKE_EXIT}" == die ]] && kill -TERM $$
exit "${FAKE_EXIT}"
"""


def _node(tmp_path, block, rank, exit_code="0", nodes=2, **envs):
  """Runs sky.yaml's `block` as SkyPilot does on node `rank`: bash, in the uploaded workdir (the
  repository here), with the task's envs and SkyPilot's variables."""
  home = tmp_path / "home"
  (home / "vae_venv" / "bin").mkdir(parents=True, exist_ok=True)
  executable(home / "vae_venv" / "bin" / "python", FAKE_PYTHON)
  task_envs = {k: v for k, v in TASK["envs"].items() if v is not None}
  task_envs.update(WORKDIR="gs://my-bucket/vae/run1", DATA="gs://my-bucket/images", **envs)
  env = dict(os.environ, HOME=str(home), FAKE_EXIT=exit_code, FAKE_RECORD=str(tmp_path / "record"),
             SKYPILOT_NODE_IPS="\n".join(f"10.0.0.{5 + i}" for i in range(nodes)),
             SKYPILOT_NUM_NODES=str(nodes), SKYPILOT_NODE_RANK=str(rank), **task_envs)
  result = subprocess.run(["bash", "-c", TASK[block]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
  record = tmp_path / "record"
  argv = record.read_text().splitlines() if record.exists() else []
  return result, argv


def test_run_gives_jax_distributed_skypilots_coordinates(tmp_path):
  result, argv = _node(tmp_path, "run", rank=1, EXTRA_ARGS="--config.seed=3 --cloud_goodput")
  assert result.returncode == 0, result.stderr
  assert argv == ["-m vae_scale.main --distributed=on --coordinator_address=10.0.0.5:8476 "
                  "--num_processes=2 --process_id=1 --config=configs/pods.py:gpu8x4 "
                  "--workdir=gs://my-bucket/vae/run1 --config.data.path=gs://my-bucket/images "
                  "--config.seed=3 --cloud_goodput"]


def test_one_node_runs_without_jax_distributed(tmp_path):
  result, argv = _node(tmp_path, "run", rank=0, nodes=1, CONFIG="configs/pods.py:gpu8")
  assert result.returncode == 0, result.stderr
  assert argv[0].startswith("-m vae_scale.main --distributed=off --config=configs/pods.py:gpu8 ")


@pytest.mark.parametrize("exit_code, expected, says", [
    ("0", 0, "finished"), ("42", 42, "SkyPilot recovers"), ("die", 143, "SkyPilot recovers"),
    ("2", 2, "bad config, data or weights): not recovered"),
    ("3", 3, "diverged: rollbacks used up or too many non-finite steps): not recovered"),
    ("1", 1, "a crash): not recovered"),
])
def test_run_exits_with_training_code_for_skypilot_to_judge(tmp_path, exit_code, expected, says):
  result, _ = _node(tmp_path, "run", rank=0, exit_code=exit_code)
  assert result.returncode == expected, result.stderr
  assert says in result.stdout + result.stderr


@pytest.mark.parametrize("envs, message", [
    ({"SKYPILOT_NODE_RANK": "2"}, "SKYPILOT_NODE_RANK must be 0..1, got '2'"),
    ({"SKYPILOT_NUM_NODES": "zero"}, "SKYPILOT_NUM_NODES must be a whole number"),
    ({"SKYPILOT_NODE_IPS": ""}, "SKYPILOT_NODE_IPS is not set"),
    ({"VAE_COORDINATOR_PORT": "http"}, "VAE_COORDINATOR_PORT must be a port number"),
])
def test_sky_run_rejects_a_broken_environment(tmp_path, envs, message):
  env = dict(os.environ, SKYPILOT_NODE_IPS="10.0.0.5\n10.0.0.6", SKYPILOT_NUM_NODES="2",
             SKYPILOT_NODE_RANK="0", VAE_PYTHON=str(tmp_path / "never-run"))
  env.update(envs)
  result = subprocess.run(["bash", str(REPO / "launch" / "sky_run.sh"), "--workdir=gs://b/r"],
                          env=env, capture_output=True, text=True, timeout=30, check=False)
  assert result.returncode == 2 and message in result.stderr.splitlines()[0]


# A stand-in uv for the setup block: records its calls; `uv venv PATH` makes PATH/bin/python, a
# python that answers the version check tpu_worker.sh makes after installing.
FAKE_UV = """#!/usr/bin/env bash
echo "uv $*" >>"${FAKE_RECORD}"
if [[ "$1" == venv ]]; then
  venv="${@: -1}"
  mkdir -p "${venv}/bin"
  printf '#!/usr/bin/env bash\\necho 0.10.2\\n' >"${venv}/bin/python"
  chmod +x "${venv}/bin/python"
fi
"""


def test_setup_installs_vae_scale_with_cuda_jax_in_a_venv(tmp_path):
  home = tmp_path / "home"
  (home / ".local" / "bin").mkdir(parents=True)
  executable(home / ".local" / "bin" / "uv", FAKE_UV)
  env = dict(os.environ, HOME=str(home), FAKE_RECORD=str(tmp_path / "record"))
  result = subprocess.run(["bash", "-c", TASK["setup"]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  venv = home / "vae_venv"
  assert (tmp_path / "record").read_text().splitlines() == [
      f"uv venv --quiet --python 3.12 {venv}",
      f"uv pip install --quiet --python {venv}/bin/python -e .[cuda]"]
  assert "vae_scale installed on" in result.stdout


def test_the_documented_commands_are_skypilots(tmp_path):
  # The header's commands, run against a recording `sky`: what a user types, exactly.
  bin_dir = recorders(tmp_path / "bin", "sky")
  commands = [line.strip("# ").strip() for line in SKY_YAML.read_text().splitlines()
              if line.startswith("#   sky ") or line.startswith("#       --env")]
  launch = " ".join(commands[:2]).replace(" \\", "")
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  for command in [launch, *commands[2].split("; ")]:
    subprocess.run(["bash", "-c", command], cwd=REPO, env=env, check=True, timeout=30)
  assert recorded(bin_dir) == [
      ["sky", "jobs", "launch", "-n", "vae-run1", "launch/sky.yaml",
       "--env", "WORKDIR=gs://BUCKET/vae/run1", "--env", "DATA=gs://BUCKET/images"],
      ["sky", "jobs", "queue"], ["sky", "jobs", "logs", "-n", "vae-run1"],
      ["sky", "jobs", "cancel", "-n", "vae-run1"]]
