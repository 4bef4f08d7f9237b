"""Helpers for tests that signal the CLI in a subprocess."""

import signal


def sigint_default():
    """preexec_fn: SIGINT back to its default in the child, so that Python turns it into
    KeyboardInterrupt even when the tests run in a background job, which a shell starts with SIGINT
    ignored (and an ignored SIGINT is inherited, and kept by Python)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
