"""valley_jax: Valley (Luo et al., 2023), the video assistant, in JAX/Flax NNX."""

from setuptools import find_packages, setup

# One pinned stack that is known to work together (resolved and tested on Python 3.11).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "decord==0.6.0",
    "av==18.1.0",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "sentencepiece==0.2.3",
    "safetensors==0.8.0",
    "numpy>=2.0,<3",
    "pillow==13.0.0",
    # cv2's bilinear resize is the reference's video resize (valley/data/video_transform.py).
    "opencv-python-headless==4.13.0.92",
    "tensorboardX==2.6.5",
    "tqdm",
    "absl-py",
]

EXTRAS = {
    # torch is the numerical reference in the tests; 2.13.0 is the CPU build this project pins.
    "test": ["pytest==9.0.3", "torch==2.13.0",
             # the evaluation notebook runs top to bottom in the tests
             "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0", "matplotlib==3.11.2",
             # the interactive chat is tested in a pseudo-terminal
             "pexpect==4.8.0"],
    # libtpu: runs on TPU VMs, and compiles for any TPU topology on a CPU host (valley_jax.aot;
    # its tests need it, so CI installs it).
    "tpu": ["jax[tpu]==0.10.2"],
    "cuda": ["jax[cuda12]==0.10.2"],
}

setup(
    name="valley_jax",
    version="0.1.0",
    description="Valley video assistant (frozen CLIP ViT + temporal module + LLaMA) in JAX/Flax NNX",
    packages=find_packages(include=["valley_jax", "valley_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
