"""Datasets of recorded play (diamond_jax/data/recorded.py): import recordings, record Atari play, summarise.

    # A folder of videos, each with <stem>.csv or <stem>.npy actions (schema: diamond_jax/data/importers.py)
    python -m diamond_jax.dataset --import_from=videos --src=recordings/ --out=datasets/mine
    # A folder of .npz episodes (obs, act, optional rew, end); vectors of actions need their kind
    python -m diamond_jax.dataset --import_from=npz --src=episodes/ --out=datasets/npz --action_kind=continuous
    # The replay dataset of a training run
    python -m diamond_jax.dataset --import_from=replay --src=runs/atari100k/Pong-0 --out=datasets/pong-replay
    # Atari played by a sticky random policy, at full resolution (210x160)
    python -m diamond_jax.dataset --record=Pong --episodes=10 --max_steps=1000 --out=datasets/pong
    # What a dataset holds
    python -m diamond_jax.dataset --info=datasets/pong

A bad input stops with one line, `error: ...`, naming the file and the fix, and exit status 2; nothing is
left at --out (imports are written aside and renamed into place last).
"""

import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from diamond_jax.config import ConfigError
from diamond_jax.config_files import config_file
from diamond_jax.data.recorded import ACTION_KINDS, SPLITS, DatasetError, RecordedDataset
from diamond_jax.exit_codes import EXIT_BAD_INPUT

IMPORTERS = ("videos", "npz", "replay")

_IMPORT_FROM = flags.DEFINE_enum("import_from", None, IMPORTERS, "Import recordings of this kind from --src.")
_SRC = flags.DEFINE_string("src", None, "The folder of videos or .npz episodes, or a training run's directory.")
_OUT = flags.DEFINE_string("out", None, "The dataset directory to write.")
_ACTION_KIND = flags.DEFINE_enum("action_kind", None, ACTION_KINDS,
                                 "The kind of action the files hold, checked against CSV columns; required for "
                                 "vectors of actions in .npy or .npz files (multi_hot or continuous).")
_TEST_FRACTION = flags.DEFINE_float("test_fraction", 0.1, "Fraction of the episodes kept for testing (at least "
                                    "one when there are two or more).", lower_bound=0.0, upper_bound=0.99)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the train/test split, and the policy and game of --record.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a dataset already at --out.")
_RECORD = flags.DEFINE_string("record", None, "Record play of this Atari 100k game, e.g. Pong.")
_EPISODES = flags.DEFINE_integer("episodes", 10, "Episodes to record.", lower_bound=1)
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Cut recorded episodes after this many steps.", lower_bound=1)
_CONFIG = config_flags.DEFINE_config_file(
    "config", config_file("atari100k"), "The environment settings of --record (config.env: frame skip, no-ops, "
    "sticky actions, episode cap); its frame size is replaced by the full 210x160.")
_INFO = flags.DEFINE_string("info", None, "Print a summary of the dataset in this directory.")


def describe(dataset: RecordedDataset) -> str:
    """A summary: episodes and frames per split, frames, actions, rewards and ends."""
    spec = dataset.action
    h, w = dataset.frame_shape
    names = f": {', '.join(spec.names)}" if spec.names else ""
    lines = [dataset.path, f"  source: {dataset.source or 'not given'}",
             f"  frames: {h}x{w} RGB, {f'{dataset.fps:g} per second' if dataset.fps else 'frame rate unknown'}",
             f"  actions: {spec.kind}, {'number of actions' if spec.kind == 'discrete' else 'size'} {spec.size}{names}",
             f"  rewards: {'yes' if dataset.has_rew else 'no'}; ends: {'yes' if dataset.has_end else 'no'}"]
    for split in SPLITS:
        lengths = dataset.lengths(split)
        spread = f" (lengths {lengths.min()} to {lengths.max()})" if len(lengths) else ""
        lines.append(f"  {split}: {len(lengths)} episodes, {dataset.num_frames(split)} frames{spread}")
    return "\n".join(lines)


def _required(**values) -> None:
    missing = [f"--{name}" for name, value in values.items() if value is None]
    if missing:
        raise DatasetError(f"{' and '.join(missing)} missing. Fix: see python -m diamond_jax.dataset --help.")


def run() -> RecordedDataset:
    """What the flags ask for: the dataset imported, recorded or summarised."""
    modes = [name for name, flag in (("--import_from", _IMPORT_FROM), ("--record", _RECORD), ("--info", _INFO))
             if flag.value is not None]
    if len(modes) != 1:
        raise DatasetError(f"{' and '.join(modes) or 'nothing'} given. Fix: pass exactly one of --import_from, "
                           "--record and --info.")
    if _INFO.value is not None:
        return RecordedDataset.open(_INFO.value)
    common = dict(test_fraction=_TEST_FRACTION.value, seed=_SEED.value, overwrite=_OVERWRITE.value)
    if _RECORD.value is not None:
        from diamond_jax.envs.record import record  # starts envpool: only when recording

        _required(out=_OUT.value)
        config = _CONFIG.value
        config.game = _RECORD.value
        return record(config, _OUT.value, _EPISODES.value, _MAX_STEPS.value, **common)
    from diamond_jax.data import importers  # brings JAX (the replay's reader): only when importing

    _required(src=_SRC.value, out=_OUT.value)
    if _IMPORT_FROM.value == "replay":
        from diamond_jax.envs.record import import_replay

        return import_replay(_SRC.value, _OUT.value, **common)
    read = importers.import_videos if _IMPORT_FROM.value == "videos" else importers.import_npz
    return read(_SRC.value, _OUT.value, _ACTION_KIND.value, **common)


def _parse_flags(argv: Sequence[str]):
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}. Fix: see python -m diamond_jax.dataset --help.", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}. Fix: pass every option as --name=value.",
              file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        dataset = run()
    except (DatasetError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(describe(dataset))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
