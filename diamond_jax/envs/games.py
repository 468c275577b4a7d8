"""The 26 games of the Atari 100k benchmark and the names of their actions."""

ATARI_100K_GAMES = (
    "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
    "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero",
    "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert",
    "RoadRunner", "Seaquest", "UpNDown",
)

# ALE's 18 actions, in the order of its action enum: the full action set, and the action indices of envpool
# with full_action_space=True.
ATARI_ACTION_NAMES = (
    "NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT",
    "UPFIRE", "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE", "DOWNLEFTFIRE",
)

# The minimal action set of each game that has fewer than 18 actions, as ALE's game settings define it (ALE
# lists a minimal set in enum order); envpool gives only its size. Action i of an env is the i-th name here.
_REDUCED_ACTION_SETS = {
    "Amidar": "NOOP FIRE UP RIGHT LEFT DOWN UPFIRE RIGHTFIRE LEFTFIRE DOWNFIRE",
    "Assault": "NOOP FIRE UP RIGHT LEFT RIGHTFIRE LEFTFIRE",
    "Asterix": "NOOP UP RIGHT LEFT DOWN UPRIGHT UPLEFT DOWNRIGHT DOWNLEFT",
    "Breakout": "NOOP FIRE RIGHT LEFT",
    "CrazyClimber": "NOOP UP RIGHT LEFT DOWN UPRIGHT UPLEFT DOWNRIGHT DOWNLEFT",
    "DemonAttack": "NOOP FIRE RIGHT LEFT RIGHTFIRE LEFTFIRE",
    "Freeway": "NOOP UP DOWN",
    "Gopher": "NOOP FIRE UP RIGHT LEFT UPFIRE RIGHTFIRE LEFTFIRE",
    "KungFuMaster": ("NOOP UP RIGHT LEFT DOWN DOWNRIGHT DOWNLEFT RIGHTFIRE LEFTFIRE DOWNFIRE UPRIGHTFIRE UPLEFTFIRE "
                     "DOWNRIGHTFIRE DOWNLEFTFIRE"),
    "MsPacman": "NOOP UP RIGHT LEFT DOWN UPRIGHT UPLEFT DOWNRIGHT DOWNLEFT",
    "Pong": "NOOP FIRE RIGHT LEFT RIGHTFIRE LEFTFIRE",
    "Qbert": "NOOP FIRE UP RIGHT LEFT DOWN",
    "UpNDown": "NOOP FIRE UP DOWN UPFIRE DOWNFIRE",
}
MINIMAL_ACTION_SETS = {game: tuple(_REDUCED_ACTION_SETS[game].split()) if game in _REDUCED_ACTION_SETS
                       else ATARI_ACTION_NAMES for game in ATARI_100K_GAMES}


def action_names(game: str, full_action_space: bool = False) -> tuple:
    """The names of the game's actions, by action index (the minimal set unless full_action_space)."""
    if game not in MINIMAL_ACTION_SETS:
        raise ValueError(f"Unknown game {game!r}. The Atari 100k games are: {', '.join(ATARI_100K_GAMES)} "
                         "(case-sensitive).")
    return ATARI_ACTION_NAMES if full_action_space else MINIMAL_ACTION_SETS[game]
