"""The two kinds of failure the CLI distinguishes by exit code."""


class EdgeSLMError(Exception):
    """A user's mistake (bad path, bad file, unknown name). The CLI prints one line and exits 2.

    The message is kept on one line (whitespace runs folded), whatever a library's text put in it."""

    exit_code = 2

    def __init__(self, message: str = ""):
        super().__init__(" ".join(str(message).split()))


class CheckFailed(EdgeSLMError):
    """A check that ran and did not hold (a parity bound, a budget). The CLI exits 1."""

    exit_code = 1
