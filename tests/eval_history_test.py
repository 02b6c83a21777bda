"""eval_history: records across sessions, the later record of a step kept, a torn line ignored."""

from vae_scale import eval_history


def _result(psnr):
  return {"psnr": psnr, "psnr_std": 1.0, "ssim": 0.5, "l1": 0.1, "lpips": None,
          "kl_per_channel": [1.0]}


def test_history_keeps_the_later_record_of_a_step_and_skips_a_torn_line(tmp_path):
  eval_history.append(tmp_path, 0, _result(10.0), tmp_path / "images" / "r0.png")
  eval_history.append(tmp_path, 250, _result(18.0))
  # A resumed session re-evaluates step 250 (after its checkpoint at 0), then is killed mid-write.
  eval_history.append(tmp_path, 250, _result(18.5), "grid250.png")
  with open(tmp_path / eval_history.FILENAME, "a") as f:
    f.write('{"step": 500, "psn')
  records = eval_history.read(tmp_path)
  assert [(r["step"], r["psnr"]) for r in records] == [(0, 10.0), (250, 18.5)]
  assert records[0] == {"step": 0, "psnr": 10.0, "ssim": 0.5, "l1": 0.1,
                        "grid": str(tmp_path / "images" / "r0.png")}  # lpips None: not measured.
  # Appending after the torn line starts a fresh one.
  eval_history.append(tmp_path, 500, _result(20.25))
  text = eval_history.summary(eval_history.read(tmp_path))
  lines = text.splitlines()
  assert lines[1].split() == ["step", "psnr", "ssim", "l1"]
  assert lines[2].split() == ["0", "10.00", "0.5000", "0.1000"]
  assert lines[4].split()[:2] == ["500", "20.25"]
  assert lines[-1].endswith("grid250.png")


def test_empty_history_says_so(tmp_path):
  assert eval_history.read(tmp_path) == []
  assert eval_history.summary([]) == "No held-out evaluation was recorded."
