"""The one exception type the CLI turns into a one-line message.

Every stage raises `UserError` for input a user can fix (unknown name, missing or corrupt file,
wrong shape); anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the offending path or value and what was expected."""
