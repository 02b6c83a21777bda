"""`python -m vae_scale.prepare --src=SRC --out=DATA_DIR --name=NAME`: see `vae_scale.tools.prepare`.

The tool is imported inside the main block only: the process pool's spawned workers re-import this
module, and should not pay for TensorFlow (which TFDS imports) in each of them.
"""

if __name__ == "__main__":
  from vae_scale.tools import prepare  # pylint: disable=g-import-not-at-top
  prepare.entry()
