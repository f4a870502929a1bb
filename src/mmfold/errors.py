"""Exceptions for problems the user can fix; the CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input, an existing file, a missing earlier stage: a clear message, no traceback."""


class DataError(UserError, ValueError):
    """An input file is malformed; the message names the file and the offending rows."""
