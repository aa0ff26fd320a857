"""The ``portable-ckpt`` command: parse arguments, call the library, report.

Exit status: 0 success, 1 invalid or unreadable checkpoint, 2 usage error. Data goes to stdout,
diagnostics to stderr; tracebacks only with ``--traceback``.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from portable_ckpt.convert.format0 import convert
from portable_ckpt.errors import CheckpointError
from portable_ckpt.inspect import inspect_checkpoint, validate_checkpoint

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def escape(text: str) -> str:
    """Control characters shown as escapes, so a hostile name cannot drive the terminal."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def _print_json(doc: Any, out: TextIO) -> None:
    out.write(json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=True) + "\n")


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    info = inspect_checkpoint(args.path)
    if args.json:
        _print_json(info, out)
        return EXIT_OK
    out.write(f"checkpoint      {escape(info['path'])}\n")
    out.write(f"format_version  {info['format_version']}\nstep            {info['step']}\n")
    if "producer" in info:
        p = info["producer"]
        out.write(f"created_at      {info['created_at']}\n")
        out.write(f"producer        {p['name']} {p['version']}, torch {p.get('torch', '?')}\n")
    out.write("files\n")
    for f in info["files"]:
        out.write(f"  {escape(f['name']):32} {human_size(f['size']):>12}\n")
    out.write(f"tensors ({len(info['tensors'])})\n")
    for t in info["tensors"]:
        out.write(f"  {escape(t['name']):40} {t['dtype']:6} {t['shape']}\n")
    for alias, target in info["aliases"].items():
        out.write(f"  {escape(alias):40} -> {escape(target)} (tied)\n")
    q = info["quantization"]
    if q is None:
        out.write("quantization    none (full precision)\n")
    else:
        ratio = q["quantized_bytes"] / q["float32_bytes"] if q.get("float32_bytes") else float("nan")
        out.write(
            f"quantization    {q['mode']}, int{q['bits']}, {'symmetric' if q.get('symmetric') else 'asymmetric'}, "
            f"{q.get('granularity')}{'' if not q.get('group_size') else ' ' + str(q['group_size'])}\n"
            f"                quantized layers {human_size(q['quantized_bytes'])} vs "
            f"{human_size(q['float32_bytes'])} in fp32 ({ratio:.1%})\n"
        )
    return EXIT_OK


def cmd_validate(args: argparse.Namespace, out: TextIO) -> int:
    results = {str(p): validate_checkpoint(p) for p in args.paths}
    if args.json:
        _print_json(
            {
                "valid": not any(results.values()),
                "checkpoints": [
                    {
                        "path": path,
                        "valid": not problems,
                        "problems": [{"file": p.file, "error": p.error, "message": p.message} for p in problems],
                    }
                    for path, problems in results.items()
                ],
            },
            out,
        )
    else:
        for path, problems in results.items():
            if not problems:
                out.write(f"ok       {escape(path)}\n")
            for p in problems:
                out.write(f"INVALID  {escape(path)}: {escape(p.file)}: {escape(p.message)} [{p.error}]\n")
    return EXIT_INVALID if any(results.values()) else EXIT_OK


def cmd_convert(args: argparse.Namespace, out: TextIO) -> int:
    path = convert(args.src, args.dst, overwrite=args.overwrite)
    out.write(f"{escape(str(path))}\n")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from portable_ckpt.demo.demo import run_demo  # imports the trainer; only the demo needs it

    return run_demo(args.dir, quantize=args.quantize, out=out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portable-ckpt", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--traceback", action="store_true", help="show tracebacks of known errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="describe a checkpoint: version, step, files, tensors, quantization")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_inspect)
    p = sub.add_parser("validate", help="check checkpoints against the schemas, checksums and headers")
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_validate)
    p = sub.add_parser("convert", help="rewrite a format-0 checkpoint as format 1 under the root DST")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_convert)
    p = sub.add_parser("demo", help="train, kill, resume bit-identically, inspect and validate")
    p.add_argument("--dir", default="portable-ckpt-demo", help="where to write (default: ./portable-ckpt-demo)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="also run the quantized chapter")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse reports usage errors by exiting
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace, TextIO], int] = args.run
    try:
        return run(args, out)
    except CheckpointError as e:
        if args.traceback:
            traceback.print_exc(file=err)
        err.write(f"portable-ckpt {args.command}: {type(e).__name__}: {escape(str(e))}\n")
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
