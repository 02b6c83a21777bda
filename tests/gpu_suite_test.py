"""bench/gpu_suite.sh: the parts run in order inside the budget, each logged; no GPU needed."""

import os
import subprocess

from conftest import REPO

SUITE = REPO / "bench" / "gpu_suite.sh"


def _suite(tmp_path, *parts, budget="10000"):
  fake = tmp_path / "fake_python"  # Records each command instead of running it.
  fake.write_text("#!/usr/bin/env bash\necho \"$@\" >> \"$(dirname \"$0\")/calls.txt\"\n")
  fake.chmod(0o755)
  env = dict(os.environ, PYTHON=str(fake), SUITE_BUDGET_S=budget)
  out = tmp_path / "out"
  proc = subprocess.run(["bash", str(SUITE), str(out), *parts], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60, check=False)
  calls = (tmp_path / "calls.txt").read_text().splitlines() if (tmp_path / "calls.txt").exists() else []
  return proc, out, calls


def test_parts_run_the_step_and_the_peer_with_the_same_precision_and_batch(tmp_path):
  proc, out, calls = _suite(tmp_path, "bf16", "f32")
  assert proc.returncode == 0, proc.stderr
  assert len(calls) == 5  # bf16: step, peer, peer NCHW; f32: step, peer.
  step, peer = calls[0], calls[1]
  assert step.startswith("-m vae_scale.bench step --config=configs/ldm_f8.py")
  for flag in ("--config.model.dtype=bfloat16", "--batch_per_device=8", "--adversarial=both",
               f"--json_out={out}/bf16_b8.json"):
    assert flag in step
  assert peer.startswith("bench/torch_reference.py") and "--batch=8" in peer
  assert "--config.model.dtype=bfloat16" in peer and "--channels_last" in peer
  assert "--config.model.dtype=float32" in calls[3]
  suite = (out / "suite.txt").read_text()
  assert "bf16_b8 rc=0" in suite and "torch_f32_b8 rc=0" in suite


def test_the_norm_part_times_the_variance_forms_of_the_ldm_f8_step(tmp_path):
  proc, out, calls = _suite(tmp_path, "norm")
  assert proc.returncode == 0, proc.stderr
  assert len(calls) == 1 and calls[0].startswith("bench/norm_cost.py --config=configs/ldm_f8.py")
  for flag in ("--config.model.dtype=bfloat16", "--batch=8",
               f"--json_out={out}/norm_bf16_b8.json"):
    assert flag in calls[0]
  assert "norm_bf16_b8 rc=0" in (out / "suite.txt").read_text()


def test_what_does_not_fit_the_budget_is_skipped_and_listed(tmp_path):
  proc, out, calls = _suite(tmp_path, "bf16", budget="0")
  assert proc.returncode == 0 and calls == []
  assert "bf16_b8 skipped (needs 240s, 0s left)" in (out / "suite.txt").read_text()


def test_an_unknown_part_is_refused(tmp_path):
  proc, _, _ = _suite(tmp_path, "fp8")
  assert proc.returncode == 2 and "unknown part: fp8" in proc.stderr
