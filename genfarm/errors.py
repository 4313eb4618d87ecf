"""User errors: one line that names what is wrong and how to fix it."""


class UserError(Exception):
    """A mistake in a job file, dataset, flag or request; shown as one line, never as a traceback."""

    def __init__(self, where: str, problem: str, fix: str = ""):
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        line = f"{self.where}: {self.problem}" if self.where else self.problem
        return f"{line}. Fix: {self.fix}" if self.fix else line
