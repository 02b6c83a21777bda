"""bench data: the loader benchmark runs every setting and reports comparable figures."""

import json

from vae_scale.tools import bench


def test_loader_benchmark_reports_every_setting(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert bench.main(["data", "--dir", str(tmp_path / "jpegs"), "--num_images", "8",
                     "--photo_size", "80x60", "--image_size", "32", "--batch_size", "4",
                     "--workers", "0", "--seconds", "0.3", "--warmup_seconds", "0.1",
                     "--rounds", "1", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert [r["loader"].split(" ")[0] for r in result["rows"]] == ["bare", "vae_scale", "Grain"]
  assert all(r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0 for r in result["rows"])
  assert result["rows"][0]["per_core_vs_bare"] == 1.0 and result["rows"][2]["skipped"] == 0
  assert "| Grain pipeline, 0 workers" in capsys.readouterr().out


def test_pipeline_warm_up_waits_for_every_worker(monkeypatch):
  """Worker i makes batches i, i+W, ...: timing starts only after each worker delivered some, so
  start-up is not timed (it was: 8 workers on 2 cores read 221 images/s instead of ~570)."""
  import numpy as np
  from vae_scale.data import pipeline
  from vae_scale.data import skipping
  served = []

  def fake_dataset(config, process_index, process_count):
    del config, process_index, process_count
    while True:
      served.append(1)
      yield {"image": np.zeros((4, 2, 2, 3), np.float32), skipping.SKIPPED_KEY: np.zeros(4, np.int32)}

  monkeypatch.setattr(pipeline, "create_train_dataset", fake_dataset)
  config = bench._pipeline_config("/nonexistent", 32, 4, workers=6)
  result = bench._time_pipeline(config, seconds=0.01, warmup_seconds=0.0)
  assert len(served) - result["images"] // 4 >= 2 * 6 + 2  # Warm-up batches, before the timed ones.
