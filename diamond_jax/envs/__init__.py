"""Real environments (envpool Atari with DIAMOND's preprocessing)."""
