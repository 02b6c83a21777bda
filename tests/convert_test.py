"""convert: the command line (`python -m vae_scale.convert import|export`)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from conftest import assert_trees_equal
from conftest import random_params
from conftest import small_autoencoder_config
from vae_scale.interop import safetensors_io
from vae_scale.interop import weights


@pytest.mark.slow  # Starts three `python -m vae_scale.convert` processes.
def test_command_line_import_and_export(tmp_path):
  params = random_params(small_autoencoder_config())
  safetensors_io.export_ldm(params, str(tmp_path / "vae.safetensors"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "vae_scale.convert"]
  res = subprocess.run(cmd + ["import", f"--src={tmp_path / 'vae.safetensors'}",
                              f"--out={tmp_path / 'params'}", "--norm_groups=4",
                              "--resolution=32"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "--config.init_from=" in res.stdout and "--config.model.ch=8" in res.stdout
  res = subprocess.run(cmd + ["export", f"--src={tmp_path / 'params'}",
                              f"--out={tmp_path / 'diffusers'}", "--scaling_factor=0.3"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  config_json = json.loads((tmp_path / "diffusers" / "config.json").read_text())
  assert config_json["scaling_factor"] == 0.3 and config_json["block_out_channels"] == [8, 16]
  assert_trees_equal(weights.load_params(str(tmp_path / "diffusers")), params)

  (tmp_path / "vae.ckpt").write_bytes(b"\x80\x04N.")
  res = subprocess.run(cmd + ["import", f"--src={tmp_path / 'vae.ckpt'}",
                              f"--out={tmp_path / 'x'}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 2 and "never unpickles" in res.stderr
