"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A problem in the user's input: the CLI prints the message on one line and exits with 2."""
