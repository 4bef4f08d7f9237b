import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import the shared helpers in tiny.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_terminal_summary(terminalreporter):
    """The fuzz test's counts, so that every CI log says how many mutated inputs ran."""
    fuzz = sys.modules.get("test_fuzz")
    if fuzz is None or not fuzz.FUZZ_COUNTS:
        return
    total = sum(sum(c.values()) for c in fuzz.FUZZ_COUNTS.values())
    parts = ", ".join(f"{kind} {c['accepted']}+{c['refused']}" for kind, c in fuzz.FUZZ_COUNTS.items())
    terminalreporter.write_line(f"fuzz: {total} mutated inputs (accepted+refused per class): {parts}")
