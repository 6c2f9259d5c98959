"""Errors meant for users: the CLI prints them as one line, without a traceback."""


class RqgenError(Exception):
    """Base class: a problem with the user's input, not a bug in rqgen."""


class DataError(RqgenError):
    """Images could not be found or read."""


class ConfigError(RqgenError):
    """A config file, preset name or key=value override is wrong."""


class CheckpointError(RqgenError):
    """A checkpoint directory is missing, corrupt or does not match the model."""


class TrainingError(RqgenError):
    """Training cannot continue (e.g. the loss became NaN)."""


class Interrupted(RqgenError):
    """SIGINT / SIGTERM: training saved a checkpoint at a step boundary and stopped."""

    exit_code = 130


class DeviceError(RqgenError):
    """The requested device does not exist here or cannot be used this way."""
