"""An agent on disk: the three models' variables and the config that builds them, in one directory.

    <directory>/agent.json   format marker, config, num_actions, game, step, provenance, file digests
    <directory>/variables/   the variables of Agent.init's structure (an orbax checkpoint)

`save_agent` writes the new agent beside the old one and swaps the two with renames, so an interrupted
save leaves the previous agent in place (or, if cut between the two renames, next to it, where
`load_agent` finds it). `load_agent` checks every file against its sha256 and every stored shape against
the config before restoring.
"""

import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import config_dict

from diamond_jax import config as config_lib
from diamond_jax.agent import Agent, AgentVariables, LatentSpace

FORMAT = "diamond_jax.agent"
FORMAT_VERSION = 1
INFO_FILE = "agent.json"
VARIABLES_DIR = "variables"

PathLike = Union[str, os.PathLike]


class AgentCheckpointError(Exception):
    """An agent directory that cannot be saved or loaded; the message names the file and the fix."""


def save_agent(directory: PathLike, config: config_dict.ConfigDict, variables: AgentVariables,
               step: Optional[int] = None, provenance: Optional[Dict[str, Any]] = None,
               latent: Optional[LatentSpace] = None) -> Path:
    """Writes the agent to `directory`, replacing any agent there only once the new one is complete. A latent
    agent's variables hold its autoencoder's, and `latent` its architecture and sigma_data (in agent.json)."""
    directory = Path(directory).absolute()
    num_actions = _num_actions(variables)
    expected = abstract_variables(Agent.from_config(config, num_actions, latent))
    problems = _shape_problems(_shapes(variables), _shapes(expected))
    if problems:
        raise AgentCheckpointError(
            f"Not saving to {directory}: the variables do not fit the config's agent with {num_actions} "
            "actions:\n  " + "\n  ".join(problems) + "\nFix: pass the config the variables were built with.")
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "num_actions": num_actions,
        "game": config.game,
        "step": None if step is None else int(step),  # a jax or numpy integer is not JSON
        "provenance": provenance or {},
        "config": json.loads(config.to_json_best_effort()),
    }
    if latent is not None:
        info["latent"] = latent.to_json()
    staging, previous = _sibling(directory, "saving"), _sibling(directory, "previous")
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove(staging)  # left by an interrupted save
    if directory.exists():
        _remove(previous)  # left by a save interrupted after its swap; `directory` is the newer agent
    _write(staging, info, variables)
    if directory.exists():
        os.replace(directory, previous)
    os.replace(staging, directory)
    _remove(previous)
    return directory


def load_agent(directory: PathLike) -> Tuple[config_dict.ConfigDict, Agent, AgentVariables]:
    """The config, the agent and its variables (jax arrays on the default device) saved in `directory`."""
    directory = _existing_agent_dir(Path(directory).absolute())
    info = _read_info(directory)
    try:
        config = _config_from_json(info["config"])
        num_actions = int(info["num_actions"])
        latent = LatentSpace.from_json(info["latent"]) if "latent" in info else None
        agent = Agent.from_config(config, num_actions, latent)
        abstract = abstract_variables(agent)
    except Exception as e:
        raise AgentCheckpointError(
            f"{directory / INFO_FILE}: its config cannot build an agent ({type(e).__name__}: {e}). Fix: "
            "re-save the agent, or re-convert it with python -m diamond_jax.convert.") from e
    _check_files(directory, info.get("files"))
    return config, agent, _restore(directory / VARIABLES_DIR, abstract)


def read_agent_info(directory: PathLike) -> Dict[str, Any]:
    """The contents of agent.json: config, num_actions, game, step, provenance and file digests."""
    return _read_info(_existing_agent_dir(Path(directory).absolute()))


def _read_info(directory: Path) -> Dict[str, Any]:
    path = directory / INFO_FILE
    if not path.is_file():
        raise AgentCheckpointError(
            f"{directory} is not an agent checkpoint: it has no {INFO_FILE}. Fix: pass the directory that "
            "save_agent wrote (a run's <workdir>/agent, or the one python -m diamond_jax.convert made).")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AgentCheckpointError(f"{path} is corrupt ({e}). Fix: re-save or re-convert the agent.") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise AgentCheckpointError(f"{path} is not a diamond_jax agent description (no \"format\": "
                                   f"\"{FORMAT}\"). Fix: re-save or re-convert the agent.")
    if info.get("format_version") != FORMAT_VERSION:
        raise AgentCheckpointError(
            f"{path} has format version {info.get('format_version')!r}; this code reads version "
            f"{FORMAT_VERSION}. Fix: use the diamond_jax version that wrote it, or re-convert the agent.")
    missing = [k for k in ("config", "num_actions", "game") if k not in info]
    if missing:
        raise AgentCheckpointError(f"{path} is corrupt: it lacks {', '.join(missing)}. Fix: re-save or "
                                   "re-convert the agent.")
    return info


def abstract_variables(agent: Agent) -> AgentVariables:
    """Shapes and dtypes of agent.init's variables, without computing them."""
    return jax.tree.map(lambda x: x, _abstract_variables(agent))


@functools.lru_cache(maxsize=4)
def _abstract_variables(agent: Agent) -> AgentVariables:
    # Tracing the paper's models takes about a second, and a run saves the same agent at every checkpoint.
    return jax.eval_shape(agent.init, jax.random.key(0))


def _num_actions(variables: AgentVariables) -> int:
    try:
        return int(np.shape(variables["actor_critic"]["params"]["actor_linear"]["kernel"])[-1])
    except (KeyError, TypeError, IndexError) as e:
        raise AgentCheckpointError(
            "save_agent needs the variables of Agent.init ({'denoiser', 'rew_end_model', 'actor_critic'} -> "
            f"{{'params', 'buffers'}}); the policy head actor_critic/params/actor_linear/kernel is missing ({e})."
        ) from e


def _sibling(directory: Path, role: str) -> Path:
    # Hidden, and in the same parent so that renames stay on one filesystem.
    return directory.with_name(f".{directory.name}.{role}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write(directory: Path, info: Dict[str, Any], variables: AgentVariables) -> None:
    directory.mkdir()
    # Host copies: the stored arrays then carry no device layout, and any sharding restores. This process alone
    # writes: in a run of several processes only the first saves the agent, and orbax must not wait for the rest.
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as checkpointer:
        checkpointer.save(directory / VARIABLES_DIR, jax.device_get(variables))
        checkpointer.wait_until_finished()
    info = {**info, "files": _file_digests(directory)}
    with open(directory / INFO_FILE, "w") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_digests(directory: Path) -> Dict[str, str]:
    files = sorted(p for p in (directory / VARIABLES_DIR).rglob("*") if p.is_file())
    return {p.relative_to(directory).as_posix(): file_sha256(p) for p in files}


def _check_files(directory: Path, digests: Any) -> None:
    """Names the damaged files before orbax meets them: its own errors name arrays, not files."""
    fix = "Fix: re-save the agent, or re-convert it with python -m diamond_jax.convert."
    if not isinstance(digests, dict) or not digests:
        raise AgentCheckpointError(f"{directory / INFO_FILE} is corrupt: it lists no variable files. {fix}")
    problems = [f"{name} is missing" if not (directory / name).is_file() else f"{name} has changed since it was saved"
                for name, digest in sorted(digests.items())
                if not (directory / name).is_file() or file_sha256(directory / name) != digest]
    if problems:
        raise AgentCheckpointError(f"The agent checkpoint {directory} is corrupt: " + "; ".join(problems) + f". {fix}")


def _existing_agent_dir(directory: Path) -> Path:
    if directory.is_dir():
        return directory
    previous = _sibling(directory, "previous")
    if (previous / INFO_FILE).is_file():
        logging.warning("%s is missing: a save was interrupted while swapping agents; loading the previous "
                        "agent from %s (the next save_agent cleans this up).", directory, previous)
        return previous
    if directory.exists():
        raise AgentCheckpointError(f"{directory} is a file, not an agent checkpoint directory. Fix: pass the "
                                   "directory that save_agent wrote (e.g. <workdir>/agent).")
    raise AgentCheckpointError(
        f"No agent checkpoint at {directory}: the directory does not exist. Fix: check the path, train an agent "
        "(python -m diamond_jax.main --workdir=W writes W/agent) or convert an official checkpoint "
        "(python -m diamond_jax.convert PATH.pt --workdir=W).")


def _config_from_json(tree: Dict[str, Any]) -> config_dict.ConfigDict:
    # JSON has no tuples; every sequence in our configs is one.
    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x

    config = config_dict.ConfigDict(tuples(tree))
    config_lib.validate(config)
    return config.lock()


def _shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _shape_problems(got: Dict[str, Tuple[int, ...]], expected: Dict[str, Tuple[int, ...]]) -> List[str]:
    problems = [f"missing {k} {expected[k]}" for k in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected {k} {got[k]}" for k in sorted(got.keys() - expected.keys())]
    problems += [f"{k}: shape {got[k]}, expected {expected[k]}"
                 for k in sorted(got.keys() & expected.keys()) if got[k] != expected[k]]
    return problems


def _restore(path: Path, abstract: AgentVariables) -> AgentVariables:
    fix = "Fix: re-save the agent, or re-convert it with python -m diamond_jax.convert."
    if not path.is_dir():
        raise AgentCheckpointError(f"The agent checkpoint is corrupt: {path} is missing. {fix}")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            metadata = checkpointer.metadata(path).item_metadata
        except Exception as e:
            raise AgentCheckpointError(
                f"The agent checkpoint is corrupt: cannot read {path} ({_brief(e)}). {fix}") from e
        if metadata is None:
            raise AgentCheckpointError(f"The agent checkpoint is corrupt: the array metadata in {path} is "
                                       f"missing or unreadable. {fix}")
        # Orbax would silently pad or crop an array restored into a different shape.
        problems = _shape_problems(_shapes(metadata.tree), _shapes(abstract))
        if problems:
            raise AgentCheckpointError(
                f"{path} does not hold the agent that {path.parent / INFO_FILE} describes:\n  "
                + "\n  ".join(problems) + f"\n{fix}")
        try:
            return checkpointer.restore(path, target)
        except Exception as e:
            raise AgentCheckpointError(f"The agent checkpoint is corrupt: restoring {path} failed ({_brief(e)}). "
                                       f"{fix}") from e


def _brief(e: Exception) -> str:
    # Tensorstore errors run over dozens of lines; the first says what failed.
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
