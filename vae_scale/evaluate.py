"""`python -m vae_scale.evaluate`: see `vae_scale.tools.evaluate` (flags: --help)."""

if __name__ == "__main__":
  from vae_scale.tools import evaluate  # pylint: disable=g-import-not-at-top
  evaluate.entry()
