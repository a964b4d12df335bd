"""The error a job is refused with before any work: a bad config, or a config the model cannot take.

Its own module, so that format modules (which name what they cannot hold) and the config (which asks
them) import it without importing each other.
"""


class ConfigError(ValueError):
    pass
