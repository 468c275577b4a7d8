"""Converts the standard PyTorch weights of the learned metrics into the .npz files diamond_jax reads.

    python -m diamond_jax.world_model.metric_weights --lpips_alexnet=alexnet-owt-7be5be79.pth \
        --lpips_lin=alex.pth --out=lpips_alex.npz
    python -m diamond_jax.world_model.metric_weights --i3d=rgb_imagenet.pt --out=i3d.npz

LPIPS (v0.1, AlexNet "lin") takes torchvision's ImageNet AlexNet weights (alexnet-owt-7be5be79.pth) and the lpips
package's learned layer weights (lpips/weights/v0.1/alex.pth); FVD's I3D takes pytorch-i3d's Kinetics-400 RGB
model (models/rgb_imagenet.pt). Get the files yourself: nothing is downloaded. The files are read with
torch.load(weights_only=True), so no code in them is run. The .npz layout is described in
diamond_jax/world_model/metrics.py.

Needs PyTorch: pip install torch (or pip install -e ".[convert]"). Exits with status 2 and one `error:` line for
bad input (a missing file, missing or unexpected keys).
"""

import sys
from typing import Sequence

from absl import app, flags

from diamond_jax.exit_codes import EXIT_BAD_INPUT
from diamond_jax.world_model.metrics import MetricWeightsError, convert_i3d_weights, convert_lpips_weights

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined when run as a program only, so that importing this module adds no global flags.
    flags.DEFINE_string("lpips_alexnet", None, "torchvision's AlexNet weights (alexnet-owt-7be5be79.pth), for LPIPS.")
    flags.DEFINE_string("lpips_lin", None, "the lpips package's v0.1 AlexNet lin weights "
                        "(lpips/weights/v0.1/alex.pth).")
    flags.DEFINE_string("i3d", None, "pytorch-i3d's Kinetics-400 RGB model (models/rgb_imagenet.pt), for FVD.")
    flags.DEFINE_string("out", None, "the .npz to write (its folder is created).")


def run() -> str:
    """Converts what the flags name; returns what was written. Raises MetricWeightsError for bad input."""
    lpips = FLAGS.lpips_alexnet or FLAGS.lpips_lin
    if lpips and FLAGS.i3d:
        raise MetricWeightsError("convert LPIPS (--lpips_alexnet, --lpips_lin) or I3D (--i3d), one per call, each "
                                 "into its own --out.")
    if not lpips and not FLAGS.i3d:
        raise MetricWeightsError("nothing to convert. Fix: pass --lpips_alexnet=... --lpips_lin=... or --i3d=..., "
                                 "and --out=...")
    if lpips and not (FLAGS.lpips_alexnet and FLAGS.lpips_lin):
        missing = "--lpips_lin" if FLAGS.lpips_alexnet else "--lpips_alexnet"
        raise MetricWeightsError(f"LPIPS needs both --lpips_alexnet and --lpips_lin. Fix: pass {missing}.")
    if not FLAGS.out:
        raise MetricWeightsError("no --out given. Fix: pass --out=<file>.npz.")
    if lpips:
        path = convert_lpips_weights(FLAGS.lpips_alexnet, FLAGS.lpips_lin, FLAGS.out)
        return f"LPIPS weights written to {path}; use them with --lpips_weights={path}."
    path = convert_i3d_weights(FLAGS.i3d, FLAGS.out)
    return f"I3D weights written to {path}; use them with --i3d_weights={path}."


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}; every input is a flag (--help).", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        print(run())
    except MetricWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
