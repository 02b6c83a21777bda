# The image a GKE TPU workload runs (launch/xpk.sh build): vae_scale installed with its pinned
# dependencies, jax[tpu] and the `gcp` extra (Cloud TPU diagnostics, goodput to Cloud Monitoring).
#
#   docker build -t IMAGE:TAG .        # launch/xpk.sh build does this, tagged with the git commit
#   docker run --rm IMAGE:TAG          # prints vae_scale.main's usage (absl exits 1 after --help)
#
# Base: Google's JAX AI image for TPU (the "JAX stable stack": Debian, Python, a venv on PATH, and
# the TPU runtime set up for GKE), pinned by its version tag so a rebuild gets the same base.
# jax0.9.0-rev1 is the newest tag of it confirmed to exist when this was written; `pip install`
# below replaces its jax/jaxlib/libtpu with setup.py's pins (jax 0.10.2), so moving the base tag
# changes the OS and Python, never the JAX the run uses. Override with --build-arg BASE_IMAGE=...
# (pin a digest, `IMAGE@sha256:...`, for bit-for-bit rebuilds).
ARG BASE_IMAGE=us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu:jax0.9.0-rev1
FROM ${BASE_IMAGE}

# Logs reach `kubectl logs` and Cloud Logging as they are written, not when a buffer fills.
ENV PYTHONUNBUFFERED=1

WORKDIR /app

# Dependencies first, from setup.py alone (with an empty package and README), so that a code change
# rebuilds only the last layers: the dependency layer is reused while setup.py is unchanged.
COPY setup.py ./
RUN mkdir vae_scale && touch vae_scale/__init__.py README.md \
    && python3 -m pip install --no-cache-dir '.[tpu,gcp]' \
    && python3 -m pip uninstall --yes vae_scale \
    && rm -rf vae_scale build ./*.egg-info README.md

# The code, configs and launch scripts (.dockerignore keeps out caches, venvs and workdirs).
COPY . .
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -c "import vae_scale.main, vae_scale.run.cloud"

# launch/xpk.sh runs `python3 -m vae_scale.main --config=... --workdir=gs://...` here (from /app,
# so configs/ resolves); XPK replaces this command with its own wrapper, which keeps the exit code
# (42 and 143: rerun; 2 and 3: not rerun).
CMD ["python3", "-m", "vae_scale.main", "--help"]
