"""Lists a webgpu artifact's WGSL shaders with their sizes (until `edgeslm verify` prints
Target.inspect): python -m edgeslm.targets.webgpu.list_shaders FOLDER [--json]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    from edgeslm.artifact import read_manifest
    from edgeslm.errors import EdgeSLMError

    from . import TARGET

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = p.parse_args(argv)
    try:
        manifest = read_manifest(Path(args.folder))
    except EdgeSLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    facts = TARGET.inspect(Path(args.folder), manifest)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    for name, size in sorted(facts["shaders"].items(), key=lambda kv: -kv[1]):
        print(f"{size:>9,d}  shaders/{name}")
    print(f"{facts['shader_bytes']:>9,d}  total in {len(facts['shaders'])} WGSL shaders; "
          f"model.wasm {facts['wasm_bytes']:,d} bytes; {len(facts['shards'])} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
