"""Generate the Python code of the memspace.v1 API from contract/proto into
contract/memspace_contract/v1 (messages, gRPC stubs and their .pyi type stubs).

    python contract/proto/generate.py            write the generated files
    python contract/proto/generate.py --check    exit 1 if the committed files are stale

Needs the lint extras (grpcio-tools, mypy-protobuf). The generated files are committed and never
edited by hand; a test runs `--check`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "contract" / "proto"
PROTO = Path("memspace/v1/memspace.proto")
TARGET = REPO / "contract" / "memspace_contract" / "v1"
PACKAGE_INIT = (
    '"""Generated code of the memspace.v1 gRPC API (see contract/proto/generate.py)."""\n'
)

# protoc names the modules after the proto path (memspace.v1); they live in memspace_contract.v1.
_FIXES: dict[str, list[tuple[str, str]]] = {
    "memspace_pb2.py": [
        (r"'memspace\.v1\.memspace_pb2'", "'memspace_contract.v1.memspace_pb2'"),
    ],
    "memspace_pb2_grpc.py": [
        (
            r"^from memspace\.v1 import memspace_pb2 as",
            "from memspace_contract.v1 import memspace_pb2 as",
        ),
    ],
    "memspace_pb2_grpc.pyi": [
        (
            r"^from memspace\.v1 import memspace_pb2 as",
            "from memspace_contract.v1 import memspace_pb2 as",
        ),
    ],
    "memspace_pb2.pyi": [],
}


def _plugin(name: str) -> str:
    """The path of a protoc plugin installed next to this Python (the venv's bin)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        sys.exit(f"{name} not found: install the lint extras (pip install -e '.[lint]')")
    return found


def generate(out: Path) -> None:
    """Run protoc into `out` and fix the imports; `out` receives the four generated files."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            str(PROTO),
        ]
        # Our own interpreter and plugins, fixed arguments: no untrusted input.
        done = subprocess.run(command, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            sys.exit(f"protoc failed:\n{done.stderr}")
        produced = Path(tmp) / PROTO.parent
        out.mkdir(parents=True, exist_ok=True)
        for name, fixes in _FIXES.items():
            text = (produced / name).read_text()
            for pattern, replacement in fixes:
                text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
                if count == 0:
                    sys.exit(f"{name}: expected {pattern!r} in protoc's output; update the fixes")
            (out / name).write_text(text)
        init = out / "__init__.py"
        init.write_text(PACKAGE_INIT)


def stale_files(generated: Path, committed: Path) -> list[str]:
    names = [*_FIXES, "__init__.py"]
    return [
        name
        for name in names
        if not (committed / name).is_file()
        or (committed / name).read_bytes() != (generated / name).read_bytes()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(TARGET)
        print(f"generated {', '.join(sorted(_FIXES))} in {os.path.relpath(TARGET, REPO)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = stale_files(Path(tmp), TARGET)
    if stale:
        print(
            f"stale generated code: {', '.join(stale)}; run python contract/proto/generate.py",
            file=sys.stderr,
        )
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
