"""The error model builders raise for input a user can fix (one line: the problem and the fix)."""


class ModelInputError(ValueError):
    """Bad preset, config or checkpoint. The message names the problem and the fix, in one line."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}; {fix}")
