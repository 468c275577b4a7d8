"""Converts an official DIAMOND PyTorch checkpoint into a diamond_jax agent.

    python -m diamond_jax.convert Breakout.pt --workdir=runs/Breakout-official --game=Breakout

Accepted checkpoints (read with torch.load(weights_only=True): no code in the file is run):
  - an agent state dict, keys denoiser.*, rew_end_model.*, actor_critic.*: the official release's
    atari_100k/models/<Game>.pt, or a run's checkpoints/agent_versions/agent_epoch_XXXXX.pt;
  - a run's checkpoints/state.pt: its "agent" entry is that state dict (optimisers and datasets are ignored).

Writes <workdir>/agent (read it with diamond_jax.training.agent_checkpoint.load_agent) and
<workdir>/config.json. The architecture is --config's (the default, configs/atari100k.py, is the official
release's); every tensor that does not fit it is reported. The number of actions is read from the
checkpoint and checked against the action set of the game: --game, else the config's game.

Needs PyTorch: pip install torch (or pip install -e ".[convert]").
"""

import contextlib
import copy
import dataclasses
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np
from ml_collections import config_dict

from diamond_jax import config as config_lib
from diamond_jax import envs
from diamond_jax.agent import MODEL_NAMES, Agent, AgentVariables
from diamond_jax.config_files import config_file
from diamond_jax.training.agent_checkpoint import (
    AgentCheckpointError, abstract_variables, file_sha256, read_agent_info, save_agent)

DEFAULT_CONFIG = config_file("atari100k")

StateDict = Dict[str, np.ndarray]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names every offending tensor and the fix."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one of our models sits in the official state dict, beyond the rule shared by all names: our
    module path `unet/d_blocks_0/resblocks_1/norm1/linear` is the official `unet.d_blocks.0.resblocks.1.norm1.linear`
    and our leaf names become PyTorch's (`_LEAF_NAMES`)."""

    prefix: str = ""  # of every key, with its trailing dot
    lstm_suffix: str = ""  # "_l0" for an nn.LSTM (one layer), "" for an nn.LSTMCell
    renames: Tuple[Tuple[str, str], ...] = ()  # (our dotted module path prefix, the official one)


AGENT_LAYOUTS = {
    "denoiser": Layout("denoiser.inner_model."),
    "rew_end_model": Layout("rew_end_model.", lstm_suffix="_l0"),
    # The official ActorCritic.encoder wraps its nn.Sequential in an attribute also named `encoder`.
    "actor_critic": Layout("actor_critic.", renames=(("encoder", "encoder.encoder"),)),
}

# Official tensors whose first axis is the number of actions.
ACTION_KEYS = ("denoiser.inner_model.act_emb.0.weight", "rew_end_model.act_emb.weight",
               "actor_critic.actor_linear.weight")

# Our parameter name -> PyTorch's (Flax Dense/Conv kernels, GroupNorm scales and Embed tables are all `weight`).
_LEAF_NAMES = {
    "kernel": "weight", "scale": "weight", "embedding": "weight", "weight": "weight", "bias": "bias",
    "kernel_ih": "weight_ih", "kernel_hh": "weight_hh", "bias_ih": "bias_ih", "bias_hh": "bias_hh",
}
_LSTM_LEAVES = ("kernel_ih", "kernel_hh", "bias_ih", "bias_hh")
_INDEXED = re.compile(r"(.+)_(\d+)")


class _Entry(NamedTuple):
    path: Tuple[str, ...]  # keys into our variables: (collection, *modules, leaf)
    perm: Optional[Tuple[int, ...]]  # our axes in PyTorch's order; None: same layout
    shape: Tuple[int, ...]  # the official shape


def _keys(key_path) -> Tuple[str, ...]:
    return tuple(str(k.key) for k in key_path)


def _module_name(name: str) -> str:
    # Our `d_blocks_0` is the official ModuleList/Sequential member `d_blocks.0`.
    m = _INDEXED.fullmatch(name)
    return f"{m[1]}.{m[2]}" if m else name


def _permutation(leaf: str, ndim: int) -> Optional[Tuple[int, ...]]:
    if leaf == "kernel" and ndim == 4:
        return (3, 2, 0, 1)  # HWIO -> OIHW
    if leaf in ("kernel", "kernel_ih", "kernel_hh"):
        return (1, 0)  # [in, out] -> [out, in]
    return None


def official_key(path: Sequence[str], layout: Layout) -> str:
    """The official state dict key of our variable at `path` = (collection, *modules, leaf)."""
    _, *modules, leaf = path
    if leaf not in _LEAF_NAMES:
        raise KeyError(f"no official name for our variable {'/'.join(path)}: add a rule to convert._LEAF_NAMES")
    dotted = ".".join(map(_module_name, modules))
    for ours, theirs in layout.renames:
        if dotted == ours or dotted.startswith(ours + "."):
            dotted = theirs + dotted[len(ours):]
    name = _LEAF_NAMES[leaf] + (layout.lstm_suffix if leaf in _LSTM_LEAVES else "")
    return layout.prefix + ".".join(filter(None, (dotted, name)))


def key_map(variables: Any, layout: Layout) -> Dict[str, _Entry]:
    """Official key -> our path, axis permutation and the official shape, for every array of `variables`
    (or of their jax.eval_shape)."""
    entries = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        path = _keys(key_path)
        perm = _permutation(path[-1], len(leaf.shape))
        shape = tuple(leaf.shape[i] for i in perm) if perm else tuple(leaf.shape)
        key = official_key(path, layout)
        assert key not in entries, f"{'/'.join(path)} and {'/'.join(entries[key].path)} both map to {key}"
        entries[key] = _Entry(path, perm, shape)
    return entries


def to_official(variables: Any, layout: Layout) -> StateDict:
    """Our variables as an official state dict of numpy arrays."""
    flat = {_keys(p): v for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    return {key: np.transpose(np.asarray(flat[e.path]), e.perm) if e.perm else np.asarray(flat[e.path])
            for key, e in key_map(variables, layout).items()}


def from_official(state_dict: Mapping[str, Any], abstract: Any, layout: Layout) -> Any:
    """Official tensors (numpy arrays) -> our variables, in the structure and dtypes of `abstract`.
    Raises ConversionError naming every missing, unexpected or mis-shaped tensor."""
    return _from_official(state_dict, {"": (abstract, layout)})[""]


def agent_to_official(variables: AgentVariables) -> StateDict:
    """The agent's variables as the official `agent.state_dict()`, numpy arrays."""
    return {k: v for name in MODEL_NAMES for k, v in to_official(variables[name], AGENT_LAYOUTS[name]).items()}


def agent_from_official(state_dict: Mapping[str, Any], agent: Agent) -> AgentVariables:
    """An official agent state dict (numpy arrays) -> the variables of `agent`, checked all at once."""
    abstract = abstract_variables(agent)
    return _from_official(state_dict, {name: (abstract[name], AGENT_LAYOUTS[name]) for name in MODEL_NAMES})


def _from_official(state_dict: Mapping[str, Any], models: Dict[str, Tuple[Any, Layout]]) -> Dict[str, Any]:
    expected = {key: (name, entry) for name, (abstract, layout) in models.items()
                for key, entry in key_map(abstract, layout).items()}
    problems = [f"missing {k} (shape {expected[k][1].shape})" for k in sorted(expected.keys() - state_dict.keys())]
    problems += [f"unexpected {k} (shape {tuple(np.shape(state_dict[k]))})"
                 for k in sorted(state_dict.keys() - expected.keys())]
    for k in sorted(expected.keys() & state_dict.keys()):
        value, want = np.asarray(state_dict[k]), expected[k][1].shape
        if value.shape != want:
            problems.append(f"mis-shaped {k}: shape {value.shape}, expected {want}")
        elif not np.issubdtype(value.dtype, np.floating):
            problems.append(f"{k} holds {value.dtype}, expected floating point")
    if problems:
        raise ConversionError(
            f"the state dict does not fit our model ({len(problems)} problems):\n  " + "\n  ".join(problems)
            + "\nFix: use the config the checkpoint was trained with (for python -m diamond_jax.convert: --config and "
            "--config.<field>=<value>; the official release's is the default, configs/atari100k.py), and check that "
            "the file is a complete official checkpoint.")

    values = {}
    for key, (name, entry) in expected.items():
        value = np.asarray(state_dict[key])
        # argsort inverts the permutation: PyTorch's axes back to ours.
        values[name, entry.path] = np.transpose(value, np.argsort(entry.perm)) if entry.perm else value

    def fill(name: str, key_path, leaf) -> np.ndarray:
        return values[name, _keys(key_path)].astype(leaf.dtype)

    return {name: jax.tree_util.tree_map_with_path(lambda p, leaf, n=name: fill(n, p, leaf), abstract)
            for name, (abstract, _) in models.items()}


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ConversionError("Reading a PyTorch checkpoint needs PyTorch, which is not installed. Fix: "
                              "pip install torch (the CPU build is enough), or pip install -e \".[convert]\".") from e
    return torch


def _numpy_array_globals() -> List[Any]:
    """What torch's weights_only unpickler needs for the numeric numpy arrays of the trainer's dataset state;
    arrays of Python objects stay refused."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    codes = np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"
    return [multiarray._reconstruct, np.ndarray, np.dtype, *{type(np.dtype(c)) for c in codes}]


def read_official_checkpoint(path: os.PathLike) -> Tuple[StateDict, str]:
    """The agent state dict in an official checkpoint, as float32 numpy arrays, and what kind of file held it."""
    torch = _import_torch()
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist or is not a file. Fix: pass the path of a .pt checkpoint.")
    # torch < 2.5 has no safe_globals: it reads agent state dicts but not the trainer's state.pt.
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow(_numpy_array_globals()) if allow else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint that can be read safely ({type(e).__name__}: {detail}). Fix: pass "
            "an official agent checkpoint (the release's atari_100k/models/<Game>.pt, or a run's "
            "checkpoints/agent_versions/agent_epoch_XXXXX.pt or checkpoints/state.pt), downloaded completely."
        ) from e
    state_dict, source = _agent_state_dict(obj, path)
    arrays, problems = {}, []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.is_floating_point():
            arrays[key] = value.detach().to(torch.float32).numpy()
        else:
            arrays[key] = value.detach().numpy()
    if problems:
        raise ConversionError(f"{path}: " + "; ".join(problems) + ". Fix: pass an official agent checkpoint.")
    return arrays, source


def _is_agent_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(
        isinstance(k, str) and k.startswith(tuple(f"{name}." for name in MODEL_NAMES)) for k in obj)


def _agent_state_dict(obj: Any, path: Path) -> Tuple[Mapping[str, Any], str]:
    if _is_agent_state_dict(obj):
        return obj, "agent state dict"
    if isinstance(obj, Mapping) and _is_agent_state_dict(obj.get("agent")):
        return obj["agent"], "trainer state (its 'agent' entry)"
    found = f"keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise ConversionError(
        f"{path} holds no DIAMOND agent: expected a state dict with keys denoiser.*, rew_end_model.*, "
        f"actor_critic.*, or a trainer state whose 'agent' entry is one; found {found}. Fix: pass the release's "
        "atari_100k/models/<Game>.pt, or a run's checkpoints/agent_versions/agent_epoch_XXXXX.pt or state.pt.")


def infer_num_actions(state_dict: Mapping[str, np.ndarray]) -> int:
    """The number of actions, read from the action embeddings and the policy head, which must agree."""
    counts = {k: state_dict[k].shape[0] for k in ACTION_KEYS if k in state_dict and state_dict[k].ndim > 0}
    if not counts:
        raise ConversionError(f"cannot tell the number of actions: none of {', '.join(ACTION_KEYS)} is in the "
                              "checkpoint. Fix: pass a complete official agent checkpoint.")
    if len(set(counts.values())) > 1:
        raise ConversionError("the action embeddings and the policy head disagree on the number of actions: "
                              + ", ".join(f"{k} has {n}" for k, n in counts.items())
                              + ". Fix: pass an intact official agent checkpoint.")
    return next(iter(counts.values()))


def _game_num_actions(config: config_dict.ConfigDict) -> Optional[int]:
    try:
        return envs.num_actions(config)
    except ImportError:  # no envpool: the checkpoint's count is taken as given
        return None


def _write_text_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.saving")
    staging.write_text(text)
    os.replace(staging, path)


def check_official_conditioning(config: config_dict.ConfigDict) -> None:
    """Official checkpoints hold frame-stack denoisers without null inputs (README "Conditioning variants"):
    refuses a config of another variant before anything is read."""
    d = config.denoiser
    for field, official in (("conditioning", "frame_stack"), ("condition_dropout", 0.0)):
        if d.get(field, official) != official:
            raise ConversionError(
                f"config.denoiser.{field}={d[field]!r}: official checkpoints are frame-stack denoisers trained "
                f"without condition dropout, which this converter maps onto; it converts no other variant. Fix: "
                f"--config.denoiser.{field}={official} (the default).")


def convert(checkpoint: os.PathLike, workdir: os.PathLike, config: config_dict.ConfigDict,
            game: Optional[str] = None) -> Path:
    """Converts `checkpoint` into <workdir>/agent and <workdir>/config.json; returns the agent directory."""
    path = Path(checkpoint)
    check_official_conditioning(config)
    state_dict, source = read_official_checkpoint(path)
    num_actions = infer_num_actions(state_dict)

    config = copy.deepcopy(config)
    config.game = game or config.game
    config_lib.validate(config)
    game_actions = _game_num_actions(config)
    if game_actions is None:
        logging.warning("envpool is not installed: cannot check that %s has %d actions; taking the checkpoint's "
                        "count as given.", config.game, num_actions)
    elif game_actions != num_actions:
        raise ConversionError(
            f"{path} is for a game with {num_actions} actions, but {config.game} has {game_actions} "
            f"(config.env.full_action_space={config.env.full_action_space}). Fix: pass the game the checkpoint "
            "was trained on, --game=<Name>.")

    agent = Agent.from_config(config, num_actions)
    try:
        variables = agent_from_official(state_dict, agent)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    provenance = {"converted_from": str(path.resolve()), "sha256": file_sha256(path), "source_format": source}
    workdir = Path(workdir)
    agent_dir = save_agent(workdir / "agent", config, variables, provenance=provenance)
    _write_text_atomically(workdir / "config.json", config.to_json_best_effort(indent=2))
    return agent_dir


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", str(DEFAULT_CONFIG),
        "Config of the agent's architecture, e.g. configs/atari100k.py or configs/atari100k.py:game=Pong; "
        "fields can be overridden with --config.<field>=<value>.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory to write <workdir>/agent and <workdir>/config.json to; an "
                        "agent already there is replaced.", required=True)
    flags.DEFINE_string("game", None, "Atari 100k game the checkpoint plays (checked against its number of "
                        "actions and recorded with the agent); default: the config's game.")


def main(argv: Sequence[str]) -> None:
    from absl import app, flags
    from absl import logging as absl_logging

    if len(argv) != 2:
        raise app.UsageError("expected one checkpoint: python -m diamond_jax.convert PATH.pt --workdir=DIR")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every step of a save at INFO
    try:
        agent_dir = convert(argv[1], flags.FLAGS.workdir, flags.FLAGS.config, flags.FLAGS.game)
    except (ConversionError, config_lib.ConfigError, AgentCheckpointError) as e:
        sys.exit(f"error: {e}")
    info = read_agent_info(agent_dir)
    print(f"Converted {argv[1]} ({info['provenance']['source_format']}, {info['num_actions']} actions, "
          f"{info['game']}) into {agent_dir}; load it with diamond_jax.training.agent_checkpoint.load_agent.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
