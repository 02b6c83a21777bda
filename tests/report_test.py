"""The evaluation report: the progress and table lines, scalars, grids, PNGs, and the run's history
(records across sessions, the later record of a step kept, a torn line ignored)."""

import logging

import numpy as np
from PIL import Image

from vae_scale.eval import report


def _result(psnr):
  return {"psnr": psnr, "psnr_std": 1.0, "ssim": 0.5, "ssim_std": 0.1, "l1": 0.1, "lpips": None,
          "kl_per_channel": [1.0], "latent_mean_per_channel": [0.1],
          "latent_std_per_channel": [0.5], "latent_std": 0.5, "rfid": None,
          "num_images": 8}


def test_progress_logs_eta_and_the_table_line(caplog):
  progress = report.Progress(total_batches=4, every=2)
  with caplog.at_level(logging.INFO):
    for i in range(1, 5):
      progress.update(i, 8.0)
  lines = [r.getMessage() for r in caplog.records if "batches" in r.getMessage()]
  assert len(lines) == 2 and lines[0].startswith("Evaluation: 2/4 batches, 16 images, ")
  assert "images/s, ETA 0:00:0" in lines[0] and "4/4 batches, 32 images" in lines[1]
  result = {"rfid": 4.7, "psnr": 24.5, "psnr_std": 4.19, "ssim": 0.71, "ssim_std": 0.15,
            "lpips": None, "num_images": 5000}
  assert report.table_line(result) == ("rFID 4.700 | PSNR 24.50 ± 4.19 | SSIM 0.710 ± 0.150 | "
                                     "LPIPS - | 5000 images")


class _Writer:
  """Records what a clu MetricWriter is asked to write."""

  def __init__(self):
    self.scalars, self.images = {}, {}

  def write_scalars(self, step, values):
    self.scalars[step] = values

  def write_images(self, step, images):
    self.images[step] = images


def test_publish_writes_scalars_grids_pngs_and_one_line(tmp_path, caplog):
  writer = _Writer()
  grid = np.zeros((8, 16, 3), np.uint8)
  grid[:, 8:] = 255
  with caplog.at_level(logging.INFO):
    files = report.publish(writer, 12, _result(20.0), {"reconstructions": grid}, prefix="eval",
                           png_dir=tmp_path / "images", is_chief=True)
  assert files == {"reconstructions": str(tmp_path / "images" / "reconstructions_00000012.png")}
  np.testing.assert_array_equal(np.asarray(Image.open(files["reconstructions"])), grid)
  assert writer.scalars[12]["eval/psnr"] == 20.0
  assert writer.scalars[12]["eval/kl_channel_0"] == 1.0
  assert writer.scalars[12]["eval/latent_std_channel_0"] == 0.5
  assert writer.scalars[12]["eval/latent_mean_channel_0"] == 0.1
  assert writer.images[12]["eval/reconstructions"].shape == (1, 8, 16, 3)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Eval at step 12")]
  assert len(lines) == 1 and "PSNR 20.00" in lines[0]
  # Other processes write no PNG.
  files = report.publish(writer, 13, _result(20.0), {"reconstructions": grid}, prefix="eval",
                         png_dir=tmp_path / "other", is_chief=False)
  assert not (tmp_path / "other").exists()


def test_tile_lays_out_rows_and_columns():
  rows = np.full((2, 3, 4, 5, 3), -1.0, np.float32)
  rows[1, 2] = 1.0
  grid = report.tile(rows)
  assert grid.shape == (8, 15, 3) and grid.dtype == np.uint8
  assert grid[0, 0, 0] == 0 and grid[7, 14, 0] == 255 and grid[3, 14, 0] == 0


def test_history_keeps_the_later_record_of_a_step_and_skips_a_torn_line(tmp_path):
  report.append_history(tmp_path, 0, _result(10.0), tmp_path / "images" / "r0.png")
  report.append_history(tmp_path, 250, _result(18.0))
  # A resumed session re-evaluates step 250 (after its checkpoint at 0), then is killed mid-write.
  report.append_history(tmp_path, 250, _result(18.5), "grid250.png")
  with open(tmp_path / report.HISTORY, "a") as f:
    f.write('{"step": 500, "psn')
  records = report.read_history(tmp_path)
  assert [(r["step"], r["psnr"]) for r in records] == [(0, 10.0), (250, 18.5)]
  assert records[0] == {"step": 0, "psnr": 10.0, "ssim": 0.5, "l1": 0.1,
                        "grid": str(tmp_path / "images" / "r0.png")}  # lpips None: not measured.
  # Appending after the torn line starts a fresh one.
  report.append_history(tmp_path, 500, _result(20.25))
  text = report.history_summary(report.read_history(tmp_path))
  lines = text.splitlines()
  assert lines[1].split() == ["step", "psnr", "ssim", "l1"]
  assert lines[2].split() == ["0", "10.00", "0.5000", "0.1000"]
  assert lines[4].split()[:2] == ["500", "20.25"]
  assert lines[-1].endswith("grid250.png")


def test_empty_history_says_so(tmp_path):
  assert report.read_history(tmp_path) == []
  assert report.history_summary([]) == "No held-out evaluation was recorded."
