"""The one exception the CLI turns into a single clear line and exit code 2."""


class LabError(Exception):
    """The lab could not run: bad input, no database, a handler that cannot be called.

    The message is shown to the user as is, on one line, so it must say what to do.
    """
