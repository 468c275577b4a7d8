"""Where does a flat learning curve lose its signal? The world model's one-step frames and the reward/end
model's predictions on real against imagined next frames, over a run's replay dataset.

    python -m diamond_jax.diagnose --workdir=runs/minatar/Breakout-0

The policy learns only from rewards and ends sampled in imagination. For each real transition of the replay
(its num_steps_conditioning frames and actions, the frame reached, the reward and end), the denoiser draws
the next frame as imagination does, and the reward/end model, burnt in on the same real transitions, predicts
the reward sign and the end twice: after the real next frame and after the imagined one. Grouped by the real
reward sign and end, this says whether the reward/end model knows the game (its probability of the true
class on real frames) and whether imagination keeps what it needs (the same on imagined frames; the frames'
PSNR; the fraction of frames in which no pixel is off by more than `--tolerance` levels).

Prints a table and writes to --out (default <workdir>/diagnose): diagnose.json (the table) and examples.png
(up to 3 transitions per group, in the order reward +1, reward -1, reward 0, end: a row's conditioning
frames, then the real next frame, then the imagined one). It reads the dataset without changing it, also
while the run goes on, and uses the agent the run saved last (<workdir>/agent, at each evaluation).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np

from diamond_jax.agent import Agent, AgentVariables
from diamond_jax.data.batch import obs_from_frames
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.world_model.metrics import psnr
from diamond_jax.models.sampler import sample_next_obs
from diamond_jax.play_env import UsageError, load_run_agent, to_frame
from diamond_jax.training.agent_checkpoint import read_agent_info
from diamond_jax.video import grid, upscale

GROUPS = ("reward +1", "reward -1", "reward 0", "end")  # a transition with a reward and an end is in both


class Transitions(NamedTuple):
    """Real transitions with the context the models see at them, padding as in training."""

    obs: np.ndarray  # uint8 [m, n, h, w, 3] the conditioning frames, the last one the frame acted at
    real: np.ndarray  # bool [m, n]: False for padding before the episode's start (zeros for the models)
    act: np.ndarray  # int32 [m, n] the actions taken at them (0 at padding)
    next_obs: np.ndarray  # uint8 [m, h, w, 3] the frame reached
    rew: np.ndarray  # float32 [m]
    end: np.ndarray  # bool [m]


def transitions(replay: ReplayDataset, n: int) -> Transitions:
    """Every transition of the replay with its n frames of context."""
    h, w, _ = replay.frame_shape
    out = {k: [] for k in Transitions._fields}
    for e in range(replay.num_episodes):
        ep = replay.episode(e)
        length = len(ep["act"])
        frames = np.concatenate([np.zeros((n - 1, h, w, 3), np.uint8), ep["obs"][:length]])
        acts = np.concatenate([np.zeros(n - 1, np.int32), ep["act"]])
        real = np.arange(-(n - 1), length) >= 0
        for t in range(length):
            out["obs"].append(frames[t:t + n])
            out["real"].append(real[t:t + n])
            out["act"].append(acts[t:t + n])
        out["next_obs"].append(ep["obs"][1:length + 1])
        out["rew"].append(ep["rew"])
        out["end"].append(ep["end"])
    stack = lambda k: np.stack(out[k]) if out[k] else np.zeros((0, n, h, w, 3), np.uint8)
    cat = lambda k, dtype: np.concatenate(out[k]).astype(dtype) if out[k] else np.zeros(0, dtype)
    return Transitions(stack("obs"), np.asarray(out["real"], bool).reshape(-1, n),
                       np.asarray(out["act"], np.int32).reshape(-1, n),
                       np.concatenate(out["next_obs"]) if out["next_obs"] else np.zeros((0, h, w, 3), np.uint8),
                       cat("rew", np.float32), cat("end", bool))


def group_masks(t: Transitions) -> Dict[str, np.ndarray]:
    return dict(zip(GROUPS, (t.rew > 0, t.rew < 0, t.rew == 0, t.end)))


def choose(t: Transitions, per_group: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most per_group transitions of each group, drawn without replacement, sorted."""
    chosen = [rng.choice(np.flatnonzero(m), min(per_group, int(m.sum())), replace=False)
              for m in group_masks(t).values()]
    return np.unique(np.concatenate(chosen)).astype(np.int64)


def one_step_fn(agent: Agent):
    """step(variables, obs, act, next_obs, key) -> (imagined next obs, P(reward class), P(end)) after the real
    and after the imagined next frame, each [2, b, ...] (jitted). obs [b, n, h, w, 3] in [-1, 1]."""

    @jax.jit
    def step(variables: AgentVariables, obs: jax.Array, act: jax.Array, next_obs: jax.Array, key: jax.Array):
        # A latent agent's denoiser draws from the context's latents; the frame is their decoding.
        imagined = agent.decode(variables, sample_next_obs(agent.denoiser, variables["denoiser"], key,
                                                           agent.encode(variables, obs), act, agent.sampler))

        def predict(last):
            # The LSTM runs over the context's n transitions, all real but the last one's next frame.
            following = jnp.concatenate([obs[:, 1:], last[:, None]], axis=1)
            logits_rew, logits_end, _ = agent.rew_end_model.predict_rew_end(variables["rew_end_model"], obs, act,
                                                                            following)
            return jax.nn.softmax(logits_rew[:, -1]), jax.nn.softmax(logits_end[:, -1])

        (p_rew_real, p_end_real), (p_rew_imag, p_end_imag) = predict(next_obs), predict(imagined)
        return imagined, jnp.stack([p_rew_real, p_rew_imag]), jnp.stack([p_end_real, p_end_imag])

    return step


def run_models(agent: Agent, variables: AgentVariables, t: Transitions, key: jax.Array, batch_size: int = 256):
    """Imagined next frames (uint8 [m, h, w, 3]), P(reward class) [2, m, 3] and P(end) [2, m, 2] (real, imagined)."""
    step = one_step_fn(agent)
    frames, p_rew, p_end = [], [], []
    for s in range(0, len(t.act), batch_size):
        part = slice(s, s + batch_size)
        obs = jnp.where(jnp.asarray(t.real[part])[..., None, None, None], obs_from_frames(jnp.asarray(t.obs[part])),
                        0.0)
        imagined, rew, end = step(variables, obs, jnp.asarray(t.act[part]), obs_from_frames(t.next_obs[part]),
                                  jax.random.fold_in(key, s))
        frames.append(to_frame(imagined))
        p_rew.append(np.asarray(rew))
        p_end.append(np.asarray(end))
    return np.concatenate(frames), np.concatenate(p_rew, axis=1), np.concatenate(p_end, axis=1)


def summarise(t: Transitions, imagined: np.ndarray, p_rew: np.ndarray, p_end: np.ndarray,
              tolerance: int) -> Dict[str, Dict[str, Any]]:
    """Per group: its size, the imagined frames' mean PSNR and fraction right, and the mean probability the
    reward/end model gives the true reward sign and the true end after real and after imagined frames."""
    value = np.abs(imagined.astype(np.int32) - t.next_obs.astype(np.int32))
    right = value.reshape(len(value), -1).max(axis=-1) <= tolerance
    frame_psnr = psnr(t.next_obs, imagined)
    rew_class = (np.sign(t.rew) + 1).astype(np.int64)
    p_true_rew = np.take_along_axis(p_rew, rew_class[None, :, None], axis=-1)[..., 0]  # [2, m]
    p_true_end = np.take_along_axis(p_end, t.end.astype(np.int64)[None, :, None], axis=-1)[..., 0]
    table = {}
    for name, mask in group_masks(t).items():
        if not mask.any():
            table[name] = {"transitions": 0}
            continue
        finite = frame_psnr[mask][np.isfinite(frame_psnr[mask])]
        table[name] = {
            "transitions": int(mask.sum()),
            "frames_right": float(right[mask].mean()),
            # Identical frames have infinite PSNR: the mean is over the others, the count of identical apart.
            "psnr_db": float(finite.mean()) if len(finite) else None,
            "frames_identical": float(np.isinf(frame_psnr[mask]).mean()),
            "p_true_reward_real": float(p_true_rew[0, mask].mean()),
            "p_true_reward_imagined": float(p_true_rew[1, mask].mean()),
            "p_true_end_real": float(p_true_end[0, mask].mean()),
            "p_true_end_imagined": float(p_true_end[1, mask].mean()),
        }
    return table


def examples_picture(t: Transitions, imagined: np.ndarray, per_group: int, scale: int) -> np.ndarray:
    """Rows of [conditioning frames | real next | imagined next], per_group rows per group in GROUPS' order,
    each frame in a grey border (the games' backgrounds are often black)."""
    def panel(frame):
        return np.pad(upscale(frame, scale), ((1, 1), (1, 1), (0, 0)), constant_values=128)

    rows = []
    for mask in group_masks(t).values():
        for i in np.flatnonzero(mask)[:per_group]:
            context = [panel(np.where(r, f, 0).astype(np.uint8)) for f, r in zip(t.obs[i], t.real[i])]
            rows.append(grid([grid(context, gap=1), panel(t.next_obs[i]), panel(imagined[i])], gap=8))
    return grid(rows, axis=-3, gap=4)


def diagnose(workdir: str, out: Optional[str] = None, per_group: int = 500, tolerance: int = 32, seed: int = 0,
             scale: int = 6) -> Dict[str, Any]:
    config, agent, variables = load_run_agent(workdir)
    try:
        replay = ReplayDataset.load(str(Path(workdir) / "replay"), read_only=True)
    except FileNotFoundError as e:
        raise UsageError(f"{e}. --workdir must be a training run's directory (it holds replay/ and agent/).") from e
    n = config.denoiser.inner_model.num_steps_conditioning
    everything = transitions(replay, n)
    if len(everything.act) == 0:
        raise UsageError(f"the replay dataset of {workdir} holds no transition yet. Fix: run the training longer.")
    chosen = jax.tree.map(lambda x: x[choose(everything, per_group, np.random.default_rng(seed))], everything)
    imagined, p_rew, p_end = run_models(agent, variables, chosen, jax.random.key(seed))
    table = summarise(chosen, imagined, p_rew, p_end, tolerance)
    out_dir = Path(out) if out else Path(workdir) / "diagnose"
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"workdir": str(workdir), "game": config.game,
            "agent_epoch": read_agent_info(Path(workdir) / "agent")["step"], "replay_transitions": int(len(everything.act)), "tolerance_levels": tolerance, "seed": seed}
    (out_dir / "diagnose.json").write_text(json.dumps({**info, "groups": table}, indent=1))
    iio.imwrite(out_dir / "examples.png", examples_picture(chosen, imagined, 3, scale))
    return {"info": info, "groups": table, "paths": {"json": out_dir / "diagnose.json",
                                                     "examples": out_dir / "examples.png"}}


def format_table(groups: Dict[str, Dict[str, Any]]) -> str:
    lines = [f"{'group':10s} {'n':>6s} {'frames right':>12s} {'PSNR dB':>8s} {'P(true rew) real / imag':>24s} "
             f"{'P(true end) real / imag':>24s}"]
    for name, g in groups.items():
        if not g["transitions"]:
            lines.append(f"{name:10s} {0:6d}")
            continue
        db = "inf" if g["psnr_db"] is None else f"{g['psnr_db']:.1f}"
        lines.append(f"{name:10s} {g['transitions']:6d} {g['frames_right']:12.3f} {db:>8s} "
                     f"{g['p_true_reward_real']:11.3f} / {g['p_true_reward_imagined']:.3f}      "
                     f"{g['p_true_end_real']:11.3f} / {g['p_true_end_imagined']:.3f}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m diamond_jax.diagnose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory (holds agent/ and replay/)")
    parser.add_argument("--out", default=None, help="output directory (default <workdir>/diagnose)")
    parser.add_argument("--per_group", type=int, default=500,
                        help="transitions drawn from each group at most (default 500)")
    parser.add_argument("--tolerance", type=int, default=32,
                        help="a frame is right when no pixel is off by more than this many of 255 levels "
                             "(default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the choice of transitions and the sampler")
    args = parser.parse_args(argv)
    if args.per_group <= 0:
        parser.error(f"--per_group={args.per_group} must be positive")
    if not 0 <= args.tolerance <= 255:
        parser.error(f"--tolerance={args.tolerance} must lie in [0, 255]")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    try:
        result = diagnose(args.workdir, args.out, args.per_group, args.tolerance, args.seed)
    except UsageError as e:
        sys.exit(f"error: {e}")
    info = result["info"]
    print(f"{info['game']}: the agent saved at epoch {info['agent_epoch']}, {info['replay_transitions']} transitions in "
          f"the replay. P(true ...): the reward/end model's mean probability of the real reward sign / end after "
          f"the real next frame and after the imagined one.")
    print(format_table(result["groups"]))
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    return result


if __name__ == "__main__":
    main()
