"""How close a world model's frames and videos are to real ones: PSNR, SSIM, LPIPS and FVD.

Frames are uint8 [..., H, W, 3] and videos uint8 [n, T, H, W, 3], as the replay stores them.

- `psnr`: per frame, peak 255. Identical frames have an infinite PSNR, returned as such (`psnr_summary` averages
  over the frames that differ and counts the identical ones apart, like diagnose.py's table).
- `ssim`: Wang et al. 2004 per frame, skimage's convention (below).
- `LPIPS`: Zhang et al. 2018, v0.1, AlexNet features with the learned "lin" weights.
- `fvd`: Unterthiner et al. 2018, the Frechet distance between Gaussians fitted to video features; `I3D` gives
  the usual features, any `FeatureExtractor` can replace it.

LPIPS and I3D read their weights from our own .npz files, written from the standard PyTorch files by
`python -m diamond_jax.world_model.metric_weights` (which needs torch); nothing is ever downloaded. The .npz
layout: one float32 array per parameter, named by its Flax path without the collection, joined by "/"
(`net/features_0/kernel`, `Mixed_3b/b1b/bn/mean`); convolution kernels in Flax's layout (HWIO, DHWIO), the
LPIPS "lin" weights as vectors [C] (`lin0_weight` ... `lin4_weight`); `LPIPS.expected_shapes()` and
`I3D.expected_shapes()` list every name and shape.
"""

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

PEAK = 255.0  # uint8 frames

# ---------------------------------------------------------------------------------------------------------------
# PSNR


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """PSNR in dB of uint8 frames [..., H, W, 3] with peak 255, per frame [...]. Identical frames give +inf, not a
    cap: any finite cap would be an arbitrary number averaged in with the measured ones. Average with
    `psnr_summary`."""
    _check_frames(x, y)
    mse = np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2, axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(PEAK ** 2 / mse)


class PsnrSummary(NamedTuple):
    mean_db: Optional[float]  # over the frames that differ; None when all are identical
    fraction_identical: float  # of the frames, whose PSNR is infinite


def psnr_summary(values: np.ndarray) -> PsnrSummary:
    """The mean of per-frame PSNRs (from `psnr`) over the frames that differ, and the fraction of identical ones."""
    values = np.asarray(values, np.float64).ravel()
    if not len(values):
        raise ValueError("psnr_summary of no frames. Fix: pass the PSNRs of at least one frame.")
    finite = values[np.isfinite(values)]
    return PsnrSummary(float(finite.mean()) if len(finite) else None, float(np.isinf(values).mean()))


# ---------------------------------------------------------------------------------------------------------------
# SSIM (Wang, Bovik, Sheikh and Simoncelli 2004)

SSIM_WINDOW = 11  # taps of the Gaussian window
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def ssim_window() -> np.ndarray:
    """The normalised 1-d Gaussian window [SSIM_WINDOW]; the 2-d window is its outer product with itself."""
    r = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    g = np.exp(-(r ** 2) / (2 * SSIM_SIGMA ** 2))
    return g / g.sum()


def ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean SSIM of uint8 frames [..., H, W, 3] per frame [...], H and W at least SSIM_WINDOW.

    The convention of skimage.metrics.structural_similarity(x, y, channel_axis=-1, data_range=255,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False): local statistics under an 11-tap Gaussian
    window (sigma 1.5), population (not sample) variances, C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 255, the SSIM
    map averaged over the positions where the window lies inside the frame ("valid", no padding), per channel, then
    over the channels. Computed in float64: float32's E[x^2] - E[x]^2 of values up to 255^2 would carry rounding
errors of about 0.01, against a C1 of 6.5.
    """
    _check_frames(x, y)
    *batch, h, w, _ = np.shape(x)
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (its window); got {h}x{w}.")
    g, r = ssim_window(), SSIM_WINDOW // 2

    def local_mean(a):
        # A separable Gaussian filter; only the positions whose window lies inside the frame are kept.
        for axis in (-3, -2):
            a = scipy.ndimage.correlate1d(a, g, axis=axis, mode="constant")
        return a[..., r:h - r, r:w - r, :]

    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    # Every channel has as many valid positions, so the mean over all is the mean of the channels' means.
    return ssim_map.mean(axis=(-3, -2, -1)).reshape(batch)


def _check_frames(x: np.ndarray, y: np.ndarray) -> None:
    chex.assert_type([x, y], np.uint8)
    chex.assert_equal_shape([x, y])
    if np.ndim(x) < 3 or np.shape(x)[-1] != 3:
        raise ValueError(f"expected RGB frames [..., H, W, 3]; got shape {np.shape(x)}")


# ---------------------------------------------------------------------------------------------------------------
# Weight files: our .npz and the PyTorch originals


class MetricWeightsError(ValueError):
    """Weights that cannot be read or converted; the message names the problem and the fix."""


Params = Dict[str, Any]  # a Flax `params` collection
_LIST_AT_MOST = 6  # key names listed in an error before "and N more"


def _flatten(params: Mapping[str, Any]) -> Dict[str, Any]:
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _unflatten(flat: Mapping[str, np.ndarray]) -> Params:
    params: Params = {}
    for key, value in flat.items():
        *modules, leaf = key.split("/")
        node = params
        for m in modules:
            node = node.setdefault(m, {})
        node[leaf] = value
    return params


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _LIST_AT_MOST} more" if len(keys) > _LIST_AT_MOST else ""
    return ", ".join(keys[:_LIST_AT_MOST]) + more


def _check_arrays(found: Mapping[str, Tuple[int, ...]], expected: Mapping[str, Tuple[int, ...]], source: str,
                  fix: str) -> None:
    """Raises MetricWeightsError naming the missing, unexpected and mis-shaped arrays (key -> shape)."""
    problems = []
    if expected.keys() - found.keys():
        problems.append(f"missing keys {_listed(expected.keys() - found.keys())}")
    if found.keys() - expected.keys():
        problems.append(f"unexpected keys {_listed(found.keys() - expected.keys())}")
    problems += [f"{k} has shape {tuple(found[k])}, expected {tuple(expected[k])}"
                 for k in sorted(expected.keys() & found.keys()) if tuple(found[k]) != tuple(expected[k])]
    if problems:
        raise MetricWeightsError(f"{source}: {'; '.join(problems)}. Fix: {fix}")


def _expected_shapes(module: nn.Module, *example: jax.ShapeDtypeStruct) -> Dict[str, Tuple[int, ...]]:
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example)["params"]
    return {k: tuple(v.shape) for k, v in _flatten(abstract).items()}


def _load_npz(path: Path, expected: Mapping[str, Tuple[int, ...]], what: str, fix: str) -> Params:
    path = Path(path)
    if not path.is_file():
        raise MetricWeightsError(f"{path} does not exist or is not a file. Fix: {fix}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            flat = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise MetricWeightsError(f"{path} is not a readable .npz ({type(e).__name__}: {e}). Fix: {fix}") from e
    _check_arrays({k: v.shape for k, v in flat.items()}, expected, f"{path} does not hold {what}", fix)
    return _unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


def _save_npz(path: Path, flat: Mapping[str, np.ndarray]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path without it
        np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def read_torch_state_dict(path: Path, fix: str) -> Dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict file as numpy arrays (floating point as float32). torch is imported here
    only: it is needed to read the original weights, never to compute a metric."""
    try:
        import torch
    except ImportError as e:
        raise MetricWeightsError("reading PyTorch weights needs PyTorch, which is not installed. Fix: pip install "
                                 "torch (the CPU build is enough), or pip install -e \".[convert]\".") from e
    path = Path(path)
    if not path.is_file():
        raise MetricWeightsError(f"{path} does not exist or is not a file. Fix: {fix}")
    try:
        # weights_only: no code in the file is run.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        detail = (str(e).strip().splitlines() or [""])[0]
        raise MetricWeightsError(f"{path} is not a PyTorch file that can be read safely ({type(e).__name__}: "
                                 f"{detail}). Fix: {fix}") from e
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MetricWeightsError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors. Fix: {fix}")
    return {str(k): (v.detach().float() if v.is_floating_point() else v.detach()).numpy() for k, v in obj.items()}


# Our leaf name -> PyTorch's.
_TORCH_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                 "var": "running_var", "weight": "weight"}
# Our kernel axes from PyTorch's: HWIO from OIHW, DHWIO from OIDHW.
_KERNEL_FROM_TORCH = {4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}


class _Mapped(NamedTuple):
    ours: str
    theirs: str  # the PyTorch key
    shape: Tuple[int, ...]  # ours
    perm: Optional[Tuple[int, ...]]  # ours = transpose(theirs, perm), reshaped to `shape`
    their_shape: Tuple[int, ...]


def _torch_mapping(ours: str, shape: Tuple[int, ...], theirs: str, their_shape: Optional[Tuple[int, ...]] = None
                   ) -> _Mapped:
    perm = _KERNEL_FROM_TORCH.get(len(shape)) if ours.endswith("/kernel") else None
    if their_shape is None:
        their_shape = shape
        if perm:
            their_shape = tuple(shape[perm.index(i)] for i in range(len(shape)))
    return _Mapped(ours, theirs, shape, perm, tuple(their_shape))


def _from_torch(state_dict: Mapping[str, np.ndarray], mapping: Sequence[_Mapped], source: str, fix: str,
                ignored: Callable[[str], bool] = lambda key: False) -> Dict[str, np.ndarray]:
    """Our flat params from a PyTorch state dict; keys for which `ignored` is true are dropped."""
    found = {k: v.shape for k, v in state_dict.items() if not ignored(k)}
    _check_arrays(found, {m.theirs: m.their_shape for m in mapping}, source, fix)
    flat = {}
    for m in mapping:
        value = state_dict[m.theirs]
        if not np.issubdtype(value.dtype, np.floating):
            raise MetricWeightsError(f"{source}: {m.theirs} holds {value.dtype}, expected floating point. Fix: {fix}")
        flat[m.ours] = (np.transpose(value, m.perm) if m.perm else value).reshape(m.shape).astype(np.float32)
    return flat


def _torch_key(ours: str) -> str:
    *modules, leaf = ours.split("/")
    return ".".join([*modules, _TORCH_LEAVES[leaf]])


def _pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """x with its first axis padded to `size` by repeating its last row: every chunk keeps one shape, so the jitted
    forward pass compiles once."""
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x


def _batched(fn: Callable[..., jax.Array], arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    n = len(arrays[0])
    out = [np.asarray(fn(*(_pad_batch(a[s:s + batch_size], min(batch_size, n)) for a in arrays)))[:n - s]
           for s in range(0, n, batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


# ---------------------------------------------------------------------------------------------------------------
# LPIPS (Zhang, Isola, Efros, Shechtman and Wang 2018), v0.1, AlexNet "lin"

# torchvision's AlexNet `features`: (index in its nn.Sequential, output channels, kernel, stride, padding) of each
# convolution. Each is followed by a ReLU, whose output LPIPS compares; a max-pool (3, stride 2) follows the first
# two ReLUs. The classifier is not used.
ALEXNET_CONVS = ((0, 64, 11, 4, 2), (3, 192, 5, 1, 2), (6, 384, 3, 1, 1), (8, 256, 3, 1, 1), (10, 256, 3, 1, 1))
# The lpips package's ScalingLayer, applied to frames in [-1, 1]: ImageNet's normalisation in those units.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10  # added to the channel norm before dividing by it, as lpips does
LPIPS_MIN_SIZE = 31  # the smallest frame side for which AlexNet's last layers are not empty
_LPIPS_FIX = ("write the .npz with python -m diamond_jax.world_model.metric_weights --lpips_alexnet=<torchvision "
              "alexnet-owt-7be5be79.pth> --lpips_lin=<lpips weights/v0.1/alex.pth> --out=lpips_alex.npz")


class Conv2d(nn.Module):
    """A convolution with PyTorch's symmetric zero padding."""

    features: int
    kernel_size: int
    stride: int
    padding: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jax.lax.conv_general_dilated(x, kernel, (self.stride,) * 2, [(self.padding, self.padding)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


class AlexNetFeatures(nn.Module):
    """torchvision's AlexNet convolutions: the outputs of its five ReLUs (relu1 ... relu5), NHWC."""

    @nn.compact
    def __call__(self, x: jax.Array) -> List[jax.Array]:
        outputs = []
        for i, (index, features, kernel, stride, padding) in enumerate(ALEXNET_CONVS):
            if i in (1, 2):
                x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
            x = nn.relu(Conv2d(features, kernel, stride, padding, name=f"features_{index}")(x))
            outputs.append(x)
        return outputs


class LPIPSNetwork(nn.Module):
    """d(x0, x1) = sum over layers l of the spatial mean of w_l . (u(f_l(x0)) - u(f_l(x1)))^2, where f_l is AlexNet's
    l-th ReLU output of the scaled frames, u divides by the norm over the channels and w_l are the learned "lin"
    weights (a 1x1 convolution to one channel, no bias)."""

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        chex.assert_equal_shape([x0, x1])
        chex.assert_rank(x0, 4)
        chex.assert_axis_dimension(x0, -1, 3)

        def scaled(x):
            return (x.astype(jnp.float32) / 127.5 - 1 - jnp.asarray(LPIPS_SHIFT)) / jnp.asarray(LPIPS_SCALE)

        # Both batches in one pass through AlexNet.
        features = AlexNetFeatures(name="net")(jnp.concatenate([scaled(x0), scaled(x1)]))
        distance = jnp.zeros(x0.shape[0], jnp.float32)
        for l, f in enumerate(features):
            f = f / (jnp.sqrt(jnp.sum(f ** 2, axis=-1, keepdims=True)) + LPIPS_EPS)
            f0, f1 = jnp.split(f, 2)
            w = self.param(f"lin{l}_weight", nn.initializers.ones, (f.shape[-1],))
            distance = distance + jnp.mean((f0 - f1) ** 2 @ w, axis=(1, 2))
        return distance


class LPIPS:
    """LPIPS distances of frame pairs with loaded weights; `LPIPS.load` reads them from our .npz."""

    network = LPIPSNetwork()

    def __init__(self, params: Params):
        self.params = params
        self._distance = jax.jit(lambda p, x0, x1: self.network.apply({"params": p}, x0, x1))

    @classmethod
    def expected_shapes(cls) -> Dict[str, Tuple[int, ...]]:
        """Our parameter name -> shape (the .npz layout); AlexNet's weights do not depend on the frame size."""
        frames = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
        return _expected_shapes(cls.network, frames, frames)

    @classmethod
    def load(cls, path: Path) -> "LPIPS":
        return cls(_load_npz(path, cls.expected_shapes(), "LPIPS (AlexNet, lin v0.1) weights", _LPIPS_FIX))

    def __call__(self, x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Distances [b] of uint8 frames [b, H, W, 3], H and W at least LPIPS_MIN_SIZE; batch_size frame pairs at a
        time bound the memory."""
        _check_frames(x, y)
        chex.assert_rank(x, 4)
        if min(x.shape[1:3]) < LPIPS_MIN_SIZE:
            raise ValueError(f"LPIPS needs frames of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} pixels (AlexNet's "
                             f"strides and pools); got {x.shape[1]}x{x.shape[2]}. Fix: upscale the frames first.")
        return _batched(lambda a, b: self._distance(self.params, a, b), [x, y], batch_size)


def _lpips_mapping() -> List[_Mapped]:
    mapping = []
    for ours, shape in LPIPS.expected_shapes().items():
        if ours.startswith("net/features_"):
            module, leaf = ours.split("/")[1:]
            mapping.append(_torch_mapping(ours, shape, f"features.{module.split('_')[1]}.{_TORCH_LEAVES[leaf]}"))
        else:  # lin{l}_weight [C] <- lpips's lin{l}.model.1.weight [1, C, 1, 1] (model.0 is a Dropout)
            mapping.append(_torch_mapping(ours, shape, f"{ours.split('_')[0]}.model.1.weight", (1, *shape, 1, 1)))
    return mapping


def lpips_params_from_torch(alexnet: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray],
                            sources: Tuple[str, str] = ("the AlexNet state dict", "the lin state dict")) -> Params:
    """Our LPIPS params from torchvision's AlexNet state dict (its classifier.* is ignored) and the lpips package's
    lin state dict (lin0.model.1.weight ... lin4.model.1.weight)."""
    mapping = _lpips_mapping()
    net = [m for m in mapping if m.ours.startswith("net/")]
    lins = [m for m in mapping if not m.ours.startswith("net/")]
    flat = _from_torch(alexnet, net, sources[0], "pass torchvision's AlexNet weights (alexnet-owt-7be5be79.pth) as "
                       "--lpips_alexnet", ignored=lambda key: key.startswith("classifier."))
    flat.update(_from_torch(lin, lins, sources[1],
                            "pass the lpips package's lpips/weights/v0.1/alex.pth as --lpips_lin"))
    return _unflatten(flat)


def convert_lpips_weights(torchvision_alexnet_pth: Path, lpips_alex_pth: Path, out_npz: Path) -> Path:
    """Writes our LPIPS .npz from torchvision's AlexNet weights and the lpips package's v0.1 alex.pth (needs torch)."""
    alexnet = read_torch_state_dict(torchvision_alexnet_pth, "pass torchvision's alexnet-owt-7be5be79.pth")
    lin = read_torch_state_dict(lpips_alex_pth, "pass the lpips package's lpips/weights/v0.1/alex.pth")
    params = lpips_params_from_torch(alexnet, lin, (str(torchvision_alexnet_pth), str(lpips_alex_pth)))
    _save_npz(out_npz, _flatten(params))
    return Path(out_npz)


# ---------------------------------------------------------------------------------------------------------------
# I3D (Carreira and Zisserman 2017): Inception-v1 inflated to 3-d, the Kinetics-400 classifier whose logits are the
# features of FVD.

I3D_SIZE = 224  # frames are resized to I3D_SIZE x I3D_SIZE
I3D_CLASSES = 400  # Kinetics-400
I3D_BN_EPS = 1e-3
I3D_MIN_FRAMES = 9  # three stride-2 stages in time must leave the final average pool its 2 steps
# Each Inception module's output channels: branch 0 (1x1x1), branch 1 (1x1x1, then 3x3x3), branch 2 (1x1x1, then
# 3x3x3), branch 3 (3x3x3 max-pool, then 1x1x1); names as in the paper's Inception-v1 and pytorch-i3d.
I3D_INCEPTION = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
_I3D_FIX = "write the .npz with python -m diamond_jax.world_model.metric_weights --i3d=<rgb_imagenet.pt> --out=i3d.npz"


def _max_pool_3d(x: jax.Array, window: Tuple[int, int, int], stride: Tuple[int, int, int]) -> jax.Array:
    # TensorFlow's SAME padding, with -inf: the original model's pools. (pytorch-i3d pads with zeros, the same
    # here since every pool follows a ReLU.)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *stride, 1), "SAME")


class Unit3D(nn.Module):
    """A 3-d convolution with TensorFlow's SAME padding, then batch norm (inference statistics) and a ReLU; or, for
    the logits, a convolution with a bias alone."""

    features: int
    kernel_shape: Tuple[int, int, int] = (1, 1, 1)
    stride: Tuple[int, int, int] = (1, 1, 1)
    batch_norm_and_relu: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = nn.Conv(self.features, self.kernel_shape, self.stride, padding="SAME",
                       use_bias=not self.batch_norm_and_relu, name="conv3d")
        x = conv(x)
        if not self.batch_norm_and_relu:
            return x
        return nn.relu(BatchNorm3d(name="bn")(x))


class BatchNorm3d(nn.Module):
    """Batch norm with fixed statistics, which are parameters here: the model is only ever evaluated."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + I3D_BN_EPS)) + bias


class InceptionModule(nn.Module):
    channels: Tuple[int, int, int, int, int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels
        b0 = Unit3D(c[0], name="b0")(x)
        b1 = Unit3D(c[2], (3, 3, 3), name="b1b")(Unit3D(c[1], name="b1a")(x))
        b2 = Unit3D(c[4], (3, 3, 3), name="b2b")(Unit3D(c[3], name="b2a")(x))
        b3 = Unit3D(c[5], name="b3b")(_max_pool_3d(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3d(nn.Module):
    """I3D's RGB stream: videos [b, T, 224, 224, 3] in [-1, 1], T >= I3D_MIN_FRAMES -> Kinetics-400 logits [b, 400],
    averaged over time as the original model's output is (and as FVD takes it)."""

    num_classes: int = I3D_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chex.assert_rank(x, 5)
        chex.assert_axis_dimension(x, -1, 3)
        if x.shape[2:4] != (I3D_SIZE, I3D_SIZE) or x.shape[1] < I3D_MIN_FRAMES:
            raise ValueError(f"I3D takes videos of at least {I3D_MIN_FRAMES} frames of {I3D_SIZE}x{I3D_SIZE}; got "
                             f"{x.shape[1]} frames of {x.shape[2]}x{x.shape[3]}. Fix: resize the frames (I3D.__call__ "
                             "does) and pass longer videos (FVD's convention is 16 frames).")
        x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x)
        x = _max_pool_3d(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
        x = Unit3D(64, name="Conv3d_2b_1x1")(x)
        x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
        x = _max_pool_3d(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
        for name in ("Mixed_3b", "Mixed_3c"):
            x = InceptionModule(I3D_INCEPTION[name], name=name)(x)
        x = _max_pool_3d(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = InceptionModule(I3D_INCEPTION[name], name=name)(x)
        x = _max_pool_3d(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
        for name in ("Mixed_5b", "Mixed_5c"):
            x = InceptionModule(I3D_INCEPTION[name], name=name)(x)
        # The original's average pool: 2 x 7 x 7, stride 1, no padding (7 x 7 is all of a 224-pixel frame by now).
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 7, 7, 1), (1, 1, 1, 1, 1), "VALID") / (2 * 7 * 7)
        logits = Unit3D(self.num_classes, batch_norm_and_relu=False, name="logits")(x)  # dropout: identity at test
        return jnp.mean(logits, axis=(1, 2, 3))


FeatureExtractor = Callable[[np.ndarray], np.ndarray]  # videos uint8 [n, T, H, W, 3] -> features [n, d]


class I3D:
    """FVD's feature extractor with loaded weights (`I3D.load`): the 400 Kinetics logits of I3D's RGB stream,
    averaged over time, of the videos resized to 224 x 224 and scaled to [-1, 1]. This is what FVD's reference code
    takes (the output of TF-Hub's i3d-kinetics-400, whose model averages its logits over time) and what its common
    PyTorch ports take; not the 1024 pre-logit channels."""

    network = InceptionI3d()

    def __init__(self, params: Params):
        self.params = params
        self._features = jax.jit(lambda p, videos: self.network.apply({"params": p}, preprocess_videos(videos)))

    @classmethod
    def expected_shapes(cls) -> Dict[str, Tuple[int, ...]]:
        """Our parameter name -> shape (the .npz layout)."""
        return _expected_shapes(cls.network, jax.ShapeDtypeStruct((1, I3D_MIN_FRAMES, I3D_SIZE, I3D_SIZE, 3),
                                                                  jnp.float32))

    @classmethod
    def load(cls, path: Path) -> "I3D":
        return cls(_load_npz(path, cls.expected_shapes(), "I3D (Inception-v1, Kinetics-400) weights", _I3D_FIX))

    def __call__(self, videos: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Features [n, 400] of uint8 videos [n, T, H, W, 3], T >= I3D_MIN_FRAMES, batch_size videos at a time."""
        chex.assert_type(videos, np.uint8)
        chex.assert_rank(videos, 5)
        chex.assert_axis_dimension(videos, -1, 3)
        return _batched(lambda v: self._features(self.params, v), [videos], batch_size)


def preprocess_videos(videos: jax.Array) -> jax.Array:
    """uint8 [n, T, H, W, 3] -> float32 [n, T, 224, 224, 3] in [-1, 1], as FVD feeds I3D: bilinear resizing with
    half-pixel centres (PyTorch's align_corners=False; TF1's resize_bilinear in the original FVD code maps pixels
    without the half-pixel offset), no antialiasing."""
    n, t = videos.shape[:2]
    frames = jax.image.resize(videos.astype(jnp.float32), (n, t, I3D_SIZE, I3D_SIZE, 3), "bilinear", antialias=False)
    return frames / 127.5 - 1


def i3d_params_from_torch(state_dict: Mapping[str, np.ndarray], source: str = "the I3D state dict") -> Params:
    """Our I3D params from pytorch-i3d's InceptionI3d state dict (rgb_imagenet.pt's key layout:
    Conv3d_1a_7x7.conv3d.weight, Mixed_3b.b1b.bn.running_mean, logits.conv3d.bias, ...); BatchNorm's
    num_batches_tracked counters are ignored."""
    mapping = [_torch_mapping(ours, shape, _torch_key(ours)) for ours, shape in I3D.expected_shapes().items()]
    flat = _from_torch(state_dict, mapping, source,
                       "pass pytorch-i3d's Kinetics-400 RGB model (models/rgb_imagenet.pt)",
                       ignored=lambda key: key.endswith(".num_batches_tracked"))
    return _unflatten(flat)


def convert_i3d_weights(i3d_pth: Path, out_npz: Path) -> Path:
    """Writes our I3D .npz from pytorch-i3d's rgb_imagenet.pt (needs torch)."""
    state_dict = read_torch_state_dict(i3d_pth, "pass pytorch-i3d's models/rgb_imagenet.pt")
    _save_npz(out_npz, _flatten(i3d_params_from_torch(state_dict, str(i3d_pth))))
    return Path(out_npz)


# ---------------------------------------------------------------------------------------------------------------
# FVD (Unterthiner, van Steenkiste, Kurach, Marinier, Michalski and Gelly 2018)


def gaussian_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The mean [d] and the unbiased covariance [d, d] (divided by n - 1) of features [n, d], n >= 2, float64."""
    features = np.asarray(features, np.float64)
    chex.assert_rank(features, 2)
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 samples; got {len(features)}. Fix: pass more videos.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), the squared Frechet (2-Wasserstein) distance
    of two Gaussians.

    tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric positive
    semi-definite s sigma2 s, s = sigma1^(1/2), which have those of sigma1 sigma2: symmetric eigendecompositions
    only, so no complex parts or failed matrix square roots, even for singular covariances (fewer samples than
    dimensions)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    chex.assert_rank([mu1, mu2, sigma1, sigma2], [1, 1, 2, 2])
    chex.assert_equal_shape([mu1, mu2])
    chex.assert_equal_shape([sigma1, sigma2])
    chex.assert_shape(sigma1, (len(mu1), len(mu1)))

    def symmetric_sqrt(a):
        eigenvalues, vectors = np.linalg.eigh((a + a.T) / 2)
        return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T

    s = symmetric_sqrt(sigma1)
    # Rounding leaves eigenvalues of about -1e-12 where they are 0.
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(s @ sigma2 @ s), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fvd(real: np.ndarray, fake: np.ndarray, extractor: FeatureExtractor) -> float:
    """FVD of uint8 videos [n, T, H, W, 3] (n >= 2 of each; the estimate is biased upwards for small n, so compare
    FVDs of equally many videos): the Frechet distance of Gaussians fitted to their features (an `I3D`'s, for the
    FVD of the literature)."""
    chex.assert_type([real, fake], np.uint8)
    chex.assert_rank([real, fake], 5)
    return frechet_distance(*gaussian_statistics(extractor(real)), *gaussian_statistics(extractor(fake)))


# ---------------------------------------------------------------------------------------------------------------
# Which metrics can be computed

_CONVERT = "python -m diamond_jax.world_model.metric_weights"


@dataclasses.dataclass(frozen=True)
class MetricWeights:
    """The learned metrics that can be computed (None: skipped) and one line per skipped one. PSNR and SSIM need no
    weights and are always computed."""

    lpips: Optional[LPIPS]
    i3d: Optional[I3D]
    skipped: Tuple[str, ...]

    @classmethod
    def load(cls, lpips_weights: Optional[Path] = None, i3d_weights: Optional[Path] = None) -> "MetricWeights":
        """Loads the weights given; a path given but unreadable raises MetricWeightsError rather than skipping."""
        skipped = []
        lpips = LPIPS.load(lpips_weights) if lpips_weights else None
        if lpips is None:
            skipped.append(f"LPIPS skipped: no --lpips_weights given (an .npz from `{_CONVERT} --lpips_alexnet=... "
                           "--lpips_lin=... --out=lpips_alex.npz`)")
        i3d = I3D.load(i3d_weights) if i3d_weights else None
        if i3d is None:
            skipped.append(f"FVD skipped: no --i3d_weights given (an .npz from `{_CONVERT} --i3d=rgb_imagenet.pt "
                           "--out=i3d.npz`)")
        return cls(lpips, i3d, tuple(skipped))
