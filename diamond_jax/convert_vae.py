r"""Converts a local diffusers-format `AutoencoderKL` (Stable Diffusion's autoencoder and its kin) into the folder
the latent world model reads (diamond_jax/training/autoencoder_export.py). Nothing is downloaded.

    python -m diamond_jax.convert_vae --diffusers=path/to/vae --out=runs/sd-vae
    python -m diamond_jax.world_model --config=configs/world_model.py --config.denoiser.space=latent \
        --config.autoencoder.path=runs/sd-vae --dataset=D --workdir=W

--diffusers is the folder `AutoencoderKL.save_pretrained` writes (the `vae` folder of a Stable Diffusion
pipeline): its config.json and its weights, diffusion_pytorch_model.safetensors (read with safetensors, no
PyTorch needed) or diffusion_pytorch_model.bin (read with torch.load(weights_only=True): no code in the file is
run). Every tensor is mapped by name (diffusers' `encoder.down_blocks.0.resnets.1.norm1.weight` is our
`encoder/down_blocks_0/resnets_1/norm1/scale`; the attention's old names query/key/value/proj_attn are accepted);
every missing, unexpected or misshapen tensor is reported by name. Exits with status 2 and one `error:` line for
bad input.
"""

import json
import os
import re
import sys
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from diamond_jax.exit_codes import EXIT_BAD_INPUT

StateDict = Dict[str, np.ndarray]
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Our module names that are PyTorch ModuleList entries: `resnets_1` is `resnets.1`.
_LISTS = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# The attention's names in checkpoints saved before diffusers 0.14, as diffusers itself renames them on load.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_SUPPORTED = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names every offending entry and the fix."""


def autoencoder_from_config(cfg: Mapping[str, Any], source: str):
    """Our Autoencoder of a diffusers AutoencoderKL config.json; refuses what our architecture does not have."""
    from diamond_jax.models.autoencoder import Autoencoder

    problems = []
    for field, kind in _SUPPORTED.items():
        kinds = set(cfg.get(field, [kind]))
        if kinds != {kind}:
            problems.append(f"{field} {sorted(kinds)} (only {kind} is supported)")
    for field, value in (("in_channels", 3), ("out_channels", 3), ("act_fn", "silu")):
        if cfg.get(field, value) != value:
            problems.append(f"{field}={cfg[field]!r} (only {value!r})")
    for field in ("latents_mean", "latents_std"):
        if cfg.get(field) is not None:
            problems.append(f"{field} is set (per-channel latent statistics are not supported; use scaling_factor "
                            "and shift_factor)")
    channels = tuple(cfg.get("block_out_channels", (64,)))
    if len(cfg.get("down_block_types", channels)) != len(channels):
        problems.append("down_block_types and block_out_channels differ in length")
    if problems:
        raise ConvertError(f"{source}: " + "; ".join(problems) + ". Fix: convert a Stable Diffusion style "
                           "AutoencoderKL.")
    return Autoencoder(
        block_out_channels=channels, layers_per_block=int(cfg.get("layers_per_block", 1)),
        latent_channels=int(cfg.get("latent_channels", 4)), norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        shift_factor=float(cfg.get("shift_factor") or 0.0),
        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)))


def read_state_dict(path: str) -> StateDict:
    """float32 numpy arrays of a .safetensors or a PyTorch .bin state dict."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ConvertError("reading .safetensors needs the safetensors package. Fix: pip install safetensors "
                               "(or pip install -e \".[convert]\").") from e
        try:
            return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
        except Exception as e:
            raise ConvertError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}). Fix: save "
                               "it again with AutoencoderKL.save_pretrained.") from e
    from diamond_jax.world_model.metrics import read_torch_state_dict

    return read_torch_state_dict(path, "save it again with AutoencoderKL.save_pretrained")


def read_diffusers(directory: str) -> Tuple[Dict[str, Any], StateDict, str]:
    """(config.json, state dict, the weight file read) of a diffusers AutoencoderKL folder."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ConvertError(f"{config_path} does not exist. Fix: pass the folder that AutoencoderKL.save_pretrained "
                           "wrote (a Stable Diffusion pipeline's vae/ folder).")
    with open(config_path) as f:
        cfg = json.load(f)
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConvertError(f"{config_path} describes a {cfg['_class_name']}, not an AutoencoderKL. Fix: pass an "
                           "AutoencoderKL's folder.")
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return cfg, read_state_dict(path), path
    raise ConvertError(f"{directory} holds none of {', '.join(WEIGHT_FILES)}. Fix: save the weights there "
                       "(AutoencoderKL.save_pretrained writes the first).")


def torch_key(ours: str) -> str:
    """Our flat parameter name -> diffusers' state-dict key."""
    *modules, leaf = ours.split("/")
    modules = [_LISTS.sub(r"\1.\2", m) for m in modules]
    return ".".join(modules + [_LEAVES[leaf]])


def renamed(state_dict: StateDict) -> StateDict:
    """The old attention names replaced by today's."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in _OLD_ATTENTION:
            key = ".".join(parts[:-2] + [_OLD_ATTENTION[parts[-2]], parts[-1]])
        out[key] = value
    return out


def to_ours(value: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """A PyTorch tensor in our layout: conv weights OIHW -> HWIO, linear weights [O, I] (or old 1x1 conv weights
    [O, I, 1, 1]) -> [I, O]."""
    if len(shape) == 4:
        return value.transpose(2, 3, 1, 0)
    if len(shape) == 2:
        return value.reshape(value.shape[:2]).T
    return value


def their_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


def convert(cfg: Mapping[str, Any], state_dict: StateDict, source: str):
    """(Autoencoder, flat params {our name: array}) of a diffusers AutoencoderKL; ConvertError naming every
    tensor that is missing, left over, or of the wrong shape."""
    import jax
    from flax import traverse_util

    autoencoder = autoencoder_from_config(cfg, source)
    size = (8 * autoencoder.downsampling,) * 2
    expected = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(
        jax.eval_shape(lambda: autoencoder.init(jax.random.key(0), size))["params"]).items()}
    theirs = renamed(state_dict)
    params, problems, used = {}, [], set()
    for ours, shape in expected.items():
        key = torch_key(ours)
        if key not in theirs:
            problems.append(f"missing {key} (for {ours}, shape {their_shape(shape)})")
            continue
        used.add(key)
        value = theirs[key]
        if (int(np.prod(value.shape)) != int(np.prod(shape))
                or tuple(value.shape[:len(shape)]) != their_shape(shape)[:len(value.shape)]):
            problems.append(f"{key}: shape {tuple(value.shape)}, expected {their_shape(shape)} for {ours}")
            continue
        params[ours] = np.asarray(to_ours(value, shape), np.float32).reshape(shape)
    problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in theirs.items() if k not in used]
    if problems:
        raise ConvertError(f"{source} does not fit the autoencoder of its config.json: " + "; ".join(problems)
                           + ". Fix: check that config.json and the weights belong together.")
    return autoencoder, params


def convert_folder(directory: str, out: str) -> str:
    """Converts --diffusers into --out (training/autoencoder_export.py's folder); returns a one-line summary."""
    from flax import traverse_util

    from diamond_jax.training.autoencoder_export import save_export

    cfg, state_dict, path = read_diffusers(directory)
    autoencoder, flat = convert(cfg, state_dict, path)
    save_export(out, autoencoder, traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()}))
    return (f"{len(flat)} tensors of {path} written to {out} (downsampling {autoencoder.downsampling}x, "
            f"{autoencoder.latent_channels} latent channels, scaling_factor {autoencoder.scaling_factor}); use it "
            f"with --config.denoiser.space=latent --config.autoencoder.path={out}.")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("diffusers", None, "A diffusers AutoencoderKL folder: config.json and "
                        "diffusion_pytorch_model.safetensors (or .bin).")
    flags.DEFINE_string("out", None, "The folder to write (autoencoder.json, params.npz).")


def main(argv: Sequence[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}; every input is a flag (--help).", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    missing: List[str] = [f"--{n}" for n in ("diffusers", "out") if not flags.FLAGS[n].value]
    if missing:
        print(f"error: {' and '.join(missing)} missing. Fix: pass --diffusers=<folder> --out=<folder>.",
              file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        print(convert_folder(flags.FLAGS.diffusers, flags.FLAGS.out))
    except ValueError as e:  # ConvertError, MetricWeightsError (reading a .bin)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
