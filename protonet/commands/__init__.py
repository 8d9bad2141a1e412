"""Subcommands of the `protonet` CLI, one module each (see protonet.cli)."""
