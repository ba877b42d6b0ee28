"""Errors caused by the user's input (files, keys, values).

The CLI prints these as one clear line and exits with status 2 instead of a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message names the file, key or value and how to fix it."""

    same_on_every_rank = False
    """True when every rank of a job raises it alike (set on instances); the CLI prints it once."""


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key. Every rank reads the same
    config, so every rank raises it alike and the CLI prints it on rank 0 only."""

    same_on_every_rank = True


class DataError(UserError):
    """A shard, manifest or sample is missing or unusable; the message names it."""
