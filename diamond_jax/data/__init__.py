"""Replay data: episodes, segment sampling, persistence."""
