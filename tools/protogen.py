"""Generate the Python stubs for every contract under proto/ into libs/.

Run with --check in CI: it generates into a scratch folder and fails loudly
when the committed stubs differ from what the protos produce.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "libs"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    plugin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        "--mypy_opt=quiet",
        "--mypy_grpc_opt=quiet",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for proto in protos:
        package_dir = (out_dir / proto).parent
        while package_dir != out_dir:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent


def generated_files(base: Path) -> set[Path]:
    return {p.relative_to(base) for p in (base / "loyalty").rglob("*") if p.name.endswith(GENERATED_SUFFIXES)}


def check() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        generate(fresh)
        expected, actual = generated_files(fresh), generated_files(OUT_DIR)
        drift = sorted(str(p) for p in expected ^ actual)
        drift += sorted(str(p) for p in expected & actual if not filecmp.cmp(fresh / p, OUT_DIR / p, shallow=False))
    if drift:
        print("generated stubs are stale; run `make proto` and commit:", *drift, sep="\n  ", file=sys.stderr)
        return 1
    print(f"generated stubs match the protos ({len(expected)} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs drift")
    if parser.parse_args().check:
        return check()
    # Generate aside first: a proto that does not compile leaves the stubs as they were,
    # and the ones that change are replaced file by file rather than deleted then rewritten.
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        generate(fresh)
        expected = generated_files(fresh)
        for stale in generated_files(OUT_DIR) - expected:
            (OUT_DIR / stale).unlink()
        for path in sorted(expected):
            target = OUT_DIR / path
            if target.exists() and filecmp.cmp(fresh / path, target, shallow=False):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            (target.parent / "__init__.py").touch()
            shutil.copyfile(fresh / path, target.with_suffix(target.suffix + ".tmp"))
            target.with_suffix(target.suffix + ".tmp").replace(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
