"""Sweeps of the Atari 100k benchmark on a SLURM cluster or on one machine (see launch/README.md)."""
