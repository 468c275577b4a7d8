"""World-model metrics against computations written here from the papers' formulas (numpy, scipy, plain torch on
random weights saved in the standard PyTorch key layouts) and against their invariants."""

import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg

from diamond_jax.world_model import metrics

torch = pytest.importorskip("torch")
F = torch.nn.functional


def frames(rng, shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------- PSNR

def test_psnr_by_hand():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    y = x.copy()
    y[0] = 1  # mse 1
    y[1, 0, 0, 0] = 255  # mse 255^2 / 48
    np.testing.assert_allclose(metrics.psnr(x, y), [10 * math.log10(255 ** 2), 10 * math.log10(48)])
    assert metrics.psnr(x, x).tolist() == [np.inf, np.inf]


def test_psnr_summary_averages_the_frames_that_differ():
    assert metrics.psnr_summary(np.array([np.inf, 20.0, 40.0])) == (30.0, pytest.approx(1 / 3))
    assert metrics.psnr_summary(np.array([np.inf])) == (None, 1.0)


# ----------------------------------------------------------------------------------------------------------- SSIM

def ssim_reference(x, y):
    """SSIM of one frame [H, W, 3], from the formula: explicit 11 x 11 windows, population statistics."""
    r = np.arange(11) - 5
    g = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for c in range(3):
        px = np.lib.stride_tricks.sliding_window_view(x[..., c].astype(np.float64), (11, 11))
        py = np.lib.stride_tricks.sliding_window_view(y[..., c].astype(np.float64), (11, 11))
        mx, my = (px * w).sum((-2, -1)), (py * w).sum((-2, -1))
        vx = (((px - mx[..., None, None]) ** 2) * w).sum((-2, -1))
        vy = (((py - my[..., None, None]) ** 2) * w).sum((-2, -1))
        cxy = ((px - mx[..., None, None]) * (py - my[..., None, None]) * w).sum((-2, -1))
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        per_channel.append(s.mean())
    return np.mean(per_channel)


def test_ssim_matches_the_formula():
    rng = np.random.default_rng(0)
    x = frames(rng, (3, 16, 20, 3))
    y = np.clip(x + rng.normal(0, 30, x.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(metrics.ssim(x, y), [ssim_reference(a, b) for a, b in zip(x, y)], rtol=1e-10)


def test_ssim_of_constant_frames_by_hand():
    # No variance: SSIM = (2 a b + C1) / (a^2 + b^2 + C1).
    x, y = np.full((12, 12, 3), 100, np.uint8), np.full((12, 12, 3), 60, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(x, y) == pytest.approx((2 * 100 * 60 + c1) / (100 ** 2 + 60 ** 2 + c1), rel=1e-12)


def test_ssim_invariants():
    rng = np.random.default_rng(1)
    x = frames(rng, (2, 1, 16, 16, 3))
    noisy = [np.clip(x + rng.normal(0, s, x.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    np.testing.assert_allclose(metrics.ssim(x, x), 1.0, rtol=1e-12)
    np.testing.assert_allclose(metrics.ssim(x, noisy[0]), metrics.ssim(noisy[0], x), rtol=1e-12)
    scores = [metrics.ssim(x, n) for n in noisy]
    assert scores[0].shape == (2, 1)
    assert np.all(scores[0] > scores[1]) and np.all(scores[1] > scores[2])


# ---------------------------------------------------------------------------------------------------------- LPIPS

ALEX_CHANNELS = (64, 192, 384, 256, 256)


def torch_alexnet_features():
    """torchvision's AlexNet `features` layer for layer (random weights), the same Sequential indices."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))


def torch_lpips(features, lin, x0, x1):
    """LPIPS v0.1 from the paper's formula in plain torch, uint8 NHWC frames -> [b]."""
    shift = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
    scale = torch.tensor([.458, .448, .450])[None, :, None, None]

    def taps(x):
        x = (torch.from_numpy(x).permute(0, 3, 1, 2).double() / 127.5 - 1 - shift) / scale
        outs = []
        for i, layer in enumerate(features):
            x = layer(x)
            if i in (1, 4, 7, 9, 11):  # the five ReLUs
                outs.append(x)
        return outs

    total = 0
    for l, (f0, f1) in enumerate(zip(taps(x0), taps(x1))):
        u0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        u1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((u0 - u1) ** 2, lin[f"lin{l}.model.1.weight"].double()).mean((2, 3))[:, 0]
    return total.numpy()


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    torch.manual_seed(0)
    features = torch_alexnet_features().double()
    alexnet = {f"features.{k}": v.float() for k, v in features.state_dict().items()}
    # torchvision's file also holds the classifier, which LPIPS does not use.
    alexnet["classifier.1.weight"] = torch.randn(16, 9216)
    lin = {f"lin{l}.model.1.weight": torch.rand(1, c, 1, 1) for l, c in enumerate(ALEX_CHANNELS)}
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(alexnet, folder / "alexnet.pth")
    torch.save(lin, folder / "alex.pth")
    out = metrics.convert_lpips_weights(folder / "alexnet.pth", folder / "alex.pth", folder / "lpips_alex.npz")
    return folder, out, features, lin


def test_lpips_matches_the_formula_in_torch(lpips_files):
    _, npz, features, lin = lpips_files
    rng = np.random.default_rng(2)
    x0 = frames(rng, (3, 64, 64, 3))
    x1 = np.clip(x0 + rng.normal(0, 25, x0.shape), 0, 255).astype(np.uint8)
    lpips = metrics.LPIPS.load(npz)
    with torch.no_grad():
        expected = torch_lpips(features, {k: v.double() for k, v in lin.items()}, x0, x1)
    # batch_size 2: two batches, the second padded.
    np.testing.assert_allclose(lpips(x0, x1, batch_size=2), expected, atol=1e-4, rtol=1e-4)
    assert np.all(expected > 0)
    # The same frame's features at two positions of one batch may differ in their last bits.
    np.testing.assert_allclose(lpips(x0, x0), 0.0, atol=1e-12)


def test_lpips_conversion_names_missing_and_unexpected_keys(lpips_files):
    folder, _, features, lin = lpips_files
    alexnet = {f"features.{k}": v.float().numpy() for k, v in features.state_dict().items()}
    alexnet.pop("features.3.bias")
    alexnet["features.12.weight"] = np.zeros(3, np.float32)
    lin = {k: v.numpy() for k, v in lin.items()}
    with pytest.raises(metrics.MetricWeightsError, match=r"missing keys features\.3\.bias; unexpected keys "
                                                         r"features\.12\.weight"):
        metrics.lpips_params_from_torch(alexnet, lin)


def test_lpips_load_refuses_a_wrong_npz(tmp_path):
    np.savez(tmp_path / "wrong.npz", something=np.zeros(2))
    with pytest.raises(metrics.MetricWeightsError, match="missing keys lin0_weight.*unexpected keys something"):
        metrics.LPIPS.load(tmp_path / "wrong.npz")
    with pytest.raises(metrics.MetricWeightsError, match="does not exist"):
        metrics.LPIPS.load(tmp_path / "absent.npz")


# ------------------------------------------------------------------------------------------------------------ I3D

# (name, input channels, output channels of b0, b1a, b1b, b2a, b2b, b3b): Inception-v1's modules (Carreira and
# Zisserman 2017, Fig. 3; names as pytorch-i3d's).
MIXED = (("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)), ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
         ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)), ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
         ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)), ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
         ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)), ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
         ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)))


def random_i3d_state_dict(gen):
    sd = {}

    def unit(name, cin, cout, k):
        sd[f"{name}.conv3d.weight"] = torch.randn(cout, cin, k, k, k, generator=gen) * math.sqrt(2 / (cin * k ** 3))
        sd[f"{name}.bn.weight"] = 1 + 0.1 * torch.randn(cout, generator=gen)
        sd[f"{name}.bn.bias"] = 0.1 * torch.randn(cout, generator=gen)
        sd[f"{name}.bn.running_mean"] = 0.1 * torch.randn(cout, generator=gen)
        sd[f"{name}.bn.running_var"] = 1 + 0.5 * torch.rand(cout, generator=gen)
        sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(7)

    unit("Conv3d_1a_7x7", 3, 64, 7)
    unit("Conv3d_2b_1x1", 64, 64, 1)
    unit("Conv3d_2c_3x3", 64, 192, 3)
    for name, cin, c in MIXED:
        for branch, ci, co, k in (("b0", cin, c[0], 1), ("b1a", cin, c[1], 1), ("b1b", c[1], c[2], 3),
                                  ("b2a", cin, c[3], 1), ("b2b", c[3], c[4], 3), ("b3b", cin, c[5], 1)):
            unit(f"{name}.{branch}", ci, co, k)
    sd["logits.conv3d.weight"] = torch.randn(400, 1024, 1, 1, 1, generator=gen) / 32
    sd["logits.conv3d.bias"] = torch.randn(400, generator=gen)
    return sd


def tf_same_pad(x, kernel, stride):
    """Zero padding as TensorFlow's SAME: total max(k - s, 0) or max(k - size % s, 0), the extra one at the end."""
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(x, [p for pair in reversed(pads) for p in pair])


def torch_i3d(sd, videos):
    """I3D's Kinetics logits averaged over time, in plain torch; videos uint8 [n, T, H, W, 3]."""
    n, t, h, w, _ = videos.shape
    x = torch.from_numpy(videos).double().reshape(n * t, h, w, 3).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False) / 127.5 - 1
    x = x.reshape(n, t, 3, 224, 224).permute(0, 2, 1, 3, 4)
    sd = {k: v.double() for k, v in sd.items()}

    def unit(x, name, k=1, s=1):
        x = F.conv3d(tf_same_pad(x, (k,) * 3, (s,) * 3), sd[f"{name}.conv3d.weight"], stride=s)
        x = F.batch_norm(x, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"], sd[f"{name}.bn.weight"],
                         sd[f"{name}.bn.bias"], training=False, eps=1e-3)
        return F.relu(x)

    def pool(x, k, s):
        return F.max_pool3d(tf_same_pad(x, k, s), k, s)

    def mixed(x, name):
        return torch.cat([unit(x, f"{name}.b0"), unit(unit(x, f"{name}.b1a"), f"{name}.b1b", 3),
                          unit(unit(x, f"{name}.b2a"), f"{name}.b2b", 3),
                          unit(pool(x, (3, 3, 3), (1, 1, 1)), f"{name}.b3b")], dim=1)

    x = unit(x, "Conv3d_1a_7x7", 7, 2)
    x = pool(x, (1, 3, 3), (1, 2, 2))
    x = unit(unit(x, "Conv3d_2b_1x1"), "Conv3d_2c_3x3", 3)
    x = pool(x, (1, 3, 3), (1, 2, 2))
    x = mixed(mixed(x, "Mixed_3b"), "Mixed_3c")
    x = pool(x, (3, 3, 3), (2, 2, 2))
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
        x = mixed(x, name)
    x = pool(x, (2, 2, 2), (2, 2, 2))
    x = mixed(mixed(x, "Mixed_5b"), "Mixed_5c")
    x = F.avg_pool3d(x, (2, 7, 7), stride=1)
    x = F.conv3d(x, sd["logits.conv3d.weight"], sd["logits.conv3d.bias"])
    return x.mean((2, 3, 4)).numpy()


def test_i3d_matches_a_plain_torch_i3d(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = random_i3d_state_dict(gen)
    torch.save(sd, tmp_path / "rgb_imagenet.pt")
    npz = metrics.convert_i3d_weights(tmp_path / "rgb_imagenet.pt", tmp_path / "i3d.npz")
    videos = frames(np.random.default_rng(3), (1, metrics.I3D_MIN_FRAMES, 32, 32, 3))
    with torch.no_grad():
        expected = torch_i3d(sd, videos)
    got = metrics.I3D.load(npz)(videos)
    assert got.shape == (1, 400)
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=1e-4)


def test_i3d_conversion_names_missing_and_unexpected_keys():
    sd = {k: v.numpy() for k, v in random_i3d_state_dict(torch.Generator().manual_seed(1)).items()}
    sd.pop("Mixed_4c.b2b.bn.running_var")
    sd["Logits.weight"] = np.zeros(1, np.float32)
    with pytest.raises(metrics.MetricWeightsError,
                       match=r"missing keys Mixed_4c\.b2b\.bn\.running_var; unexpected keys Logits\.weight"):
        metrics.i3d_params_from_torch(sd)


# ------------------------------------------------------------------------------------------------------------ FVD

def test_frechet_distance_of_diagonal_gaussians_by_hand():
    # Commuting covariances: tr(S1 + S2 - 2 (S1 S2)^(1/2)) = sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = (1 + 0 + 4) + (1 + 1 + 0)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_full_covariances_against_scipy_sqrtm():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T, b @ b.T + np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_fvd_with_a_pluggable_extractor():
    rng = np.random.default_rng(5)
    real, fake = frames(rng, (6, 2, 4, 4, 3)), frames(rng, (5, 2, 4, 4, 3))

    def mean_colour(videos):
        return videos.reshape(len(videos), -1, 3).mean(axis=1)

    f_real, f_fake = mean_colour(real), mean_colour(fake)
    # The Frechet distance by hand: unbiased covariances, the matrix square root from scipy.
    s_real = (f_real - f_real.mean(0)).T @ (f_real - f_real.mean(0)) / 5
    s_fake = (f_fake - f_fake.mean(0)).T @ (f_fake - f_fake.mean(0)) / 4
    expected = (np.sum((f_real.mean(0) - f_fake.mean(0)) ** 2)
                + np.trace(s_real + s_fake - 2 * scipy.linalg.sqrtm(s_real @ s_fake).real))
    assert metrics.fvd(real, fake, mean_colour) == pytest.approx(expected, rel=1e-9)
    assert metrics.fvd(real, real, mean_colour) == pytest.approx(0, abs=1e-9)


# ------------------------------------------------------------------------------------------ what can be computed

def test_metric_weights_say_what_is_skipped(lpips_files, tmp_path):
    none = metrics.MetricWeights.load()
    assert none.lpips is None and none.i3d is None
    assert [line.split(":")[0] for line in none.skipped] == ["LPIPS skipped", "FVD skipped"]
    assert "python -m diamond_jax.world_model.metric_weights" in none.skipped[0]
    some = metrics.MetricWeights.load(lpips_weights=lpips_files[1])
    assert isinstance(some.lpips, metrics.LPIPS) and some.i3d is None and len(some.skipped) == 1
    with pytest.raises(metrics.MetricWeightsError, match="does not exist"):
        metrics.MetricWeights.load(i3d_weights=tmp_path / "absent.npz")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diamond_jax.world_model.metric_weights", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_converts_and_refuses_bad_input(lpips_files, tmp_path):
    folder = lpips_files[0]
    done = run_cli(f"--lpips_alexnet={folder / 'alexnet.pth'}", f"--lpips_lin={folder / 'alex.pth'}",
                   f"--out={tmp_path / 'out' / 'lpips.npz'}")
    assert done.returncode == 0, done.stderr
    metrics.LPIPS.load(tmp_path / "out" / "lpips.npz")

    missing = run_cli(f"--i3d={tmp_path / 'absent.pt'}", f"--out={tmp_path / 'i3d.npz'}")
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error:") and len(missing.stderr.strip().splitlines()) == 1
    assert "absent.pt does not exist" in missing.stderr

    # The lin file given as AlexNet: every key is named, on one line.
    swapped = run_cli(f"--lpips_alexnet={folder / 'alex.pth'}", f"--lpips_lin={folder / 'alex.pth'}",
                      f"--out={tmp_path / 'x.npz'}")
    assert swapped.returncode == 2 and len(swapped.stderr.strip().splitlines()) == 1
    assert "missing keys features.0.bias" in swapped.stderr and "unexpected keys lin0.model.1.weight" in swapped.stderr
