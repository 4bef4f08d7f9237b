"""The typed results of the Python API (api.py). Each has `passed` (the one verdict of the whole
call) and to_json(); the figures behind it stay in the dict the CLI prints under --json.

Budget figures use latency.VERDICTS: pass, fail, unverified (an estimate within budget), reported
(no budget)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


class _Json:
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)


@dataclass
class Checkpoint(_Json):
    """A quantized checkpoint folder written by edgeslm.quantizer."""

    folder: Path
    scheme: str
    facts: dict = field(default_factory=dict)


@dataclass
class Artifact(_Json):
    """An artifact folder written by edgeslm.exporter, with its manifest."""

    folder: Path
    target: str
    scheme: str
    manifest: dict = field(repr=False, default_factory=dict)

    @property
    def passed(self) -> bool | None:
        """The export's own verify: True / False, None when it was skipped."""
        parity = self.manifest.get("parity")
        return None if parity is None else bool(parity.get("passed"))

    @classmethod
    def open(cls, folder) -> "Artifact":
        from .artifact import read_manifest

        manifest = read_manifest(Path(folder))
        return cls(Path(folder), manifest.get("target", "?"), manifest.get("scheme", "?"), manifest)


@dataclass
class VerifyReport(_Json):
    passed: bool
    failures: list[str]
    figures: dict = field(repr=False, default_factory=dict)


@dataclass
class CheckReport(_Json):
    passed: bool
    verdicts: dict
    allow_estimates: bool
    results: list[dict] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "allow_estimates": self.allow_estimates, "verdicts": self.verdicts,
                "results": self.results}


@dataclass
class DeployReport(_Json):
    passed: bool
    out: Path
    report: dict = field(repr=False, default_factory=dict)
