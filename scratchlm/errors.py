"""One exception type for problems the *user* can fix.

The CLI catches `UserError`, prints its message on one line and exits with code 2.
Anything else is a bug in scratchlm and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a missing file, an impossible config, a corrupt checkpoint...

    The message says what is wrong and what to do about it, in one line.
    """
