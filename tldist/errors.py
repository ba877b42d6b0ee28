"""Errors caused by the user's input (files, keys, values).

The CLI prints these as one clear line and exits with status 2 instead of a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message names the file, key or value and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key."""


class DataError(UserError):
    """A shard, manifest or sample is missing or unusable; the message names it."""
