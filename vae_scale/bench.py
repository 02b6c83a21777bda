"""`python -m vae_scale.bench`: see `vae_scale.tools.bench` (flags: --help)."""

if __name__ == "__main__":
  from vae_scale.tools import bench  # pylint: disable=g-import-not-at-top
  bench.entry()
