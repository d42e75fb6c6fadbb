"""Regenerates what is built from our protos (proto/) with grpcio-tools: the Python stubs in driftlock_api/, and
the descriptor set Envoy's gRPC-JSON transcoder reads (driftlock_api/api_descriptor.pb).

    python -m driftlock_cli.protos            # write them
    python -m driftlock_cli.protos --check    # exit 1 if what is committed is stale

Generated files are never edited by hand; a test runs --check. google/api/annotations.proto and http.proto (the
REST mapping) and google/rpc/*.proto (error details) come from the googleapis-common-protos wheel, pinned in
pyproject.toml like grpcio-tools, so that the same sources always give the same bytes.
"""

import argparse
import filecmp
import importlib.metadata
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DESCRIPTOR_SET = Path("driftlock_api") / "api_descriptor.pb"
# Not imported by our protos, but needed by the transcoder to print the details of an error as JSON.
ERROR_PROTOS = ("google/rpc/status.proto", "google/rpc/error_details.proto")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def googleapis_include() -> Path:
    """The folder holding google/api/annotations.proto, from the googleapis-common-protos wheel."""
    try:
        files = importlib.metadata.files("googleapis-common-protos") or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("googleapis-common-protos is not installed (pip install -e '.[test]')") from None
    for file in files:
        if str(file).replace("\\", "/") == "google/api/annotations.proto":
            return Path(str(file.locate())).parent.parent.parent
    raise SystemExit("the googleapis-common-protos wheel ships no google/api/annotations.proto")


def _protoc(args: list[str]) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    # grpc_tools' well-known types first, so that google/protobuf/* always comes from the pinned protoc.
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"-I{googleapis_include()}", *args])
    if code != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def generate(output: Path) -> list[Path]:
    """Write the stubs and the descriptor set under `output` (the repository root in normal use); return the
    files written."""
    for proto in proto_files():
        _protoc([f"--python_out={output}", f"--pyi_out={output}", f"--grpc_python_out={output}", str(proto)])
    descriptor = output / DESCRIPTOR_SET
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    _protoc(
        [
            f"--descriptor_set_out={descriptor}",
            "--include_imports",
            *(str(proto.relative_to(PROTO_ROOT)) for proto in proto_files()),
            *ERROR_PROTOS,
        ]
    )
    written = [descriptor]
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
    parser.add_argument("--check", action="store_true", help="fail if the committed files differ from fresh ones")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            sys.exit("stale generated files (run `python -m driftlock_cli.protos`): " + ", ".join(stale))
        print("generated stubs and descriptor set are up to date")
        return
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
