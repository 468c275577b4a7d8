"""Play inside a trained world model, or watch its policy play there, in a pygame window.

    python -m diamond_jax.play --workdir=runs/Breakout-0
    python -m diamond_jax.play --workdir=runs/Breakout-0 --record=breakout.mp4 --max_steps=500

The agent is <workdir>/agent (written by training, or by python -m diamond_jax.convert for an official
checkpoint). Each imagined episode starts from an initial condition taken from the real game: the first
num_steps_conditioning frames of a real test episode and the actions taken at them (by the policy, or NOOP
with --init_actions=noop), on which the reward/end model and the actor-critic are burnt in. The world model
then makes one frame per step; an episode ends when the reward/end model samples an end, or is truncated
after --horizon steps. The real game (a test env: a life loss does not end the episode) is one key away.

The policy plays by default. Atari actions are combinations of w a s d (directions) and space (FIRE): the
keys of the game's actions are printed at start, with the controls. Runs headless with SDL_VIDEODRIVER=dummy
(give --max_steps, or a --script that presses q); --script presses keys at given frames, e.g.
--script="0:m,2:+d,6:-d,8:.,9:e,10:return,11:q" (m at frame 0, hold d from frame 2 to 6, ...).

A world model of recorded play (a --workdir of python -m diamond_jax.world_model) is played the same way,
without a real game: each episode starts from a real context of a test episode of its dataset (--dataset where
it moved) and lasts --horizon steps, or until the actions played run out: those recorded after the context
(default), or the rows of --actions=PATH.npy|PATH.csv. Under human control (m) the keyboard acts instead: Atari
action names with the keys above, other discrete actions (at most 18) with 1..9 f g h j k l z x c, multi-hot
components toggled by the same keys. Continuous actions come from --actions only.

    python -m diamond_jax.play --workdir=runs/wm-pong --human
    python -m diamond_jax.play --workdir=runs/wm-car --actions=steering.csv
"""

import argparse
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diamond_jax import envs  # noqa: E402
from diamond_jax.play_env import (  # noqa: E402
    HeldKeys, PlayControls, PlaySession, RealPlayEnv, UsageError, WorldModelPlayEnv, action_keys, key_table, keymap,
    load_run_agent, noop_action)
from diamond_jax.world_model import watch  # noqa: E402
from diamond_jax.video import VideoWriter, video_format  # noqa: E402

# Keys of the controls (pygame key names), the command each sends to PlaySession, and what it does.
CONTROL_KEYS = (
    (("m",), "control", "switch control: policy / human"),
    (("left", "right"), "env", "switch environment: world model / real game"),
    (("return",), "reset", "reset: new initial condition (world model), new episode (real game)"),
    (("up",), "horizon+1", "imagination horizon +1"),
    (("down",), "horizon-1", "imagination horizon -1 (0 = unlimited)"),
    (("page up",), "horizon+10", "imagination horizon +10"),
    (("page down",), "horizon-10", "imagination horizon -10"),
    (("0",), "horizon_unlimited", "unlimited imagination horizon"),
    ((".",), "pause", "pause / resume"),
    (("e",), "step", "one step while paused"),
    (("escape", "q"), "quit", "quit"),
)
COMMAND_OF_KEY = {key: command for keys, command, _ in CONTROL_KEYS for key in keys}
HEADER_HEIGHT = 48  # two lines of text; even, as H.264 recordings need


def describe_controls() -> str:
    return "\n".join(["Controls:"] + [f"  {' / '.join(keys):<14} {text}" for keys, _, text in CONTROL_KEYS])


def describe_keys(game: str, names: Sequence[str]) -> str:
    """The game's actions (names by index) with their keys: printed at start, above the controls."""
    return key_table(f"{game}: {len(names)} actions, the keys to hold under human control (m):",
                     [(name, action_keys(name)) for name in names])


class ScriptedKey(NamedTuple):
    frame: int
    key: str  # a pygame key name
    kind: str  # "tap" (down and up within the frame), "down" or "up"


def parse_script(script: str) -> List[ScriptedKey]:
    """'FRAME:KEY,...' taps KEY before frame FRAME is shown; '+KEY' holds it down from then on, '-KEY' releases it."""
    items = []
    for item in filter(None, (s.strip() for s in script.split(","))):
        frame, sep, key = item.partition(":")
        if not sep or not frame.strip().isdigit() or not key:
            raise UsageError(f"--script item {item!r} is not FRAME:KEY. Fix: e.g. --script=\"0:m,2:+d,6:-d,8:q\".")
        kind = "tap"
        if len(key) > 1 and key[0] in "+-":
            kind, key = ("down" if key[0] == "+" else "up"), key[1:]
        items.append(ScriptedKey(int(frame), key, kind))
    return items


class ScriptedEvents:
    """An event source that posts scripted key presses as pygame events before reading pygame's queue."""

    def __init__(self, script: Sequence[ScriptedKey]):
        import pygame

        pygame.display.init()  # pygame knows key names once initialised
        self._pygame = pygame
        self._script = list(script)
        for item in self._script:
            try:
                pygame.key.key_code(item.key)
            except ValueError:
                raise UsageError(f"--script: {item.key!r} is not a pygame key name. Fix: use names like m, d, space, "
                                "return, up, page up, escape, '.' (see pygame.key.name).") from None

    def __call__(self, frame: int) -> List[Any]:
        pg = self._pygame
        for item in self._script:
            if item.frame == frame:
                code = pg.key.key_code(item.key)
                types = {"tap": (pg.KEYDOWN, pg.KEYUP), "down": (pg.KEYDOWN,), "up": (pg.KEYUP,)}[item.kind]
                for event_type in types:
                    pg.event.post(pg.event.Event(event_type, key=code, mod=0, unicode="", scancode=0))
        return pg.event.get()


EventSource = Callable[[int], Iterable[Any]]  # frame index -> the pygame events that arrived before it


class Keyboard:
    """Turns pygame events into PlaySession commands and the keys into the human's action (PlayControls'
    key_action). A key pressed and released between two frames still counts for the next one, so that a quick
    tap is never lost."""

    def __init__(self, key_action: Callable[[Set[str], Set[str]], Any]):
        self.key_action = key_action
        self.held: Set[str] = set()

    def read(self, events: Iterable[Any]):
        import pygame

        commands, tapped = [], set()
        for event in events:
            if event.type == pygame.QUIT:
                commands.append("quit")
            elif event.type == pygame.KEYDOWN:
                name = pygame.key.name(event.key)
                self.held.add(name)
                tapped.add(name)
                if name in COMMAND_OF_KEY:
                    commands.append(COMMAND_OF_KEY[name])
            elif event.type == pygame.KEYUP:
                self.held.discard(pygame.key.name(event.key))
            elif event.type == pygame.WINDOWFOCUSLOST:  # its key releases go to another window
                self.held.clear()
        return commands, self.key_action(self.held, tapped)


def header_lines(session: PlaySession, act_name: Callable[[Any], str]) -> List[str]:
    """What the header says about the frame shown: env, control, step (and horizon), return; the last step."""
    log = session.log[-1]
    limit = "" if session.env is not session.world_model else (
        f"/{log.horizon}" if log.horizon else "  (no horizon)")
    first = f"{log.env.upper()}   {log.control}   step {log.t}{limit}   return {log.ret:g}"
    act = "-" if log.act is None else act_name(log.act)
    second = f"act {act}   rew {log.rew:+g}   end {int(log.end)}   trunc {int(log.trunc)}"
    return [first, second + ("   PAUSED" if session.paused else "")]


def run_window(session: PlaySession, controls: PlayControls, size: int, fps: float, record: Optional[str] = None,
               max_steps: int = 0, events: Optional[EventSource] = None) -> Dict:
    """The pygame loop: per iteration, the events that arrived, one session tick, one displayed (and recorded)
    frame; until quit or max_steps frames (0: no limit). Without a key_action, the human cannot take control.

    events: where each frame's pygame events come from (default: pygame's queue); ScriptedEvents posts
    scripted presses into that queue first.
    """
    import pygame

    pygame.display.init()
    pygame.font.init()
    height, width = controls.frame_shape
    scale = max(1, size // max(height, width))
    screen = pygame.display.set_mode((width * scale, height * scale + HEADER_HEIGHT))
    pygame.display.set_caption("diamond_jax.play")
    font = pygame.font.Font(None, 20)
    clock = pygame.time.Clock()
    keyboard = Keyboard(controls.key_action or (lambda held, pressed: None))
    events = events or (lambda frame: pygame.event.get())
    writer = VideoWriter(record, fps) if record else None
    try:
        while not (max_steps and session.frame_index >= max_steps):
            commands, human_act = keyboard.read(events(session.frame_index))
            if "quit" in commands:
                break
            if controls.key_action is None:
                commands = [c for c in commands if c != "control"]
            session.tick(commands, human_act)
            _draw(screen, font, session, controls.act_name, scale)
            if writer is not None:
                writer.append(np.ascontiguousarray(pygame.surfarray.array3d(screen).transpose(1, 0, 2)))
            clock.tick(fps)
    finally:
        if writer is not None:
            writer.close()
        pygame.quit()
    summary = session.summary()
    if writer is not None:
        summary["record"] = {"path": str(writer.path), "frames": writer.num_frames,
                             "height": height * scale + HEADER_HEIGHT, "width": width * scale}
    return summary


def _draw(screen, font, session: PlaySession, act_name: Callable[[Any], str], scale: int) -> None:
    import pygame

    screen.fill((0, 0, 0))
    for i, line in enumerate(header_lines(session, act_name)):
        screen.blit(font.render(line, True, (255, 255, 255)), (6, 6 + 20 * i))
    image = np.ascontiguousarray(np.repeat(np.repeat(session.frame, scale, axis=0), scale, axis=1))
    screen.blit(pygame.surfarray.make_surface(image.transpose(1, 0, 2)), (0, HEADER_HEIGHT))
    pygame.display.flip()


def make_session(workdir: str, seed: int = 0, horizon: int = 50, human: bool = False,
                 init_actions: str = "policy") -> Tuple[PlaySession, PlayControls]:
    """The session of an agent's run directory: the world model first, then the real game."""
    config, agent, variables = load_run_agent(workdir)
    n = config.denoiser.inner_model.num_steps_conditioning
    init_env = envs.make_env(config, 1, train=False, seed=seed)
    if init_env.num_actions != agent.num_actions:
        raise UsageError(f"{config.game} has {init_env.num_actions} actions but the agent in {workdir} has "
                        f"{agent.num_actions}. Fix: its agent.json names the wrong game; re-save or re-convert it "
                        "with the right one (python -m diamond_jax.convert PATH.pt --game=...).")
    real_env = envs.make_env(config, 1, train=False, seed=seed + 1)
    play_envs = [WorldModelPlayEnv(agent, variables, init_env, n, horizon, init_policy=init_actions == "policy"),
                 RealPlayEnv(agent, variables, real_env)]
    names = envs.action_names(config)
    controls = PlayControls((config.env.size, config.env.size), HeldKeys(keymap(names), noop_action(names)),
                            lambda act: names[act], describe_keys(config.game, names))
    return PlaySession(play_envs, jax.random.key(seed), human=human), controls


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m diamond_jax.play", description=__doc__,
                                     epilog=describe_controls(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="run directory holding the agent in <workdir>/agent, or of a world model of recorded "
                             "play (python -m diamond_jax.world_model)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the real envs and every sampling (default 0)")
    parser.add_argument("--horizon", type=int, default=50,
                        help="imagined steps before the world model truncates and restarts; 0 = unlimited "
                             "(default 50, as the official play tool)")
    parser.add_argument("--human", action="store_true", help="start under human control (default: the policy)")
    parser.add_argument("--init_actions", choices=("policy", "noop"), default=None,
                        help="who acts in the real frames of the initial conditions (default policy; RL runs only)")
    parser.add_argument("--actions", default=None,
                        help="world-model runs: the actions played when the human is not in control, 'episode' "
                             "(default: those recorded after the context) or an actions file, PATH.npy or PATH.csv "
                             "(one row per step, as python -m diamond_jax.dataset reads them)")
    parser.add_argument("--dataset", default=None,
                        help="world-model runs: the dataset's path, where it moved since training (default: the "
                             "path the run recorded)")
    watch.add_sampling_flags(parser)
    parser.add_argument("--fps", type=float, default=15.0, help="frames per second shown and recorded (default 15)")
    parser.add_argument("--size", type=int, default=512,
                        help="game view in pixels, rounded down to a whole multiple of the frame size, at least the "
                             "frame size (default 512)")
    parser.add_argument("--record", default=None,
                        help="save every displayed frame (the window: header and game view) to PATH.mp4 or PATH.gif")
    parser.add_argument("--max_steps", type=int, default=0, help="stop after this many frames (default 0: until quit)")
    parser.add_argument("--script", default="",
                        help="scripted keys, 'FRAME:KEY,...' (tap), 'FRAME:+KEY' (hold), 'FRAME:-KEY' (release)")
    args = parser.parse_args(argv)
    for name, minimum in (("fps", 1e-9), ("size", 1)):
        if getattr(args, name) < minimum:
            parser.error(f"--{name}={getattr(args, name)} must be positive")
    for name in ("horizon", "max_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name}={getattr(args, name)} must be >= 0 (0 = no limit)")
    if args.record:
        try:
            video_format(args.record)
        except ValueError as e:
            parser.error(f"--record: {e}")
    if os.environ.get("SDL_VIDEODRIVER") == "dummy" and not args.max_steps and not args.script:
        parser.error("SDL_VIDEODRIVER=dummy shows no window, so nothing could end the game. Fix: pass --max_steps=N "
                     "or a --script that presses q.")
    return args


def play(args: argparse.Namespace, events: Optional[EventSource] = None) -> Dict:
    """Runs the play tool on parsed arguments; returns the session's summary, with its frame log."""
    if args.script and events is None:
        events = ScriptedEvents(parse_script(args.script))
    if watch.is_world_model_run(args.workdir):
        if args.init_actions:
            raise UsageError("--init_actions is for RL runs: a world model of recorded play starts from recorded "
                             "frames and the actions recorded with them. Fix: drop --init_actions.")
        session, controls = watch.play_session(args.workdir, args.seed, args.horizon, args.human,
                                               args.actions or watch.EPISODE, args.dataset,
                                               watch.sampling(args), bool(args.recovery))
    else:
        watch.refuse_world_model_flags(args)
        session, controls = make_session(args.workdir, args.seed, args.horizon, args.human,
                                         args.init_actions or "policy")
    print(controls.keys_text + "\n" + describe_controls())
    print("The first frames wait for the models to compile (seconds on a GPU, up to a minute on a CPU).", flush=True)
    summary = run_window(session, controls, args.size, args.fps, args.record, args.max_steps, events)
    summary["log"] = session.log
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    try:
        summary = play(args)
    except UsageError as e:
        sys.exit(f"error: {e}")
    print(f"Played {summary['frames']} frames: steps {summary['steps']}, resets {summary['resets']}."
          + (f" Recorded {summary['record']['frames']} frames to {summary['record']['path']}."
             if "record" in summary else ""))
    return summary


if __name__ == "__main__":
    main()
