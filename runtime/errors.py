"""Errors the runtime raises for input a user can fix (one line: the problem and the fix)."""


class RuntimeInputError(ValueError):
    """Bad model file, bad inputs, unusable kernel library or provider."""
