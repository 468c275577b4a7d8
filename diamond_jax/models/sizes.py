"""Channel groupings of the layers (models/blocks.py), which config validation checks channel counts against.
Plain Python: the config imports this before JAX may be imported (main picks JAX's platform after parsing it)."""

GN_GROUP_SIZE = 32  # channels per GroupNorm group, at least one group
ATTN_HEAD_DIM = 8  # channels per self-attention head, at least one head


def num_groups(channels: int) -> int:
    return max(1, channels // GN_GROUP_SIZE)


def num_heads(channels: int) -> int:
    return max(1, channels // ATTN_HEAD_DIM)
