"""Generate the Python code for spie's protos (run by `make protos`).

Runs grpc_tools.protoc over every .proto under protos/ with `-I protos`, writing `*_pb2.py`,
`*_pb2.pyi` stubs and `*_pb2_grpc.py` next to each .proto. protoc writes imports relative to the
include root (`from spie.reward.v1 import ...`); they are rewritten to `protos.spie...` so the code
imports from the installed `protos` package. The generated files are committed;
tests/reward_servers/test_protos.py regenerates into a temporary folder and fails when they differ.

Usage: python protos/generate.py [--out DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto under `root`, sorted, as paths relative to it."""
    return sorted(p.relative_to(root) for p in root.rglob("*.proto"))


def generate(out: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc into `out`; return the generated files (relative to `out`)."""
    import grpc_tools
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = [str(p) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {protos}")
    generated = []
    for path in sorted(out.rglob("*_pb2*.py*")):
        text = path.read_text()
        # `from spie.reward.v1 import reward_pb2` -> `from protos.spie.reward.v1 import reward_pb2`
        fixed = re.sub(r"^from spie(\.| )", r"from protos.spie\1", text, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
        generated.append(path.relative_to(out))
    # Make each generated folder an importable package.
    for rel in {p.parent for p in generated}:
        for parent in [rel, *rel.parents]:
            init = out / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output folder (default: protos/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {args.out / path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
