"""edgeslm: fine-tune, quantize once, export and verify small language models for edge targets.

The Python API (api.py), re-exported here and imported on first use, so that `import edgeslm`
(and `edgeslm --help`) stays light: load, quantize, export, verify, check, deploy.
"""

__version__ = "0.1.0"
__all__ = ["load", "quantize", "export", "verify", "check", "deploy", "EdgeSLMError", "CheckFailed"]


def __getattr__(name):
    if name in ("load", "quantize", "export", "verify", "check", "deploy"):
        from . import api

        return getattr(api, name)
    if name in ("EdgeSLMError", "CheckFailed"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'edgeslm' has no attribute {name!r}")
