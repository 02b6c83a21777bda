"""Command-line tools beside training: evaluate, encode, convert, prepare, bench, local_launch.
Each has a thin `python -m vae_scale.<tool>` entry module at the package root."""
