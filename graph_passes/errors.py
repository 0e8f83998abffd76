"""The error graph passes raise for input they cannot handle (unsupported width, no linears, ...).

The message names the problem and the fix in one line; the CLI prints it and exits with code 2.
"""


class GraphInputError(ValueError):
    """The graph or an option cannot be handled; the message says why and what to do instead."""
