"""cli: the one bootstrap of the command lines; the tools take a run's --workdir without --config."""

import json
import subprocess
import sys

import pytest

from conftest import cpu_env
from conftest import REPO
from conftest import tiny_config
from vae_scale import cli
from vae_scale import errors
from vae_scale.run import loop


def _tool(module, *args):
  env = cpu_env()
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=env, timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  loop.train_and_evaluate(tiny_config(num_train_steps=2, ema_decay=0.9), workdir)
  return workdir


@pytest.mark.slow
def test_evaluate_encode_and_export_take_the_workdir_alone(run_dir, tmp_path):
  res = _tool("vae_scale.evaluate", f"--workdir={run_dir}", f"--output_dir={tmp_path}/eval")
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.loads(res.stdout.strip().splitlines()[-1])
  assert result["step"] == 2 and result["weights"] == "ema" and result["num_images"] == 8

  res = _tool("vae_scale.encode", f"--workdir={run_dir}", f"--output_dir={tmp_path}/latents")
  assert res.returncode == 0, res.stderr[-3000:]
  assert json.loads(res.stdout.strip().splitlines()[-1])["latent_shape"] == [8, 8, 4]

  res = _tool("vae_scale.convert", "export", f"--workdir={run_dir}", f"--out={tmp_path}/vae")
  assert res.returncode == 0, res.stderr[-3000:]
  assert json.loads((tmp_path / "vae" / "config.json").read_text())["block_out_channels"] == [4, 8]


@pytest.mark.slow
def test_without_config_or_a_stored_one_is_one_line(tmp_path):
  res = _tool("vae_scale.evaluate", f"--workdir={tmp_path}", f"--output_dir={tmp_path}/eval")
  assert res.returncode == 2
  lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "--config" in lines[0], res.stderr[-2000:]
  assert "Traceback" not in res.stderr


def test_every_error_carries_its_exit_code(capsys):
  assert cli.report(errors.ConfigError("config.x: bad")) == 2
  assert cli.report(errors.DataError("no images")) == 2
  assert cli.report(errors.ConversionError("not safetensors")) == 2
  assert cli.report(errors.NonFiniteError("NaN")) == 3
  assert cli.report(errors.Preempted(7)) == 42
  err = capsys.readouterr().err.splitlines()
  assert err[:4] == ["error: config.x: bad", "error: no images", "error: not safetensors",
                     "error: NaN"]
  assert err[4] == "preempted: checkpoint saved at step 7; rerun the same command to resume"
