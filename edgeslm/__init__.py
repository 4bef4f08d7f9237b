"""edgeslm: fine-tune, quantize once, export and verify small language models for edge targets."""

__version__ = "0.1.0"
