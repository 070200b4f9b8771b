"""Exceptions a user can cause. The CLI prints their message as one red line."""


class DmlkitError(Exception):
    """A problem the user can fix; the message says what to do."""


class UnknownComponentError(DmlkitError, KeyError):
    """No component of that kind has that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class OptionError(DmlkitError, ValueError):
    """An option is unknown, missing, or of the wrong type or range."""


class FoldsError(OptionError):
    """Validation folds that cannot tell models apart (a fold of fewer than two classes); the
    message names the fold, so a caller passes it on as it is."""


class ClashError(DmlkitError):
    """Two plugins register the same component name."""


class DataError(DmlkitError):
    """A dataset root, file or image is missing, malformed or unreadable."""


class TrainingError(DmlkitError):
    """Training cannot go on (non-finite loss, out of memory, a failing plugin)."""


class DmlkitDeprecationWarning(DeprecationWarning):
    """A plugin or script uses a name that dmlkit will remove in its next minor release; the
    message says what to use instead. The command line shows these; ``check_plugin`` lists them."""
