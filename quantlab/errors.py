"""The only exceptions the library raises. The CLI maps them to exit codes in one place."""


class QuantlabError(Exception):
    """Base class. The message is one line: what went wrong, then how to fix it."""

    exit_code = 1


class UsageError(QuantlabError):
    """The user asked for something that cannot be (bad option, unknown name)."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe name or recipe file is wrong."""


class ModelLoadError(QuantlabError):
    """A model reference could not be resolved or loaded."""


class DataError(QuantlabError):
    """Evaluation or calibration text is missing or unusable."""


class MissingExtraError(QuantlabError):
    """A method needs a library that is not installed."""


class StoreError(QuantlabError):
    """The results store could not be read or written."""


class MeasurementError(QuantlabError):
    """An isolated measurement subprocess failed."""


class DiskFullError(QuantlabError):
    """A write ran out of space; the message names the folder and its free space."""
