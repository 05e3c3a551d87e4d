"""Generate the CRI's Python stubs from the vendored proto (specs/cri-api-v1.proto) with grpcio-tools.

The stubs are build output, never edited: `make setup` runs this, and it writes ``micropod/cri/gen/`` only when
the proto's hash differs from the one the last run recorded. The proto is compiled as if it lived at
``micropod/cri/gen/api.proto`` so that the generated gRPC module imports its messages by package path.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
GENERATED = PACKAGE / "gen"
PROTO = PACKAGE.parent.parent / "specs" / "cri-api-v1.proto"
STAMP = GENERATED / "SOURCE-SHA256"
OUTPUTS = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def proto_hash(proto: Path = PROTO) -> str:
    return hashlib.sha256(proto.read_bytes()).hexdigest()


def up_to_date(proto: Path = PROTO) -> bool:
    try:
        recorded = STAMP.read_text().strip()
    except FileNotFoundError:
        return False
    return recorded == proto_hash(proto) and all((GENERATED / name).exists() for name in OUTPUTS)


def generate(proto: Path = PROTO) -> None:
    from grpc_tools import protoc  # a build dependency only

    with tempfile.TemporaryDirectory() as tmp:
        include = Path(tmp) / "in"
        out = Path(tmp) / "out"
        target = include / "micropod" / "cri" / "gen"
        target.mkdir(parents=True)
        out.mkdir()
        shutil.copyfile(proto, target / "api.proto")
        well_known = Path(protoc.__file__).parent / "_proto"
        code = protoc.main(["grpc_tools.protoc", f"-I{include}", f"-I{well_known}", f"--python_out={out}",
                            f"--pyi_out={out}", f"--grpc_python_out={out}", str(target / "api.proto")])
        if code != 0:
            raise SystemExit(f"protoc failed on {proto} ({code})")
        staged = Path(tmp) / "gen"
        shutil.copytree(out / "micropod" / "cri" / "gen", staged)
        (staged / "__init__.py").write_text('"""Generated from specs/cri-api-v1.proto by micropod.cri.generate."""\n')
        (staged / "SOURCE-SHA256").write_text(proto_hash(proto) + "\n")
        shutil.rmtree(GENERATED, ignore_errors=True)
        shutil.copytree(staged, GENERATED)


def main() -> None:
    if not PROTO.exists():
        sys.exit(f"micropod: error: {PROTO} is missing; the CRI stubs are generated from it")
    if not up_to_date():
        generate()


if __name__ == "__main__":
    main()
