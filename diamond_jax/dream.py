"""Videos of a world model's imagination, and how far it drifts from the real game.

    python -m diamond_jax.dream --workdir=runs/Breakout-0 --steps=100

Writes to --out (default <workdir>/dream):
  imagination.mp4      --rows imagined games side by side, the policy acting in the world model for --steps
                       steps (as in training: a row whose reward/end model samples an end restarts from a
                       fresh initial condition).
  real_vs_imagined.mp4 one row per game, the real frames (left) beside the world model's (right): the policy
                       plays --steps steps in the real game from an initial condition, and the world model,
                       started from the same initial condition, is fed the same actions but its own frames
                       (open loop).
  psnr.csv, psnr.json, psnr.png  the PSNR of each imagined frame against the real one (uint8 frames, peak 255),
                       per row and averaged over rows.
Initial conditions are the first num_steps_conditioning frames of real test episodes, the policy acting.
Every video starts with the last frame of its initial condition, then shows one frame per step: --steps + 1
frames. --format=gif writes GIFs instead.

A world model of recorded play (a --workdir of python -m diamond_jax.world_model) draws --rows open-loop
rollouts, each from a real context (num_steps_conditioning frames of a test episode of its dataset, --dataset
where the dataset moved), at the upsampler's full resolution where the run has one:

    python -m diamond_jax.dream --workdir=runs/wm-pong --steps=50                      # the episodes' actions
    python -m diamond_jax.dream --workdir=runs/wm-pong --steps=50 --actions=random     # seeded, valid actions
    python -m diamond_jax.dream --workdir=runs/wm-pong --steps=50 --actions=steps.csv  # one row per step

  imagination.mp4      the rows side by side.
  real_vs_imagined.mp4 and psnr.csv, psnr.json, psnr.png as above, with --actions=episode (the default): the
                       actions recorded after the context, beside the frames recorded after it.
An actions file is .npy or .csv in the layout python -m diamond_jax.dataset imports, one row per step.
--recovery (a world model trained with interpolation, README "Long rollouts") detects drift as the frames are
drawn and recovers by interpolating toward a dataset frame; drift.json then says how often, per row.
"""

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diamond_jax import envs, imagination
from diamond_jax.agent import Agent, AgentVariables
from diamond_jax.comparison import Comparison, comparison_video, write_psnr
from diamond_jax.play_env import UsageError, initial_conditions, load_run_agent, play_real, start_fn, to_frame
from diamond_jax.video import FORMATS, grid, upscale, write_video
from diamond_jax.world_model import watch
from diamond_jax.world_model.metrics import psnr


@functools.lru_cache(maxsize=4)
def open_loop_fn(agent: Agent):
    """imagine(variables, state, act int32 [b, T], key) -> WorldModelStep with [b, T] leaves: the world model
    fed the given actions and its own frames (jitted)."""

    @jax.jit
    def imagine(variables: AgentVariables, state: imagination.ImaginationState, act: jax.Array, key: jax.Array):
        def step(state, inputs):
            act_t, key_t = inputs
            # The actions are given: the actor-critic's state is carried along untouched.
            out, state = imagination.world_model_step(agent, variables, state, act_t, state.ac_hx_cx, key_t)
            return state, out

        _, outs = jax.lax.scan(step, state, (act.T, jax.random.split(key, act.shape[1])))
        return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outs)

    return imagine


@functools.lru_cache(maxsize=4)
def rollout_fn(agent: Agent, num_steps: int):
    """rollout(variables, state, pool, key) -> Trajectory of num_steps steps, the policy acting (jitted)."""
    return jax.jit(lambda variables, state, pool, key: imagination.rollout(agent, variables, state, pool, key,
                                                                           num_steps)[0])


def imagine_rollout(config, agent: Agent, variables: AgentVariables, rows: int, num_steps: int, key: jax.Array,
                    seed: int) -> imagination.Trajectory:
    """Imagined trajectories of `rows` games from real initial conditions, each row with
    initial_conditions_per_row more for its restarts."""
    n = config.denoiser.inner_model.num_steps_conditioning
    k = config.world_model_env.initial_conditions_per_row
    env = envs.make_env(config, rows * (1 + k), train=False, seed=seed)
    key_real, key_rollout = jax.random.split(key)
    init = initial_conditions(play_real(env, agent, variables, n, key_real), n)
    state = start_fn(agent)(variables, jax.tree.map(lambda x: x[:rows], init))
    pool = jax.tree.map(lambda x: x[rows:].reshape((rows, k) + x.shape[1:]), init)
    return rollout_fn(agent, num_steps)(variables, state, pool, key_rollout)


def compare_open_loop(config, agent: Agent, variables: AgentVariables, rows: int, num_steps: int, key: jax.Array,
                      seed: int) -> Comparison:
    """The policy plays num_steps steps in real games after an initial condition; the world model, burnt in on
    the same initial condition, imagines the frames of the same actions. Stops early (with a warning) at the
    first real episode end among the rows: the real frames that follow belong to another episode."""
    n = config.denoiser.inner_model.num_steps_conditioning
    env = envs.make_env(config, rows, train=False, seed=seed)
    key_real, key_imagine = jax.random.split(key)
    traj = play_real(env, agent, variables, n - 1 + num_steps, key_real)
    done = (traj.end | traj.trunc).any(axis=0)
    if done[:n - 1].any():
        raise UsageError(f"a real episode ended within its first {n} frames, so there is no initial condition to "
                         "start from. Fix: try another --seed.")
    if done[n - 1:].any():
        kept = int(np.argmax(done[n - 1:])) + 1
        print(f"warning: a real episode ended after {kept} of the {num_steps} steps; comparing those {kept} steps.",
              file=sys.stderr)
        num_steps = kept
    state = start_fn(agent)(variables, initial_conditions(traj, n))
    act = traj.act[:, n - 1:n - 1 + num_steps]
    out = open_loop_fn(agent)(variables, state, jnp.asarray(act), key_imagine)
    start = traj.frames[:, n - 1:n]
    imagined = np.concatenate([start, to_frame(out.next_obs)], axis=1)
    return Comparison(traj.frames[:, n - 1:n + num_steps], imagined, act)


def rollout_video(traj: imagination.Trajectory, scale: int) -> np.ndarray:
    """Frames [T + 1, h', w', 3]: the rows side by side, each frame the actor-critic saw, then the last reached."""
    obs = np.concatenate([np.asarray(traj.obs), np.asarray(traj.next_obs[:, -1:])], axis=1)
    return grid([upscale(to_frame(row), scale) for row in obs])


def dream(workdir: str, num_steps: int, out: Optional[str] = None, fmt: str = "mp4", seed: int = 0, rows: int = 4,
          fps: float = 15.0, scale: int = 4) -> Dict[str, Any]:
    """Writes both videos and the PSNR files; returns their paths and the PSNR [rows, steps]."""
    config, agent, variables = load_run_agent(workdir)
    out_dir = Path(out) if out else Path(workdir) / "dream"
    out_dir.mkdir(parents=True, exist_ok=True)
    key_rollout, key_compare = jax.random.split(jax.random.key(seed))
    traj = imagine_rollout(config, agent, variables, rows, num_steps, key_rollout, seed)
    comparison = compare_open_loop(config, agent, variables, rows, num_steps, key_compare, seed)
    values = psnr(comparison.real[:, 1:], comparison.imagined[:, 1:])
    paths = {
        "imagination": write_video(out_dir / f"imagination.{fmt}", rollout_video(traj, scale), fps),
        "real_vs_imagined": write_video(out_dir / f"real_vs_imagined.{fmt}", comparison_video(comparison, scale), fps),
        **write_psnr(out_dir, values, {"game": config.game, "seed": seed, "rows": rows, "steps": values.shape[1]},
                     config.game),
    }
    return {"paths": paths, "psnr": values, "rollout": traj, "comparison": comparison}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m diamond_jax.dream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="run directory holding the agent in <workdir>/agent, or of a world model of recorded "
                             "play (python -m diamond_jax.world_model)")
    parser.add_argument("--steps", type=int, required=True, help="imagined steps per video")
    parser.add_argument("--out", default=None, help="output directory (default <workdir>/dream)")
    parser.add_argument("--format", choices=FORMATS, default="mp4", help="video format (default mp4)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the real envs and every sampling (default 0)")
    parser.add_argument("--rows", type=int, default=4, help="games per video (default 4)")
    parser.add_argument("--fps", type=float, default=15.0, help="frames per second of the videos (default 15)")
    parser.add_argument("--scale", type=int, default=4, help="pixels per frame pixel in the videos (default 4)")
    parser.add_argument("--actions", default=None,
                        help=f"world-model runs: the actions played, {watch.EPISODE} (default: those recorded after "
                             f"the context), {watch.RANDOM} or an actions file PATH.npy or PATH.csv (one row per step)")
    parser.add_argument("--dataset", default=None,
                        help="world-model runs: the dataset's path, where it moved since training (default: the "
                             "path the run recorded)")
    watch.add_sampling_flags(parser, recovery_writes="; writes drift.json")
    args = parser.parse_args(argv)
    for name in ("steps", "rows", "fps", "scale"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name}={getattr(args, name)} must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    try:
        if watch.is_world_model_run(args.workdir):
            result = watch.dream(args.workdir, args.steps, args.out, args.format, args.seed, args.rows, args.fps,
                                 args.scale, args.actions or watch.EPISODE, args.dataset,
                                 watch.sampling(args), bool(args.recovery))
        else:
            watch.refuse_world_model_flags(args)
            result = dream(args.workdir, args.steps, args.out, args.format, args.seed, args.rows, args.fps,
                           args.scale)
    except UsageError as e:
        sys.exit(f"error: {e}")
    if "psnr" in result:
        values = result["psnr"]
        print("step  PSNR (dB), mean over rows, then per row")
        for t in range(values.shape[1]):
            print(f"{t + 1:4d}  {values[:, t].mean():6.2f}  " + " ".join(f"{v:6.2f}" for v in values[:, t]))
    if "rollout" in result:
        print("imagination: ends sampled per row", np.asarray(result["rollout"].end).sum(axis=1).tolist(),
              "(each restarts the row from a fresh initial condition)")
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    return result


if __name__ == "__main__":
    main()
