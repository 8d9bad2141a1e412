"""Subcommands of the `protonet` CLI, one module each (see protonet.cli).

`protonet --help` imports every command module to build its parser, so these modules
import only the standard library and light protonet parts (errors, protobuf I/O) at
the top; torch and the net machinery are imported inside each command's function.
tests/test_cli_startup.py checks that commands which run no net never load torch.
"""

# protonet.speed.PRECISIONS' names, for --precision choices without importing torch
# (a test checks that the two agree).
PRECISION_NAMES = ("fp32", "bf16", "fp16")
