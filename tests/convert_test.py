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
from vae_scale.run import weights


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


@pytest.mark.slow  # Starts four `python -m vae_scale.convert` processes.
def test_command_line_converts_lpips_and_inception(tmp_path):
  import feature_nets  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from vae_scale.models import frozen_weights  # pylint: disable=g-import-not-at-top
  from vae_scale.interop import torch_convert  # pylint: disable=g-import-not-at-top
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run([sys.executable, "-m", "vae_scale.convert", *args], cwd=REPO,
                                     env=env, capture_output=True, text=True, timeout=300)
  net = feature_nets.torch_lpips()
  vgg = {"features." + k.split(".", 1)[1]: v for k, v in net.net.state_dict().items()}
  torch.save(vgg, tmp_path / "vgg16.pth")
  out = tmp_path / "lpips_vgg.safetensors"
  res = run("lpips", f"--out={out}", f"--vgg={tmp_path / 'vgg16.pth'}",
            f"--lin={torch_convert.default_lin_path()}")
  assert res.returncode == 0, res.stderr[-2000:]
  assert f"--config.loss.lpips_weights={out}" in res.stdout
  lin = torch.load(torch_convert.default_lin_path(), map_location="cpu", weights_only=True)
  want = torch_convert.lpips_params_from_torch({k: v.numpy() for k, v in vgg.items()},
                                            {k: v.numpy() for k, v in lin.items()})
  got = frozen_weights.load_lpips_params(str(out))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])

  sd = feature_nets.inception_state_dict()
  src = tmp_path / frozen_weights.INCEPTION_FILE
  torch.save(sd, src)
  res = run("inception", f"--src={src}", f"--out={tmp_path / 'inception.safetensors'}")
  assert res.returncode == 0, res.stderr[-2000:]
  assert "--inception_weights=" in res.stdout
  got = frozen_weights.load_inception_params(str(tmp_path / "inception.safetensors"))
  np.testing.assert_array_equal(got["Mixed_7c.branch_pool.bn.var"],
                                sd["Mixed_7c.branch_pool.bn.running_var"].numpy())

  # Mistakes: one line, exit 2.
  res = run("inception", f"--out={tmp_path / 'x.safetensors'}")
  assert res.returncode == 2 and "--src=pt_inception-2015-12-05-6726825d.pth" in res.stderr
  res = run("lpips", f"--out={tmp_path / 'y.safetensors'}", f"--vgg={tmp_path / 'nope.pth'}")
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert res.returncode == 2 and len(errors) == 1 and "nope.pth does not exist" in errors[0]
  assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
