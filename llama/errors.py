class UserError(Exception):
    """A problem with the user's input (paths, flags, prompts): the CLIs print its one-line message and exit."""
