"""`python -m vae_scale.encode`: see `vae_scale.tools.encode` (flags: --help)."""

if __name__ == "__main__":
  from vae_scale.tools import encode  # pylint: disable=g-import-not-at-top
  encode.entry()
