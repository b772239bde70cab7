"""``python -m codegen gen|check``: generate ``generated/`` or check it is fresh."""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

from codegen.build import generate
from codegen.render_ts import check_ts
from daemoneye_eventbus.errors import SchemaError


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codegen", description=__doc__)
    parser.add_argument("command", choices=["gen", "check"])
    parser.add_argument("--proto", type=Path, default=Path("proto"), help="schema root")
    parser.add_argument("--out", type=Path, default=Path("generated"), help="output root")
    parser.add_argument(
        "--ts-out",
        type=Path,
        default=None,
        help="also generate the TypeScript SDK code here (needs clients/typescript/node_modules)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "gen":
            written = generate(args.proto, args.out, args.ts_out)
            print(f"generated {len(written)} files into {args.out}/")
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            generate(args.proto, Path(tmp))
            fresh, committed = _files(Path(tmp)), _files(args.out)
        ts_stale = [] if args.ts_out is None else check_ts(args.proto, args.ts_out)
    except SchemaError as exc:
        print(f"codegen: broken schema: {exc}", file=sys.stderr)
        return 2
    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    if ts_stale:
        print(f"{args.ts_out}/ is stale; run `make gen`. Differing files:", file=sys.stderr)
        for name in ts_stale:
            print(f"  {name}", file=sys.stderr)
    elif args.ts_out is not None:
        print(f"{args.ts_out}/ is fresh")
    if not stale:
        print(f"{args.out}/ is fresh ({len(fresh)} files)")
        return 1 if ts_stale else 0
    print(f"{args.out}/ is stale; run `make gen`. Differing files:", file=sys.stderr)
    for name in stale:
        print(f"  {name}", file=sys.stderr)
        old = committed.get(name, b"").decode(errors="replace").splitlines()
        new = fresh.get(name, b"").decode(errors="replace").splitlines()
        for line in list(difflib.unified_diff(old, new, "committed", "fresh", lineterm=""))[:20]:
            print(f"    {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
