"""Errors the user can fix.

A `UserError` carries one line that says what is wrong and what to do about it. The CLI prints it as
`error: <message>` (no traceback) and exits with status 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a one-line message naming the problem and the fix."""
