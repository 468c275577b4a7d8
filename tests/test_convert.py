"""Saving and loading agents, and the converter of official PyTorch checkpoints.

The official key names and shapes below are written out independently of our models, by mirroring the
official module structure (src/models/blocks.py, diffusion/inner_model.py, rew_end_model.py,
actor_critic.py) for the paper's configuration. Layer numerics are compared with real torch.nn layers.
"""

import collections
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import atari100k
from diamond_jax import convert as cv
from diamond_jax.agent import Agent
from diamond_jax.models import blocks, sizes
from diamond_jax.training import agent_checkpoint as ac

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------
# The official layout for the paper's configuration (config/agent/default.yaml), from the official modules.

def _resblock(prefix, c_in, c_out, cond, attn):
    keys = {
        f"{prefix}.norm1.linear.weight": (2 * c_in, cond), f"{prefix}.norm1.linear.bias": (2 * c_in,),
        f"{prefix}.conv1.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1.bias": (c_out,),
        f"{prefix}.norm2.linear.weight": (2 * c_out, cond), f"{prefix}.norm2.linear.bias": (2 * c_out,),
        f"{prefix}.conv2.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2.bias": (c_out,),
    }
    if c_in != c_out:
        keys.update({f"{prefix}.proj.weight": (c_out, c_in, 1, 1), f"{prefix}.proj.bias": (c_out,)})
    if attn:
        keys.update({
            f"{prefix}.attn.norm.norm.weight": (c_out,), f"{prefix}.attn.norm.norm.bias": (c_out,),
            f"{prefix}.attn.qkv_proj.weight": (3 * c_out, c_out, 1, 1), f"{prefix}.attn.qkv_proj.bias": (3 * c_out,),
            f"{prefix}.attn.out_proj.weight": (c_out, c_out, 1, 1), f"{prefix}.attn.out_proj.bias": (c_out,),
        })
    return keys


def _resblocks(prefix, ins, outs, cond, attn):
    keys = {}
    for j, (c_in, c_out) in enumerate(zip(ins, outs)):
        keys.update(_resblock(f"{prefix}.resblocks.{j}", c_in, c_out, cond, attn))
    return keys


def _conv(prefix, c_in, c_out, k):
    return {f"{prefix}.weight": (c_out, c_in, k, k), f"{prefix}.bias": (c_out,)}


def _linear(prefix, c_in, c_out, bias=True):
    return {f"{prefix}.weight": (c_out, c_in), **({f"{prefix}.bias": (c_out,)} if bias else {})}


def official_denoiser(num_actions):
    p, cond, n_cond, img = "denoiser.inner_model.", 256, 4, 3
    depths, channels, attn_depths = [2, 2, 2, 2], [64, 64, 64, 64], [0, 0, 0, 0]
    keys = {p + "noise_emb.weight": (1, cond // 2), p + "act_emb.0.weight": (num_actions, cond // n_cond)}
    keys.update(_linear(p + "cond_proj.0", cond, cond))
    keys.update(_linear(p + "cond_proj.2", cond, cond))
    keys.update(_conv(p + "conv_in", (n_cond + 1) * img, channels[0], 3))
    up = []
    for i, n in enumerate(depths):
        c1, c2 = channels[max(0, i - 1)], channels[i]
        keys.update(_resblocks(f"{p}unet.d_blocks.{i}", [c1] + [c2] * (n - 1), [c2] * n, cond, attn_depths[i]))
        up.append(([2 * c2] * n + [c1 + c2], [c2] * n + [c1], attn_depths[i]))
    for j, (ins, outs, attn) in enumerate(reversed(up)):  # u_blocks is built bottom-up, then reversed
        keys.update(_resblocks(f"{p}unet.u_blocks.{j}", ins, outs, cond, attn))
    keys.update(_resblocks(f"{p}unet.mid_blocks", [channels[-1]] * 2, [channels[-1]] * 2, cond, True))
    for k, c in enumerate(channels[:-1], start=1):  # index 0 is an nn.Identity
        keys.update(_conv(f"{p}unet.downsamples.{k}.conv", c, c, 3))
    for k, c in enumerate(reversed(channels[:-1]), start=1):
        keys.update(_conv(f"{p}unet.upsamples.{k}.conv", c, c, 3))
    keys.update({p + "norm_out.norm.weight": (channels[0],), p + "norm_out.norm.bias": (channels[0],)})
    keys.update(_conv(p + "conv_out", channels[0], img, 3))
    return keys


def official_rew_end_model(num_actions):
    p, cond, lstm, size = "rew_end_model.", 128, 512, 64
    depths, channels, attn_depths = [2, 2, 2, 2], [32, 32, 32, 32], [0, 0, 0, 0]
    keys = _conv(p + "encoder.conv_in", 2 * 3, channels[0], 3)
    for i, n in enumerate(depths):
        c1, c2 = channels[max(0, i - 1)], channels[i]
        keys.update(_resblocks(f"{p}encoder.blocks.{i}", [c1] + [c2] * (n - 1), [c2] * n, cond, attn_depths[i]))
    keys.update(_resblocks(f"{p}encoder.blocks.{len(depths)}", [channels[-1]] * 2, [channels[-1]] * 2, cond, True))
    for k, c in enumerate(channels[:-1], start=1):
        keys.update(_conv(f"{p}encoder.downsamples.{k}.conv", c, c, 3))
    keys[p + "act_emb.weight"] = (num_actions, cond)
    lstm_in = channels[-1] * (size // 2 ** (len(depths) - 1)) ** 2
    keys.update({p + "lstm.weight_ih_l0": (4 * lstm, lstm_in), p + "lstm.weight_hh_l0": (4 * lstm, lstm),
                 p + "lstm.bias_ih_l0": (4 * lstm,), p + "lstm.bias_hh_l0": (4 * lstm,)})
    keys.update(_linear(p + "head.0", lstm, lstm))
    keys.update(_linear(p + "head.2", lstm, 3 + 2, bias=False))
    return keys


def official_actor_critic(num_actions):
    p, lstm, size, channels, down = "actor_critic.", 512, 64, [32, 32, 64, 64], [1, 1, 1, 1]
    keys = _conv(p + "encoder.encoder.0", 3, channels[0], 3)
    index = 1
    for i, c_out in enumerate(channels):
        c_in = channels[max(0, i - 1)]
        block = f"{p}encoder.encoder.{index}"
        keys.update({f"{block}.f.0.norm.weight": (c_in,), f"{block}.f.0.norm.bias": (c_in,)})
        keys.update(_conv(f"{block}.f.2", c_in, c_out, 3))
        if c_in != c_out:
            keys.update(_conv(f"{block}.skip_projection", c_in, c_out, 1))
        index += 2 if down[i] else 1  # an nn.MaxPool2d follows
    lstm_in = channels[-1] * (size // 2 ** sum(down)) ** 2
    keys.update({p + "lstm.weight_ih": (4 * lstm, lstm_in), p + "lstm.weight_hh": (4 * lstm, lstm),
                 p + "lstm.bias_ih": (4 * lstm,), p + "lstm.bias_hh": (4 * lstm,)})
    keys.update(_linear(p + "critic_linear", lstm, 1))
    keys.update(_linear(p + "actor_linear", lstm, num_actions))
    return keys


def official_agent(num_actions):
    return {**official_denoiser(num_actions), **official_rew_end_model(num_actions),
            **official_actor_critic(num_actions)}


# ---------------------------------------------------------------------------------------------------------
# Fixtures: random variables of the right shapes (initialising the real models would cost seconds each).

def random_like(abstract, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), abstract)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def paper_config():
    return atari100k.get_config()


@pytest.fixture(scope="module")
def debug_config():
    return atari100k.get_config("debug")


@pytest.fixture(scope="module")
def paper_variables(paper_config):
    return random_like(ac.abstract_variables(Agent.from_config(paper_config, 4)))


@pytest.fixture(scope="module")
def debug_variables(debug_config):
    return random_like(ac.abstract_variables(Agent.from_config(debug_config, 4)), seed=1)


def torch_save(torch, state, path):
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# The mapping.

def test_official_layout_keys_shapes_and_parameter_counts(paper_variables):
    state = cv.agent_to_official(paper_variables)
    expected = official_agent(4)
    got = {k: v.shape for k, v in state.items()}
    assert sorted(got.keys() - expected.keys()) == [] and sorted(expected.keys() - got.keys()) == []
    assert {k: got[k] for k in expected if got[k] != expected[k]} == {}
    # A few keys spelled out in full.
    assert got["denoiser.inner_model.conv_in.weight"] == (64, 15, 3, 3)
    assert got["denoiser.inner_model.noise_emb.weight"] == (1, 128)
    assert got["denoiser.inner_model.act_emb.0.weight"] == (4, 64)
    assert got["denoiser.inner_model.unet.u_blocks.0.resblocks.2.proj.weight"] == (64, 128, 1, 1)
    assert got["denoiser.inner_model.unet.mid_blocks.resblocks.1.attn.qkv_proj.weight"] == (192, 64, 1, 1)
    assert got["rew_end_model.lstm.weight_ih_l0"] == (2048, 2048)
    assert got["rew_end_model.head.2.weight"] == (5, 512)
    assert got["actor_critic.encoder.encoder.5.skip_projection.weight"] == (64, 32, 1, 1)
    assert got["actor_critic.lstm.weight_ih"] == (2048, 1024)
    assert got["actor_critic.actor_linear.weight"] == (4, 512)

    def count(prefix):
        return sum(math.prod(s) for k, s in expected.items() if k.startswith(prefix))

    assert count("denoiser.") - 128 == 4_405_955  # noise_emb.weight is a buffer
    assert count("rew_end_model.") == 5_900_864
    assert count("actor_critic.") == 3_229_637


def test_conversion_transposes_as_pytorch_lays_out(paper_variables):
    state = cv.agent_to_official(paper_variables)
    ours = paper_variables["denoiser"]["params"]["unet"]["d_blocks_1"]["resblocks_0"]
    np.testing.assert_array_equal(state["denoiser.inner_model.unet.d_blocks.1.resblocks.0.conv1.weight"],
                                  ours["conv1"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(state["denoiser.inner_model.unet.d_blocks.1.resblocks.0.norm1.linear.weight"],
                                  ours["norm1"]["linear"]["kernel"].T)
    np.testing.assert_array_equal(state["rew_end_model.lstm.weight_hh_l0"],
                                  paper_variables["rew_end_model"]["params"]["lstm"]["kernel_hh"].T)
    np.testing.assert_array_equal(state["actor_critic.encoder.encoder.1.f.0.norm.weight"],
                                  paper_variables["actor_critic"]["params"]["encoder_1"]["f_0"]["norm"]["scale"])
    np.testing.assert_array_equal(state["denoiser.inner_model.noise_emb.weight"],
                                  paper_variables["denoiser"]["buffers"]["noise_emb"]["weight"])


def test_round_trips_are_exact(paper_config, paper_variables):
    agent = Agent.from_config(paper_config, 4)
    assert_trees_equal(cv.agent_from_official(cv.agent_to_official(paper_variables), agent), paper_variables)

    rng = np.random.default_rng(2)
    official = {k: rng.standard_normal(s, dtype=np.float32) for k, s in official_agent(4).items()}
    back = cv.agent_to_official(cv.agent_from_official(official, agent))
    assert back.keys() == official.keys()
    for k in official:
        np.testing.assert_array_equal(back[k], official[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------------
# Converted torch layers compute what our layers compute.

def _ours_from_torch(module, torch_module, *inputs, layout=cv.Layout()):
    state = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    return cv.from_official(state, abstract, layout)


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("c_in,c_out,k,stride,size", [(5, 7, 3, 1, 8), (6, 6, 3, 2, 8), (6, 6, 3, 2, 7),
                                                      (4, 9, 1, 1, 5)])
def test_conv2d(c_in, c_out, k, stride, size):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2)
    x = torch.randn(2, c_in, size, size)
    ours = blocks.Conv(c_out, kernel_size=k, stride=stride)
    variables = _ours_from_torch(ours, conv, _nhwc(x))
    np.testing.assert_allclose(ours.apply(variables, _nhwc(x)), _nhwc(conv(x).detach()), atol=1e-5, rtol=1e-5)


def test_group_norm():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    # Wrapped like the official GroupNorm block: its nn.GroupNorm is the attribute `norm`.
    norm = torch.nn.ModuleDict({"norm": torch.nn.GroupNorm(2, 64, eps=blocks.GN_EPS)})
    for p in norm.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 64, 4, 4) * 3 + 1
    ours = blocks.GroupNorm()
    variables = _ours_from_torch(ours, norm, _nhwc(x))
    np.testing.assert_allclose(ours.apply(variables, _nhwc(x)), _nhwc(norm["norm"](x).detach()), atol=1e-5)


def test_linear_and_embedding():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(6, 5), torch.randn(3, 6)
    variables = _ours_from_torch(blocks.Dense(5), linear, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(blocks.Dense(5).apply(variables, x.numpy()), linear(x).detach().numpy(), atol=1e-5)

    emb, act = torch.nn.Embedding(4, 8), torch.tensor([3, 0, 2])
    variables = _ours_from_torch(nn.Embed(4, 8), emb, jnp.asarray(act.numpy()))
    np.testing.assert_array_equal(nn.Embed(4, 8).apply(variables, act.numpy()), emb(act).detach().numpy())


def test_lstm_over_several_steps():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    b, t, d, h = 3, 5, 6, 4
    lstm = torch.nn.LSTM(d, h, batch_first=True)
    x, h0, c0 = torch.randn(b, t, d), torch.randn(1, b, h), torch.randn(1, b, h)
    y, (hn, cn) = lstm(x, (h0, c0))
    # Scanned over time like the reward/end model's LSTM.
    ours = nn.scan(blocks.LSTMCell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1,
                   out_axes=1)(h)
    carry = (jnp.asarray(h0[0].numpy()), jnp.asarray(c0[0].numpy()))
    variables = _ours_from_torch(ours, lstm, carry, jnp.asarray(x.numpy()), layout=cv.Layout(lstm_suffix="_l0"))
    (our_h, our_c), our_y = ours.apply(variables, carry, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(our_y, y.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(our_h, hn[0].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(our_c, cn[0].detach().numpy(), atol=1e-5)


def test_lstm_cell():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(6, 4)
    x, hx, cx = torch.randn(3, 6), torch.randn(3, 4), torch.randn(3, 4)
    hn, cn = cell(x, (hx, cx))
    ours, carry = blocks.LSTMCell(4), (jnp.asarray(hx.numpy()), jnp.asarray(cx.numpy()))
    variables = _ours_from_torch(ours, cell, carry, jnp.asarray(x.numpy()))
    (our_h, our_c), _ = ours.apply(variables, carry, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(our_h, hn.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(our_c, cn.detach().numpy(), atol=1e-5)


def test_lstm_input_is_flattened_in_pytorch_order():
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 5, 3, 4)
    np.testing.assert_array_equal(blocks.flatten_chw(_nhwc(x)), x.flatten(start_dim=1).numpy())


def _random_state(shapes, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: scale * rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def test_ada_group_norm_scale_then_shift():
    torch = pytest.importorskip("torch")
    c, cond_dim = 64, 16
    state = _random_state({"linear.weight": (2 * c, cond_dim), "linear.bias": (2 * c,)}, seed=3)
    x, cond = torch.randn(2, c, 4, 4), torch.randn(2, cond_dim)
    # The official AdaGroupNorm: plain group norm, then the linear map's first half scales, its second shifts.
    p = {k: torch.from_numpy(v) for k, v in state.items()}
    scale, shift = torch.nn.functional.linear(cond, p["linear.weight"], p["linear.bias"])[:, :, None, None].chunk(2, 1)
    expected = torch.nn.functional.group_norm(x, c // sizes.GN_GROUP_SIZE, eps=blocks.GN_EPS) * (1 + scale) + shift
    ours = blocks.AdaGroupNorm()
    variables = cv.from_official(state, jax.eval_shape(ours.init, jax.random.key(0), _nhwc(x), cond.numpy()),
                                 cv.Layout())
    np.testing.assert_allclose(ours.apply(variables, _nhwc(x), cond.numpy()), _nhwc(expected), atol=1e-5)


def test_self_attention_head_layout():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    n, c, h, w = 2, 64, 4, 3
    n_head = c // sizes.ATTN_HEAD_DIM
    state = _random_state({"norm.norm.weight": (c,), "norm.norm.bias": (c,), "qkv_proj.weight": (3 * c, c, 1, 1),
                           "qkv_proj.bias": (3 * c,), "out_proj.weight": (c, c, 1, 1), "out_proj.bias": (c,)}, seed=4,
                           scale=c ** -0.5)  # moderate attention logits, so that 1e-5 is a tight bound
    p = {k: torch.from_numpy(v) for k, v in state.items()}
    x = torch.randn(n, c, h, w)

    # The official equations: the qkv channels viewed as 3 * n_head groups of c / n_head channels, pixels as
    # tokens; the first n_head groups are the queries, then keys, then values.
    xn = F.group_norm(x, c // sizes.GN_GROUP_SIZE, p["norm.norm.weight"], p["norm.norm.bias"], eps=blocks.GN_EPS)
    qkv = F.conv2d(xn, p["qkv_proj.weight"], p["qkv_proj.bias"]).view(n, 3 * n_head, c // n_head, h * w)
    q, k, v = qkv.transpose(2, 3).chunk(3, dim=1)
    att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // n_head), dim=-1)
    y = (att @ v).transpose(2, 3).reshape(n, c, h, w)
    expected = xn + F.conv2d(y, p["out_proj.weight"], p["out_proj.bias"])

    ours = blocks.SelfAttention2d()
    variables = cv.from_official(state, jax.eval_shape(ours.init, jax.random.key(0), _nhwc(x)), cv.Layout())
    np.testing.assert_allclose(ours.apply(variables, _nhwc(x)), _nhwc(expected), atol=1e-5)


def test_upsample_is_nearest_then_conv():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    conv = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(4, 4, 3, padding=1)})
    x = torch.randn(2, 4, 3, 5)
    expected = conv["conv"](torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")).detach()
    ours = blocks.Upsample()
    variables = _ours_from_torch(ours, conv, _nhwc(x))
    np.testing.assert_allclose(ours.apply(variables, _nhwc(x)), _nhwc(expected), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The converter, end to end.

@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory, paper_variables):
    torch = pytest.importorskip("torch")
    return torch_save(torch, cv.agent_to_official(paper_variables), tmp_path_factory.mktemp("official") / "Breakout.pt")


def _check_converted(workdir, variables, checkpoint, game, num_actions):
    config, agent, loaded = ac.load_agent(workdir / "agent")
    assert_trees_equal(jax.tree.map(np.asarray, loaded), variables)
    assert agent.num_actions == num_actions and config.game == game
    info = ac.read_agent_info(workdir / "agent")
    assert info["game"] == game and info["num_actions"] == num_actions
    assert info["provenance"]["converted_from"] == str(checkpoint.resolve())
    assert info["provenance"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert json.loads((workdir / "config.json").read_text())["game"] == game
    return info


def test_convert_official_checkpoint(tmp_path, official_checkpoint, paper_config, paper_variables):
    agent_dir = cv.convert(official_checkpoint, tmp_path, paper_config, game="Breakout")
    assert agent_dir == (tmp_path / "agent").absolute()
    info = _check_converted(tmp_path, paper_variables, official_checkpoint, "Breakout", 4)
    assert info["provenance"]["source_format"] == "agent state dict"


def test_convert_command_line(tmp_path, official_checkpoint, paper_variables):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "diamond_jax.convert", str(official_checkpoint),
                          f"--workdir={tmp_path}", "--game=Breakout"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "4 actions, Breakout" in run.stdout
    _check_converted(tmp_path, paper_variables, official_checkpoint, "Breakout", 4)

    usage = subprocess.run([sys.executable, "-m", "diamond_jax.convert", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    for text in ("--workdir", "--game", "--config", "state.pt", "agent_epoch_XXXXX.pt", "pip install torch"):
        assert text in usage.stdout, text


def test_convert_trainer_state(tmp_path, debug_config, debug_variables):
    torch = pytest.importorskip("torch")
    agent = {k: torch.from_numpy(v) for k, v in cv.agent_to_official(debug_variables).items()}
    # Like the official trainer's checkpoints/state.pt: numpy arrays and Counters in the dataset states.
    dataset = {"is_static": False, "num_episodes": 2, "num_steps": 30, "start_idx": np.array([0, 10]),
               "lengths": np.array([10, 20]), "counter_rew": collections.Counter({0: 29, 1: 1}),
               "counter_end": collections.Counter({0: 29, 1: 1})}
    state = {"agent": collections.OrderedDict(agent), "train_dataset": dataset, "test_dataset": dataset,
             "opt": {"denoiser": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4}]}},
             "epoch": 3, "num_epochs_collect": None}
    path = tmp_path / "state.pt"
    torch.save(state, path)
    cv.convert(path, tmp_path / "run", debug_config, game="Breakout")
    info = _check_converted(tmp_path / "run", debug_variables, path, "Breakout", 4)
    assert info["provenance"]["source_format"] == "trainer state (its 'agent' entry)"


def test_num_actions_come_from_the_checkpoint(tmp_path, debug_config):
    torch = pytest.importorskip("torch")
    variables = random_like(ac.abstract_variables(Agent.from_config(debug_config, 6)), seed=5)
    path = torch_save(torch, cv.agent_to_official(variables), tmp_path / "Pong.pt")
    cv.convert(path, tmp_path, debug_config, game="Pong")
    _check_converted(tmp_path, variables, path, "Pong", 6)


def _convert_error(path, config, game="Breakout", workdir=None):
    workdir = workdir or path.parent / "out"
    with pytest.raises(cv.ConversionError) as e:
        cv.convert(path, workdir, config, game=game)
    assert not (workdir / "agent").exists()
    return str(e.value)


def test_every_bad_tensor_is_named(tmp_path, debug_config, debug_variables):
    torch = pytest.importorskip("torch")
    state = cv.agent_to_official(debug_variables)
    del state["denoiser.inner_model.conv_in.weight"], state["actor_critic.lstm.bias_hh"]
    state["rew_end_model.head.2.bias"] = np.zeros(5, np.float32)
    state["denoiser.inner_model.cond_proj.2.weight"] = np.zeros((3, 3), np.float32)
    state["rew_end_model.lstm.weight_hh_l0"] = state["rew_end_model.lstm.weight_hh_l0"].T.copy()
    message = _convert_error(torch_save(torch, state, tmp_path / "bad.pt"), debug_config)
    assert "bad.pt" in message and "5 problems" in message
    assert "missing denoiser.inner_model.conv_in.weight (shape (8, 15, 3, 3))" in message
    assert "missing actor_critic.lstm.bias_hh (shape (64,))" in message
    assert "unexpected rew_end_model.head.2.bias (shape (5,))" in message
    assert "mis-shaped denoiser.inner_model.cond_proj.2.weight: shape (3, 3), expected (16, 16)" in message
    assert "mis-shaped rew_end_model.lstm.weight_hh_l0: shape (16, 64), expected (64, 16)" in message


def test_checkpoint_of_another_architecture(tmp_path, official_checkpoint, debug_config):
    message = _convert_error(official_checkpoint, debug_config, workdir=tmp_path)
    assert "mis-shaped denoiser.inner_model.conv_in.weight: shape (64, 15, 3, 3), expected (8, 15, 3, 3)" in message
    assert "missing denoiser.inner_model.unet.d_blocks.0.resblocks.0.conv1.weight" not in message
    assert "unexpected denoiser.inner_model.unet.d_blocks.0.resblocks.1.conv1.weight" in message
    assert "Fix: use the config the checkpoint was trained with" in message


def test_integer_tensor_and_disagreeing_action_counts(tmp_path, debug_config, debug_variables):
    torch = pytest.importorskip("torch")
    state = cv.agent_to_official(debug_variables)
    state["actor_critic.critic_linear.bias"] = np.zeros(1, np.int64)
    message = _convert_error(torch_save(torch, state, tmp_path / "int.pt"), debug_config)
    assert "actor_critic.critic_linear.bias holds int64, expected floating point" in message

    state = cv.agent_to_official(debug_variables)
    state["actor_critic.actor_linear.weight"] = np.zeros((5, 16), np.float32)
    message = _convert_error(torch_save(torch, state, tmp_path / "acts.pt"), debug_config)
    assert "actor_critic.actor_linear.weight has 5" in message and "rew_end_model.act_emb.weight has 4" in message


def test_wrong_game(tmp_path, debug_config, debug_variables):
    torch = pytest.importorskip("torch")
    pytest.importorskip("envpool")
    path = torch_save(torch, cv.agent_to_official(debug_variables), tmp_path / "Breakout.pt")
    message = _convert_error(path, debug_config, game="Pong")
    assert "4 actions, but Pong has 6" in message and "--game=<Name>" in message


def test_files_that_are_not_agent_checkpoints(tmp_path, debug_config):
    torch = pytest.importorskip("torch")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert "notes.pt is not a PyTorch checkpoint that can be read safely" in _convert_error(text, debug_config)

    truncated = torch_save(torch, {"actor_critic.lstm.bias_ih": np.zeros(64, np.float32)}, tmp_path / "cut.pt")
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert "cut.pt is not a PyTorch checkpoint that can be read safely" in _convert_error(truncated, debug_config)

    other = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "step": 3}, other)
    message = _convert_error(other, debug_config)
    assert "other.pt holds no DIAMOND agent" in message and "keys ['model', 'step']" in message

    assert "does not exist" in _convert_error(tmp_path / "missing.pt", debug_config)


def test_without_torch(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(cv.ConversionError, match=r'pip install torch .*pip install -e "\.\[convert\]"'):
        cv.read_official_checkpoint(tmp_path / "Breakout.pt")


# ---------------------------------------------------------------------------------------------------------
# save_agent / load_agent.

def test_save_load_round_trip(tmp_path, debug_config, debug_variables):
    directory = ac.save_agent(tmp_path / "agent", debug_config, debug_variables, step=7)
    config, agent, variables = ac.load_agent(directory)
    assert agent == Agent.from_config(debug_config, 4)
    assert json.loads(config.to_json_best_effort()) == json.loads(debug_config.to_json_best_effort())
    assert config.world_model_env.sampler.s_tmax == float("inf")
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(variables))
    assert_trees_equal(jax.tree.map(np.asarray, variables), debug_variables)
    assert ac.read_agent_info(directory)["step"] == 7

    newer = random_like(ac.abstract_variables(Agent.from_config(debug_config, 4)), seed=9)
    ac.save_agent(tmp_path / "agent", debug_config, newer, step=8)
    assert_trees_equal(jax.tree.map(np.asarray, ac.load_agent(tmp_path / "agent")[2]), newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent"]


def test_save_rejects_variables_of_another_config(tmp_path, paper_config, debug_variables):
    with pytest.raises(ac.AgentCheckpointError, match="denoiser/params/conv_in/kernel: shape"):
        ac.save_agent(tmp_path / "agent", paper_config, debug_variables)
    assert not (tmp_path / "agent").exists()


def test_interrupted_saves_leave_the_previous_agent(tmp_path, monkeypatch, debug_config, debug_variables):
    directory = tmp_path / "agent"
    ac.save_agent(directory, debug_config, debug_variables, step=1)
    newer = random_like(ac.abstract_variables(Agent.from_config(debug_config, 4)), seed=3)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    # Cut while writing the variables.
    with monkeypatch.context() as m:
        m.setattr(ac.ocp.StandardCheckpointer, "save", crash)
        with pytest.raises(KeyboardInterrupt):
            ac.save_agent(directory, debug_config, newer, step=2)
    assert ac.read_agent_info(directory)["step"] == 1
    assert_trees_equal(jax.tree.map(np.asarray, ac.load_agent(directory)[2]), debug_variables)

    # Cut between moving the old agent aside and moving the new one in.
    replace = os.replace

    def replace_then_crash(src, dst):
        if Path(src).name.endswith(".saving"):
            raise KeyboardInterrupt
        replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(ac.os, "replace", replace_then_crash)
        with pytest.raises(KeyboardInterrupt):
            ac.save_agent(directory, debug_config, newer, step=2)
    assert not directory.exists()
    assert ac.read_agent_info(directory)["step"] == 1
    assert_trees_equal(jax.tree.map(np.asarray, ac.load_agent(directory)[2]), debug_variables)

    ac.save_agent(directory, debug_config, newer, step=3)
    assert_trees_equal(jax.tree.map(np.asarray, ac.load_agent(directory)[2]), newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent"]


@pytest.fixture()
def saved_agent(tmp_path, debug_config, debug_variables):
    return ac.save_agent(tmp_path / "agent", debug_config, debug_variables)


def _load_error(directory):
    with pytest.raises(ac.AgentCheckpointError) as e:
        ac.load_agent(directory)
    return str(e.value)


def test_missing_or_foreign_directories(tmp_path):
    assert "does not exist" in _load_error(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "is not an agent checkpoint: it has no agent.json" in _load_error(tmp_path / "empty")
    (tmp_path / "file").write_text("")
    assert "is a file" in _load_error(tmp_path / "file")


def test_corrupt_description(saved_agent):
    (saved_agent / "agent.json").write_text('{"format": "diamond_jax.agent", "num_act')
    message = _load_error(saved_agent)
    assert "agent.json is corrupt" in message and "Fix:" in message


def test_description_of_another_agent(saved_agent):
    info = json.loads((saved_agent / "agent.json").read_text())
    (saved_agent / "agent.json").write_text(json.dumps({**info, "num_actions": 5}))
    message = _load_error(saved_agent)
    assert "actor_critic/params/actor_linear/kernel: shape (16, 4), expected (16, 5)" in message


def test_corrupt_or_missing_variable_files(saved_agent):
    data = sorted(p for p in (saved_agent / "variables").rglob("*") if p.is_file() and p.stat().st_size > 1000)
    data[0].write_bytes(data[0].read_bytes()[:-10])
    message = _load_error(saved_agent)
    assert f"{data[0].relative_to(saved_agent).as_posix()} has changed since it was saved" in message

    (saved_agent / "variables" / "manifest.ocdbt").unlink()
    assert "variables/manifest.ocdbt is missing" in _load_error(saved_agent)
