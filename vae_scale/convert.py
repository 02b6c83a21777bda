"""`python -m vae_scale.convert`: see `vae_scale.tools.convert` (flags: --help)."""

if __name__ == "__main__":
  from vae_scale.tools import convert  # pylint: disable=g-import-not-at-top
  convert.entry()
