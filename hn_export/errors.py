"""The error a user can fix: the CLI prints its message on one line and exits with code 2."""


class UserError(Exception):
    """Bad input. The message names the problem and the fix, in one line."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}; {fix}")
