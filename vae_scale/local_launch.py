"""`python -m vae_scale.local_launch`: see `vae_scale.tools.local_launch` (flags: --help)."""

if __name__ == "__main__":
  from vae_scale.tools import local_launch  # pylint: disable=g-import-not-at-top
  local_launch.entry()
