"""Regenerates the Python stubs of our own protos (proto/ -> driftlock_kernel/api/) with grpcio-tools.

    python -m driftlock_cli.protos            # write the stubs
    python -m driftlock_cli.protos --check    # exit 1 if the committed stubs are stale

Generated files are never edited by hand; a test runs --check.
"""

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(output: Path) -> list[Path]:
    """Write the stubs under `output` (the repository root in normal use); return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in proto_files():
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={output}",
                f"--pyi_out={output}",
                f"--grpc_python_out={output}",
                str(proto),
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {proto}")
    written = []
    for proto in proto_files():
        stem = proto.relative_to(PROTO_ROOT).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            written.append(output / f"{stem}{suffix}")
        # Make every generated folder a package.
        folder = output / stem.parent
        while folder != output:
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text("")
            folder = folder.parent
    return written


def stale_files() -> list[str]:
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch))
        stale = []
        for path in fresh:
            committed = ROOT / path.relative_to(scratch)
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(str(committed.relative_to(ROOT)))
        return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs differ from fresh ones")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            sys.exit("stale generated stubs (run `python -m driftlock_cli.protos`): " + ", ".join(stale))
        print("generated stubs are up to date")
        return
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
