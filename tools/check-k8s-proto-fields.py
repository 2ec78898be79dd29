#!/usr/bin/env python3
"""Compare the emulated API server's protobuf schema with Kubernetes' generated.proto files.

Why: ``pairvol/localcluster/apiserver_protobuf.py`` decodes protobuf request bodies with
its own compact table of field numbers, because no registry our machines and CI reach
(PyPI, Debian, npm) ships the ``generated.proto`` files of ``k8s.io/api`` and
``k8s.io/apimachinery``. Wherever a checkout of those two repositories can be had, this
script checks every message and field of the table against them: same number, same JSON
name, compatible wire type, same repeated-ness. Exit status 1 on any difference.

Usage:
    python3 tools/check-k8s-proto-fields.py API_DIR APIMACHINERY_DIR
    # e.g. git clone --depth 1 https://github.com/kubernetes/api API_DIR (and apimachinery)

Run from the repository root with the package importable (``.venv/bin/python``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pairvol.localcluster.apiserver_protobuf import SCHEMA

# Where each message of our table is defined, relative to the two checkouts.
FILES = {
    "api": [
        "core/v1/generated.proto",
        "rbac/v1/generated.proto",
        "coordination/v1/generated.proto",
        "authentication/v1/generated.proto",
    ],
    "apimachinery": ["pkg/apis/meta/v1/generated.proto"],
}
_MESSAGE = re.compile(r"^message (\w+) \{$")
_FIELD = re.compile(r"^\s*(optional|repeated)?\s*([\w.<>, ]+?)\s+(\w+)\s*=\s*(\d+);")

# Our kinds -> proto types they may stand for.
_SCALARS = {"string": {"string"}, "bytes": {"bytes"}, "int": {"int32", "int64"}, "bool": {"bool"}}
_SPECIAL = {
    "time": {"Time", ".k8s.io.apimachinery.pkg.apis.meta.v1.Time"},
    "microtime": {"MicroTime", ".k8s.io.apimachinery.pkg.apis.meta.v1.MicroTime"},
    "fields": {"FieldsV1"},
    "map:string": {"map<string, string>"},
    "map:bytes": {"map<string, bytes>"},
}


def parse(paths: list[Path]) -> dict[str, dict[int, tuple[str, str, bool]]]:
    """message -> number -> (name, type, repeated) from .proto files (comments skipped)."""
    messages: dict[str, dict[int, tuple[str, str, bool]]] = {}
    current: dict[int, tuple[str, str, bool]] | None = None
    for path in paths:
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("//"):
                continue
            if m := _MESSAGE.match(line):
                current = messages.setdefault(m.group(1), {})
            elif line.startswith("}"):
                current = None
            elif current is not None and (f := _FIELD.match(line)):
                label, type_, name, number = f.groups()
                current[int(number)] = (name, type_.strip(), label == "repeated")
    return messages


def compatible(kind: str, proto_type: str) -> bool:
    if kind in _SCALARS:
        return proto_type in _SCALARS[kind]
    if kind in _SPECIAL:
        return proto_type in _SPECIAL[kind]
    return proto_type.rsplit(".", 1)[-1] == kind


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    roots = {"api": Path(argv[1]), "apimachinery": Path(argv[2])}
    paths = [roots[repo] / rel for repo, rels in FILES.items() for rel in rels]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"check-k8s-proto-fields: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    proto = parse(paths)
    problems = []
    for message, ours in SCHEMA.items():
        theirs = proto.get(message)
        if theirs is None:
            problems.append(f"{message}: no such message in generated.proto")
            continue
        for number, spec in ours.items():
            if number not in theirs:
                problems.append(f"{message}.{spec.name} = {number}: no field {number}")
                continue
            name, type_, repeated = theirs[number]
            if name != spec.name:
                problems.append(f"{message} field {number}: ours {spec.name!r}, generated.proto {name!r}")
            if not compatible(spec.kind, type_):
                problems.append(f"{message}.{name} = {number}: ours {spec.kind}, generated.proto {type_}")
            if repeated != spec.repeated:
                problems.append(f"{message}.{name} = {number}: repeated differs")
    for line in problems:
        print(line)
    checked = sum(len(v) for v in SCHEMA.values())
    print(f"check-k8s-proto-fields: {len(SCHEMA)} messages, {checked} fields, {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
