"""`edgeslm VERB ...`: one module per verb (MLC-LLM's interface/ layout), one table of verbs.

A verb module defines HELP, `add_arguments(parser)` and `run(args) -> int`. User mistakes raise
EdgeSLMError and become one line on stderr with exit code 2; failed checks exit 1.
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


def quiet_third_party_noise():
    """Import-time chatter of optional backends (torchao's missing CUDA extensions, pytree notices)."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TORCHINDUCTOR_DISABLE_PROGRESS", "1")
    for name in ("torchao", "coremltools", "executorch", "tvm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="edgeslm",
        description="Fine-tune, quantize once, export and verify small language models for edge targets.",
        epilog="Run 'edgeslm VERB --help' for a verb's options. Exit codes: 0 ok, 1 a check failed, 2 bad input.",
    )
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
    quiet_third_party_noise()
    try:
        return int(modules[args.verb].run(args) or 0)
    except EdgeSLMError as e:
        print(f"edgeslm {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"edgeslm {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
