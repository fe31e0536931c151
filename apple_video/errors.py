"""One exception family. `cli.py` prints `UserError`s as one line and exits 2; anything else exits 1."""

from __future__ import annotations


class AppleVideoError(Exception):
    """Base class of every error the tool raises on purpose."""

    exit_code = 1


class UserError(AppleVideoError):
    """Bad usage or bad input: the user can fix it. Exit code 2."""

    exit_code = 2


class InputError(UserError):
    """An input file is missing, empty, corrupt or unsupported."""


class OutputError(UserError):
    """The output path is unusable (exists without --force, equals the input, missing directory)."""


class ConfigError(UserError):
    """A settings file or option has an unknown key or a bad value."""


class NoFaceError(UserError):
    """No usable face where one is required (for example in the source photo)."""


class WeightsError(UserError):
    """A model file is missing or corrupt."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} (run `apple-video weights where` to see where model files go)")


class DecodeError(InputError):
    """A video could not be decoded past some frame (the message names it)."""


class DeviceError(UserError):
    """An accelerator was asked for but is not usable."""


class WorkerError(AppleVideoError):
    """A stage worker failed with an error that is not one of ours: one line naming the node (trace with --debug)."""
