"""Weights in and out of vae_scale: diffusers / LDM names and configs, safetensors files, params dirs.

`vae_scale.convert` is the command line over this package; training imports only `weights`.
"""
