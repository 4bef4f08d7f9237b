"""The two kinds of failure the CLI distinguishes by exit code."""


class EdgeSLMError(Exception):
    """A user's mistake (bad path, bad file, unknown name). The CLI prints one line and exits 2."""

    exit_code = 2


class CheckFailed(EdgeSLMError):
    """A check that ran and did not hold (a parity bound, a budget). The CLI exits 1."""

    exit_code = 1
