"""Print a schema's messages, fields and enums one per line, to compare schemas.

tests/data/bvlc_caffe_schema.txt is this summary of BVLC Caffe master's
caffe.proto; tests/test_schema.py checks that every line of it is still in
protonet's schema (fork fields are extra lines, never changed ones).

    python tools/schema_summary.py                     # protonet's schema
    python tools/schema_summary.py path/to/caffe_pb2.py  # another compiled one
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path



def _label(field) -> str:
    return ("repeated" if field.is_repeated else
            "required" if field.is_required else "optional")


def _default(field) -> str:
    if not field.has_default_value:
        return "-"
    value = field.default_value
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, float):
        return repr(float.fromhex(value.hex()))   # exact float text
    return repr(value)


def _lines(desc, out: list[str]) -> None:
    for enum in desc.enum_types:
        for v in enum.values:
            out.append(f"enum {enum.full_name} {v.name} = {v.number}")
    for f in desc.fields:
        kind = (f.message_type.full_name if f.message_type is not None else
                f.enum_type.full_name if f.enum_type is not None else str(f.type))
        packed = " packed" if f.is_packed else ""
        out.append(f"field {desc.full_name}.{f.name} = {f.number} {_label(f)} "
                   f"{kind} default={_default(f)}{packed}")
    for nested in desc.nested_types:
        _lines(nested, out)


def summary(module) -> list[str]:
    """One line per enum value and field of the compiled schema `module`."""
    out: list[str] = []
    file = module.DESCRIPTOR
    for enum in file.enum_types_by_name.values():
        for v in enum.values:
            out.append(f"enum {enum.full_name} {v.name} = {v.number}")
    for desc in file.message_types_by_name.values():
        _lines(desc, out)
    return sorted(out)


def main(argv: list[str]) -> int:
    if argv:
        spec = importlib.util.spec_from_file_location("other_pb2", argv[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from protonet.proto import caffe_pb2 as module
    print("\n".join(summary(module)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
