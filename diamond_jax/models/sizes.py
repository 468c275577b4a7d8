"""Channel groupings of the layers (models/blocks.py), which config validation checks channel counts against.
Plain Python: the config imports this before JAX may be imported (main picks JAX's platform after parsing it)."""

import math

GN_GROUP_SIZE = 32  # channels per GroupNorm group, at least one group
ATTN_HEAD_DIM = 8  # channels per self-attention head, at least one head


def num_groups(channels: int) -> int:
    return max(1, channels // GN_GROUP_SIZE)


def num_heads(channels: int) -> int:
    return max(1, channels // ATTN_HEAD_DIM)


def cond_channels_for(cond_channels: int, num_steps_conditioning: int) -> int:
    """The smallest width >= cond_channels that is even (Fourier features) and splits into one action embedding
    per conditioning step: what a config error suggests."""
    multiple = math.lcm(2, num_steps_conditioning)
    return -(-max(cond_channels, 1) // multiple) * multiple
