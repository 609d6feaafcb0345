"""Exceptions that the launcher turns into one clear line and a non-zero exit."""


class FedrayError(Exception):
    """Base class for errors a user can act on (bad config, bad data, bad cluster)."""


class ConfigError(FedrayError, ValueError):
    """A config value or combination is invalid. The message names the key and allowed values."""


class DataError(FedrayError, ValueError):
    """A data file is missing or malformed."""


class ClusterError(FedrayError, RuntimeError):
    """The Ray cluster is unreachable or lacks the resources asked for."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the rounds cleanly after ``round``, checkpointed in ``checkpoint_dir``."""

    def __init__(self, round_num: int, checkpoint_dir) -> None:
        super().__init__(f"interrupted after round {round_num}")
        self.round = round_num
        self.checkpoint_dir = checkpoint_dir
