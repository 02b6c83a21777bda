"""bench data: the loader benchmark runs every setting and reports comparable figures."""

import json

from vae_scale import bench


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
