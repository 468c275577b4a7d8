from setuptools import find_packages, setup

EXTRAS = {
    # JAX's own accelerator builds (the default jaxlib is CPU-only); pick the one of your machine.
    "cuda12": ["jax[cuda12]>=0.10"],
    "cuda13": ["jax[cuda13]>=0.10"],
    "tpu": ["jax[tpu]>=0.10"],
    "rocm": ["jax[rocm7-local]>=0.10"],  # JAX ships no ROCm libraries: ROCm 7 must be installed on the machine
    # Reading official PyTorch checkpoints (python -m diamond_jax.convert) and diffusers autoencoders (python -m
    # diamond_jax.convert_vae: safetensors reads .safetensors without torch). On a machine without a GPU, install
    # PyTorch's CPU build first (README), or pip brings the CUDA one, several GB.
    "convert": ["torch>=2.1", "safetensors>=0.4"],
    # Playing inside a world model and writing videos (python -m diamond_jax.play / dream).
    "play": ["pygame>=2.5", "imageio>=2.30", "imageio-ffmpeg>=0.4.9", "matplotlib>=3.7"],
    # Cluster sweeps (launch/) and the results report (python -m diamond_jax.report).
    # rliable pins arch<8, and every arch<8 fails to import under pandas>=3.
    "sweep": ["submitit>=1.5", "rliable>=1.2", "pandas<3", "matplotlib>=3.7"],
    # JAX-native environments: bsuite's Catch and MinAtar (configs/minatar.py). gymnax imports six without
    # declaring it.
    "gymnax": ["gymnax>=1.0", "six"],
}
# diffusers: the reference AutoencoderKL that tests/test_autoencoder.py converts and compares against.
EXTRAS["test"] = sorted({"pytest>=8", "pytest-xdist>=3.5", "torch>=2.1,<2.14", "diffusers>=0.31", "safetensors>=0.4",
                         *EXTRAS["play"], *EXTRAS["sweep"], *EXTRAS["gymnax"]})

setup(
    name="diamond_jax",
    version="0.1.0",
    description="DIAMOND (diffusion world models for RL, Alonso et al., NeurIPS 2024) in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    # configs/ stays at the root (--config=configs/atari100k.py) and is installed as diamond_jax.configs, every
    # module in it, so that an installed package finds its default config (diamond_jax.config_files).
    packages=find_packages(include=["diamond_jax", "diamond_jax.*"]) + ["diamond_jax.configs"],
    package_dir={"diamond_jax.configs": "configs"},
    # Random/human scores and DIAMOND's published returns, read by diamond_jax.scores.
    package_data={"diamond_jax": ["reference_data/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "numpy>=1.26",
        "envpool>=1.2.5",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "imageio>=2.30",
    ],
    extras_require=EXTRAS,
)
