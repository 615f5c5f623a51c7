"""Trainer backends (each holds all imports of its framework)."""
