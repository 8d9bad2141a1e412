"""Regenerate protonet/proto/caffe_pb2.py from protos/caffe.proto.

The generated module is committed so that protonet needs only the protobuf
runtime, not a compiler.  This script keeps it reproducible: it runs the
protoc bundled with grpcio-tools (``pip install grpcio-tools``).

    python tools/gen_proto.py           # rewrite the committed module
    python tools/gen_proto.py --check   # exit 1 if it is out of date
"""
import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "protonet" / "proto"
MODULE = "caffe_pb2.py"


def generate(out_dir: Path) -> None:
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}",
            str(PROTO_DIR / "caffe.proto")]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only verify the committed module is up to date")
    if not parser.parse_args().check:
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        committed = OUT_DIR / MODULE
        if committed.is_file() and filecmp.cmp(Path(tmp) / MODULE, committed,
                                               shallow=False):
            return 0
    print(f"{OUT_DIR / MODULE} is stale; run python tools/gen_proto.py",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
