"""`python -m protonet.caffe script.py [args]` (or `-m module [args]`): run a pycaffe
script with `import caffe` resolving to protonet.caffe; its exit code is kept."""
import os
import runpy
import sys

USAGE = "usage: python -m protonet.caffe script.py [args...] | -m module [args...]"


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        sys.exit(2 if not argv else 0)
    from . import alias
    alias()
    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            sys.exit(2)
        sys.argv = argv[1:]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    if not os.path.exists(script):
        print(f"protonet.caffe: {script}: no such file", file=sys.stderr)
        sys.exit(2)
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
