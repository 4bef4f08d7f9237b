"""`edgeslm VERB ...`: one module per verb (MLC-LLM's interface/ layout), one table of verbs.

A verb module defines HELP, `add_arguments(parser)` and `run(args) -> int`. Exit codes: 0 success;
1 a check failed (CheckFailed); 2 bad input (EdgeSLMError), one line on stderr; 3 an unexpected
error (a bug): one line on stderr naming a file that holds the traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

VERBS = {
    "info": "edgeslm.cli.info",
    "eval": "edgeslm.cli.eval",
    "quantize": "edgeslm.cli.quantize",
    "finetune": "edgeslm.cli.finetune",
    "deploy": "edgeslm.cli.deploy",
    "export": "edgeslm.cli.export",
    "verify": "edgeslm.cli.verify",
    "check": "edgeslm.cli.check",
    "bench": "edgeslm.cli.bench",
    "run": "edgeslm.cli.run",
    "recommend": "edgeslm.cli.recommend",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="edgeslm",
        description="Fine-tune, quantize once, export and verify small language models for edge targets.",
        epilog="Run 'edgeslm VERB --help' for a verb's options. Exit codes: 0 ok, 1 a check failed, 2 bad input, "
               "3 an unexpected error (traceback written to a file it names).",
    )
    parser.add_argument("--version", action="version", version=f"edgeslm {version()}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="no progress bars (errors still print)")
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="keep the third-party libraries' warnings and logs (silenced by default)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    modules = {}
    for verb, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        modules[verb] = module
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
    return parser, modules


def main(argv=None) -> int:
    from edgeslm.errors import EdgeSLMError

    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    from edgeslm.console import quiet_third_party_noise

    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it for every bar
    if not args.verbose:
        quiet_third_party_noise()
    try:
        return int(modules[args.verb].run(args) or 0)
    except EdgeSLMError as e:
        print(f"edgeslm {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"edgeslm {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not the user's mistake: keep the traceback, show one line
        path = write_traceback(args.verb)
        print(f"edgeslm {args.verb}: internal error: {type(e).__name__}: {str(e)[:300]} "
              f"(traceback in {path}; please report it)", file=sys.stderr)
        return 3


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("edgeslm")
    except metadata.PackageNotFoundError:
        return "unknown"


def write_traceback(verb: str) -> str:
    """The current exception's traceback, in a file under the system's temporary folder."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"edgeslm-{verb}-", suffix=".traceback.txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"edgeslm {version()} {' '.join(sys.argv)}\n")
        traceback.print_exc(file=f)
    return path


if __name__ == "__main__":
    sys.exit(main())
