"""Playing a game inside a trained world model, or in the real game, one frame at a time.

- Key maps: an Atari action is a combination of directions (w a s d) and FIRE (space), as in the official
  play tool; `keymap(game)` binds every action of the game's action set to its keys.
- `play_real`: real frames and actions, the policy (or NOOP) acting; the world model's initial conditions
  are the first num_steps_conditioning frames of such a trajectory.
- `WorldModelPlayEnv` and `RealPlayEnv`: the two environments of `python -m diamond_jax.play`, each with
  its own episode and actor-critic state, stepped by a human's action or the policy's (world models of
  recorded play have their own, world_model/watch.py, an `ImaginedPlayEnv` as well).
- `PlaySession`: what the player controls (who acts, which env, the horizon, pause), independent of
  pygame: the window in diamond_jax/play.py turns key presses into its commands.

Nothing here imports pygame: keys are pygame's key names ("w", "space", "return").
"""

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from diamond_jax import imagination
from diamond_jax.agent import Agent, AgentVariables
from diamond_jax.data.batch import obs_from_frames
from diamond_jax.envs.base import Env
from diamond_jax.envs.collect import policy_step_fn
from diamond_jax.imagination import ImaginationState, InitialConditions
from diamond_jax.training.agent_checkpoint import AgentCheckpointError, load_agent


class UsageError(Exception):
    """A bad input to the play or dream tool; the message names the problem and the fix."""


def load_run_agent(workdir: str):
    """(config, Agent, variables) of the agent in a run directory, <workdir>/agent."""
    if (Path(workdir) / "agent.json").is_file():
        raise UsageError(f"{workdir} is an agent directory; --workdir takes the run directory that holds it. "
                         f"Fix: --workdir={Path(workdir).parent}")
    try:
        return load_agent(Path(workdir) / "agent")
    except AgentCheckpointError as e:
        raise UsageError(f"cannot load the agent of --workdir={workdir}: {e}") from e


# The key of each part of an action's name; an action takes all the keys of its parts (UPRIGHTFIRE: w+d+space).
ACTION_PART_KEYS = (("UP", "w"), ("DOWN", "s"), ("RIGHT", "d"), ("LEFT", "a"), ("FIRE", "space"))
NOOP = 0  # the first action of every Atari action set, taken when no action key is held (see noop_action)

Keymap = Dict[Tuple[str, ...], int]  # key names -> action index


def action_keys(name: str) -> Tuple[str, ...]:
    """The keys of an ALE action name; NOOP has none."""
    return tuple(key for part, key in ACTION_PART_KEYS if part in name)


def keymap(names: Sequence[str]) -> Keymap:
    """Every action of a game but NOOP, by its keys; `names` are the game's action names by index
    (`envs.action_names(config)`)."""
    return {action_keys(name): i for i, name in enumerate(names) if name != "NOOP"}


def key_table(title: str, rows: Sequence[Tuple[str, Sequence[str]]]) -> str:
    """A title, then an action (or a component of one) per line with its keys."""
    return "\n".join([title] + [f"  {name:<14} {' + '.join(keys) or '(no key)'}" for name, keys in rows])


def noop_action(names: Sequence[str]) -> int:
    """The index of NOOP: 0 in Atari's and MinAtar's action sets, 1 in Catch's (LEFT NOOP RIGHT)."""
    return list(names).index("NOOP") if "NOOP" in names else NOOP


def action_from_keys(keys: Keymap, pressed: Collection[str], noop: int = NOOP) -> int:
    """The action whose keys are all pressed, the one with most keys if several are (w+d is UPRIGHT, not
    UP), the first in action order on a tie; `noop` if none. A game without UPRIGHT moves UP or RIGHT on w+d."""
    held = [(len(combo), -act) for combo, act in keys.items() if set(combo) <= set(pressed)]
    return -max(held)[1] if held else noop


class HeldKeys:
    """The human's action from the keys held (or tapped since the last frame): see action_from_keys."""

    def __init__(self, keys: Keymap, noop: int = NOOP):
        self.keys, self.noop = keys, noop

    def __call__(self, held: Set[str], pressed: Set[str]) -> int:
        return action_from_keys(self.keys, held | pressed, self.noop)


class PlayControls(NamedTuple):
    """What the play window needs to know of a run besides its session."""

    frame_shape: Tuple[int, int]  # (height, width) of the frames shown
    # (keys held, keys pressed since the last frame) -> the human's action; None where the keyboard cannot act
    key_action: Optional[Callable[[Set[str], Set[str]], Any]]
    act_name: Callable[[Any], str]  # an action as the window's header shows it
    keys_text: str  # the actions' keys and the controls, printed at start


def to_frame(obs: jax.Array) -> np.ndarray:
    """Observations in [-1, 1] -> uint8 frames, the inverse of obs_from_frames on the 256-level grid."""
    return np.clip(np.round((np.asarray(obs) + 1) * 127.5), 0, 255).astype(np.uint8)


class RealTrajectory(NamedTuple):
    frames: np.ndarray  # uint8 [b, T + 1, h, w, 3]: the first frame, then the frame reached by each step
    act: np.ndarray  # int32 [b, T], taken at frames[:, t]
    rew: np.ndarray  # float32 [b, T], raw
    end: np.ndarray  # bool [b, T]
    trunc: np.ndarray  # bool [b, T]


def play_real(env: Env, agent: Agent, variables: AgentVariables, num_steps: int, key: jax.Array,
              policy: bool = True) -> RealTrajectory:
    """Resets the envs and plays num_steps >= 1 steps in each, the policy acting (epsilon 0) or NOOP.

    The frame reached by a step is the one it ended on when an episode ends (envs restart behind it).
    """
    policy_step = policy_step_fn(agent.actor_critic)
    obs = env.reset()
    hx_cx = agent.actor_critic.initial_state(env.num_envs)
    frames, acts, steps = [obs], [], []
    for key_t in jax.random.split(key, num_steps):
        if policy:
            act, hx_cx = policy_step(variables["actor_critic"], obs, hx_cx, key_t, 0.0)
            act = np.asarray(act)
        else:
            act = np.full(env.num_envs, noop_action(env.action_names), np.int32)
        step = env.step(act)
        # An env whose episode ended goes on with a new one, which the actor-critic starts from a zero state.
        dead = (step.end | step.trunc)[:, None]
        hx_cx = tuple(jnp.where(dead, 0.0, x) for x in hx_cx)
        frames.append(step.final_obs)
        acts.append(act)
        steps.append(step)
        obs = step.obs
    return RealTrajectory(np.stack(frames, axis=1), np.stack(acts, axis=1).astype(np.int32),
                          np.stack([s.rew for s in steps], axis=1), np.stack([s.end for s in steps], axis=1),
                          np.stack([s.trunc for s in steps], axis=1))


def initial_conditions(traj: RealTrajectory, num_steps_conditioning: int) -> InitialConditions:
    """The first num_steps_conditioning frames of real trajectories and the actions taken at them."""
    n = num_steps_conditioning
    return InitialConditions(obs_from_frames(jnp.asarray(traj.frames[:, :n])), jnp.asarray(traj.act[:, :n]))


@functools.lru_cache(maxsize=4)
def start_fn(agent: Agent):
    """start(variables, InitialConditions) -> ImaginationState, both LSTMs burnt in (jitted)."""
    return jax.jit(lambda variables, init: imagination.initial_state(imagination.burn_in(agent, variables, init)))


@functools.lru_cache(maxsize=4)
def play_step_fn(agent: Agent):
    """play_step(variables, state, human_act int32 [b], key) -> (act, WorldModelStep, state): one imagined
    step in which the policy acts where human_act < 0. The actor-critic sees every frame, whoever acts, so
    that the policy can take over at any time with an up-to-date LSTM state."""

    @jax.jit
    def play_step(variables, state: ImaginationState, human_act: jax.Array, key: jax.Array):
        key_act, key_wm = jax.random.split(key)
        ac_out = agent.actor_critic.predict_act_value(variables["actor_critic"], state.obs[:, -1], state.ac_hx_cx)
        policy_act = jax.random.categorical(key_act, ac_out.logits_act)
        act = jnp.where(human_act >= 0, human_act, policy_act).astype(jnp.int32)
        out, state = imagination.world_model_step(agent, variables, state, act, ac_out.hx_cx, key_wm)
        return act, out, state

    return play_step


class Transition(NamedTuple):
    act: Any  # an action index, or a tuple of floats for a vector action (world models of recorded play)
    rew: float
    end: bool
    trunc: bool


class ImaginedPlayEnv:
    """A game inside a world model, whose episodes PlaySession's horizon commands cut short: `horizon` steps
    (0: no limit) after the `t` steps imagined so far."""

    name = "world model"
    horizon = 0
    t = 0

    def at_horizon(self) -> bool:
        return 0 < self.horizon <= self.t


class WorldModelPlayEnv(ImaginedPlayEnv):
    """One imagined game. Each episode starts from a new initial condition taken from a real test env and
    lasts until the reward/end model samples an end, or `horizon` steps (0: no limit) have been imagined."""

    def __init__(self, agent: Agent, variables: AgentVariables, real_env: Env, num_steps_conditioning: int,
                 horizon: int, init_policy: bool = True):
        self.agent, self.variables = agent, variables
        self.real_env = real_env
        self.num_steps_conditioning = num_steps_conditioning
        self.horizon = horizon
        self.init_policy = init_policy
        self.state: Optional[ImaginationState] = None
        self.t = 0

    def reset(self, key: jax.Array) -> None:
        traj = play_real(self.real_env, self.agent, self.variables, self.num_steps_conditioning, key, self.init_policy)
        self.state = start_fn(self.agent)(self.variables, initial_conditions(traj, self.num_steps_conditioning))
        self.t = 0

    @property
    def frame(self) -> np.ndarray:
        return to_frame(self.state.obs[0, -1])

    def step(self, human_act: Optional[int], key: jax.Array) -> Transition:
        act, out, self.state = play_step_fn(self.agent)(
            self.variables, self.state, jnp.array([-1 if human_act is None else human_act], jnp.int32), key)
        self.t += 1
        return Transition(int(act[0]), float(out.rew[0]), bool(out.end[0]), self.at_horizon())


class RealPlayEnv:
    """One real test game (no end on a life loss), the actor-critic following it from each episode's start."""

    name = "real"

    def __init__(self, agent: Agent, variables: AgentVariables, env: Env):
        self.agent, self.variables, self.env = agent, variables, env
        self.frame: Optional[np.ndarray] = None
        self.hx_cx = None
        self.t = 0

    def reset(self, key: jax.Array) -> None:
        del key  # the env draws its own no-ops
        self.frame = self.env.reset()[0]
        self.hx_cx = self.agent.actor_critic.initial_state(1)
        self.t = 0

    def step(self, human_act: Optional[int], key: jax.Array) -> Transition:
        policy_act, self.hx_cx = policy_step_fn(self.agent.actor_critic)(
            self.variables["actor_critic"], self.frame[None], self.hx_cx, key, 0.0)
        act = int(policy_act[0]) if human_act is None else human_act
        step = self.env.step(np.array([act], np.int32))
        self.frame = step.final_obs[0]
        self.t += 1
        return Transition(act, float(step.rew[0]), bool(step.end[0]), bool(step.trunc[0]))


# What a player can ask for between two frames.
COMMANDS = ("control", "env", "reset", "horizon+1", "horizon-1", "horizon+10", "horizon-10", "horizon_unlimited",
            "pause", "step", "quit")


@dataclasses.dataclass
class FrameLog:
    """What happened at one displayed frame."""

    frame: int
    env: str
    control: str  # "policy" or "human"
    event: str  # "step", "reset" (a new episode's first frame) or "paused" (the same frame again)
    t: int  # steps since the episode started
    ret: float  # return of the episode so far
    horizon: int  # of the world model, 0 = unlimited
    act: Any = None  # on steps: the action taken (Transition.act)
    rew: float = 0.0
    end: bool = False
    trunc: bool = False


class PlaySession:
    """The player's view: which env is shown, who acts, pause, and a log of every frame and command.

    `tick(commands, human_act)` applies the commands given since the last frame, then advances the shown
    env by one step (unless paused), or starts its next episode if the last step ended or truncated it
    (or on "reset"). Each env keeps its own episode while the other is shown.
    """

    def __init__(self, envs: Sequence[Any], key: jax.Array, human: bool = False):
        self.envs = list(envs)
        self.env_index = 0
        self.human = human
        self.paused = False
        self.quit = False
        self.key = key
        self.frame_index = 0
        self.log: List[FrameLog] = []
        self.commands: List[Tuple[int, str]] = []  # (frame, command) in the order applied
        self._returns = [0.0] * len(self.envs)
        self._needs_reset = [True] * len(self.envs)
        self._last: List[Optional[FrameLog]] = [None] * len(self.envs)

    @property
    def env(self):
        return self.envs[self.env_index]

    @property
    def world_model(self) -> Optional[ImaginedPlayEnv]:
        return next((e for e in self.envs if isinstance(e, ImaginedPlayEnv)), None)

    def apply(self, command: str) -> None:
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; the commands are {', '.join(COMMANDS)}")
        self.commands.append((self.frame_index, command))
        wm = self.world_model
        if command == "control":
            self.human = not self.human
        elif command == "env":
            self.env_index = (self.env_index + 1) % len(self.envs)
        elif command == "reset":
            self._needs_reset[self.env_index] = True
        elif command.startswith("horizon") and wm is not None:
            # 0 is unlimited; a lower horizon than the steps already imagined truncates at the next step.
            wm.horizon = 0 if command == "horizon_unlimited" else max(0, wm.horizon + int(command[len("horizon"):]))
        elif command == "pause":
            self.paused = not self.paused
        elif command == "quit":
            self.quit = True

    def tick(self, commands: Sequence[str] = (), human_act: Any = NOOP) -> FrameLog:
        """Applies the commands, then shows the next frame; returns its log."""
        for command in commands:
            self.apply(command)
        i, env = self.env_index, self.env
        single_step = "step" in commands
        self.key, key = jax.random.split(self.key)
        horizon = self.world_model.horizon if self.world_model is not None else 0
        control = "human" if self.human else "policy"
        if self._needs_reset[i] and (not self.paused or single_step or "reset" in commands or self._last[i] is None):
            env.reset(key)
            self._needs_reset[i], self._returns[i] = False, 0.0
            log = FrameLog(self.frame_index, env.name, control, "reset", 0, 0.0, horizon)
        elif self.paused and not single_step:
            log = dataclasses.replace(self._last[i], frame=self.frame_index, event="paused", control=control,
                                      horizon=horizon, act=None)
        else:
            tr = env.step(human_act if self.human else None, key)
            self._returns[i] += tr.rew
            self._needs_reset[i] = tr.end or tr.trunc
            log = FrameLog(self.frame_index, env.name, control, "step", env.t, self._returns[i], horizon, tr.act,
                           tr.rew, tr.end, tr.trunc)
        self._last[i] = log
        self.log.append(log)
        self.frame_index += 1
        return log

    @property
    def frame(self) -> np.ndarray:
        return self.env.frame

    def summary(self) -> Dict[str, Any]:
        steps = [x for x in self.log if x.event == "step"]
        return {
            "frames": len(self.log),
            "steps": {e.name: sum(x.env == e.name for x in steps) for e in self.envs},
            "resets": {e.name: sum(x.env == e.name and x.event == "reset" for x in self.log) for e in self.envs},
            "human_steps": sum(x.control == "human" for x in steps),
            "commands": list(self.commands),
        }
