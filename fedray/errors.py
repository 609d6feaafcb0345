"""Exceptions that the launcher turns into one clear line and a non-zero exit."""


class FedrayError(Exception):
    """Base class for errors a user can act on (bad config, bad data, bad cluster)."""


class ConfigError(FedrayError, ValueError):
    """A config value or combination is invalid. The message names the key and allowed values."""


class DataError(FedrayError, ValueError):
    """A data file is missing or malformed."""


class ClusterError(FedrayError, RuntimeError):
    """The Ray cluster is unreachable or lacks the resources asked for."""
