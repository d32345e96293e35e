class UserError(Exception):
    """A one-line error the user can fix."""
