"""The ``portable-ckpt`` command: parse arguments, call the library, report.

Exit status: 0 success, 1 invalid or unreadable checkpoint, 2 usage error (``diff``: 0 identical,
1 different, 2 usage error or unreadable, as diff(1)). Data goes to stdout, diagnostics and progress
(only on a terminal) to stderr; tracebacks only with ``--traceback``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from portable_ckpt import (
    CheckpointError,
    consolidate_checkpoint,
    convert_format0,
    diff_checkpoints,
    export_checkpoint,
    import_checkpoint,
    inspect_checkpoint,
    list_checkpoints,
    validate_checkpoint,
)
from portable_ckpt.report import (
    ProgressLine,
    escape,
    render_diff,
    render_info,
    render_listing,
    render_validation,
)
from portable_ckpt.types import Progress
from portable_ckpt.version import __version__

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2

Command = Callable[[argparse.Namespace, TextIO, TextIO], int]  # (arguments, stdout, stderr) -> exit status

DESCRIPTION = """\
Inspect, validate and convert portable-ckpt checkpoints, list those of a root and compare two:
PyTorch training checkpoints stored as a directory of safetensors weights and JSON metadata, with a
format version and a checksum for every file. PATH is a checkpoint directory (step-NNNNNNNN/) or a
checkpoints root, which means its newest committed checkpoint."""

# name -> (what it does, an example): the command list of ``portable-ckpt --help``
COMMANDS = {
    "inspect": ("what a checkpoint holds", "portable-ckpt inspect checkpoints"),
    "list": ("every checkpoint of a root, checked", "portable-ckpt list checkpoints"),
    "validate": ("verify checksums, schemas, headers", "portable-ckpt validate checkpoints/step-00000100"),
    "diff": ("what differs between two checkpoints", "portable-ckpt diff run-a/checkpoints run-b/checkpoints"),
    "convert": ("a format-0 checkpoint to format 1", "portable-ckpt convert old-run/ checkpoints"),
    "import": ("a foreign checkpoint as format 1", "portable-ckpt import out/ckpt.pt checkpoints"),
    "export": ("a checkpoint as a Hugging Face folder", "portable-ckpt export checkpoints hf-model --to hf"),
    "consolidate": ("a sharded checkpoint as one-process", "portable-ckpt consolidate dist-ckpts single"),
    "demo": ("train, SIGKILL, resume bit-identically", "portable-ckpt demo --quantize int8"),
}

EPILOG = (
    "commands (portable-ckpt COMMAND --help says what each prints):\n"
    + "".join(f"  {name:12} {summary:40} {example}\n" for name, (summary, example) in COMMANDS.items())
    + """
exit status: 0 ok, 1 invalid or unreadable checkpoint, 2 usage error (diff: 0 identical, 1 different).
Data goes to stdout, diagnostics to stderr (with progress, when it is a terminal); --traceback also
prints the traceback of a known error."""
)

INSPECT = """\
Describe the checkpoint at PATH from its manifest and safetensors header, without reading tensor
data or verifying checksums (validate does that). Prints the format version, step, creation time,
producer, every file with its size, every tensor with its dtype and shape, tied names, and the
quantization summary; with --json, one JSON object with the same fields. Given a checkpoints root,
it first lists the root's committed checkpoints by step, the latest (the one described) marked; the
JSON object then also has "checkpoints": [{"step", "name", "path", "latest"}].

exit status: 0 described, 1 not found or unreadable (the reason on stderr), 2 usage error"""

LIST = """\
List every committed checkpoint of the checkpoints root ROOT (a path or a memory:// URL), one line
each: its step, creation time, total size, quantization (mode and bits, or no), whether it is valid
(every file checked as validate does; with --fast only its manifest), and the latest marked, with
each problem of an invalid one below it. What ROOT holds that is not a checkpoint (temporaries of
saves in progress or crashed, step directories without manifest.json) is listed after, as such.
With --json, one JSON object {"root", "valid", "latest", "checkpoints": [{"step", "name", "path",
"created_at", "size", "quantization", "latest", "verified", "valid", "problems"}], "uncommitted":
[{"name", "path", "kind", "reason"}]}.

exit status: 0 every checkpoint valid, 1 any invalid or ROOT unreadable, 2 usage error"""

VALIDATE = """\
Check each checkpoint as a load would, and more: the manifest and every JSON file against the
schemas, every file's size and checksum, the safetensors headers, the tensors against the
quantization metadata. Prints "ok       PATH" for a valid checkpoint, else one line
"INVALID  PATH: FILE: problem [ErrorClass]" per problem; with --json, one JSON object
{"valid": ..., "checkpoints": [{"path": ..., "valid": ..., "problems": [{"file", "message", "error"}]}]}.

exit status: 0 every checkpoint valid, 1 any invalid, 2 usage error"""

DIFF = """\
Compare the checkpoints A and B (checkpoint directories, or roots: their newest; local paths and
memory:// URLs in any mix). Prints the tensors added, removed and changed (in dtype or shape, or in
value: how many elements differ and the largest absolute difference; bitwise-equal tensors count as
equal), the differences in step, config, vocab, extra, tied names and quantization summary as JSON
paths ("config['optim']['lr']: 0.1 -> 0.2"), the other files whose bytes differ (optimizer, RNG
state, ...), then "identical" or "different". Every tensor is verified against its checksum as it is
read, and compared a chunk at a time; creation time and producer are not compared. With --json, one
JSON object {"identical", "a", "b", "tensors", "values", "files"}.

exit status: 0 identical, 1 different, 2 usage error or unreadable checkpoint (as diff(1))"""

CONVERT = """\
Convert a format-0 checkpoint (the layout before this library: model.pt, metadata.json and optionally
optimizer.pt, config.json, vocab.json) to format 1, saved under the checkpoints root DST as
DST/step-NNNNNNNN. Only format 0 is read. Prints the new checkpoint's path.

exit status: 0 converted, 1 unreadable source or failed write (an existing step needs --overwrite),
2 usage error"""

IMPORT = """\
Import a checkpoint other code wrote, saved under the checkpoints root DST as DST/step-NNNNNNNN. SRC
is a torch.save state_dict (.pt, .pth, .bin), a nanoGPT training checkpoint (model, optimizer,
iter_num, model_args, config), a PyTorch Lightning .ckpt, a bare .safetensors file, or a Hugging Face
Trainer checkpoint-N/ folder (model.safetensors, sharded or not, or pytorch_model.bin; optimizer.pt,
scheduler.pt, scaler.pt, rng_state.pth, trainer_state.json, config.json), or a compressed-tensors
quantized folder (config.json with a quantization_config: pack-quantized int4/int8, naive-quantized
int8), imported as a quantized checkpoint. Every pickle is read
through the format's allowlist; a hostile one is refused and nothing of it runs (training_args.bin
is never unpickled). Prints the new checkpoint's path, the source's kind, then each entry carried
over and each one not carried over with the reason; with --json, one JSON object {"path", "kind",
"source", "source_checksum", "step", "carried": [{"entry", "detail"}], "not_carried": [...]}.

exit status: 0 imported, 1 unreadable, unsafe or unknown source or failed write (an existing step
needs --overwrite), 2 usage error"""

EXPORT = """\
Export the checkpoint SRC (a checkpoint directory, or a root's newest) as the new folder DST, which
transformers' from_pretrained loads: model.safetensors and the architecture's config.json. --to hf
writes full precision (a quantized model dequantized, LoRA adapters merged); --to compressed-tensors
writes the pack-quantized integers with a quantization_config (QAT master weights are left out; a
LoRA checkpoint is refused: export it with --to hf). The architecture config is --config FILE, or
the checkpoint's config when it is a Hugging Face one (model_type and architectures). Prints DST,
then each tensor not written as stored and what was done to it; with --json, one JSON object
{"path", "to", "source", "files", "changed": [{"entry", "detail"}]}.

exit status: 0 exported, 1 unreadable checkpoint, no architecture config, a refused export or an
existing non-empty DST, 2 usage error"""

CONSOLIDATE = """\
Rewrite the sharded checkpoint SRC (format_version 2, written by save_checkpoint under a process
group or by dcp.save with PortableStorageWriter; a directory, or a root's newest) as a one-process
checkpoint (format 1) under the checkpoints root DST, as DST/step-NNNNNNNN: every global tensor
reassembled from its chunks with each chunk's checksum verified, the optimizer state keyed by
parameter index again, config, vocab, scheduler and scaler carried over, and of the per-rank parts
rank 0's RNG state and states= objects (the manifest's extra "consolidated_from" records the source
and its world size). Prints the new checkpoint's path.

exit status: 0 consolidated, 1 unreadable, damaged or unsharded source or failed write (an existing
step needs --overwrite), 2 usage error"""

DEMO = """\
Train the shipped reference model (a small character-level transformer) twice in child processes,
once uninterrupted and once killed with SIGKILL between two saves and resumed in a new process;
print both loss curves and the verdict (bit-identical, or the first step that differs), then inspect
and validate the final checkpoint. --quantize adds a quantized copy and LoRA fine-tuning of it, also
killed and resumed. Each run writes a new DIR/run-NNN and deletes nothing; with the plot extra
(pip install 'portable-ckpt[plot]') it also draws the loss curves as DIR/run-NNN/losses.png.

exit status: 0 PASS, 1 FAIL (a difference or an invalid checkpoint), 2 usage error"""


def _print_json(doc: Any, out: TextIO) -> None:
    out.write(json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=True) + "\n")


def _labelled(progress: Progress, prefix: str) -> Progress:
    """``progress`` with each label prefixed by ``prefix: ``."""
    return lambda done, total, label: progress(done, total, f"{prefix}: {label}")


def cmd_inspect(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    info = inspect_checkpoint(args.path)
    if args.json:
        _print_json(info.to_json(), out)
    else:
        out.write(render_info(info))
    return EXIT_OK


def cmd_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with ProgressLine(err, prefix="list") as progress:
        listing = list_checkpoints(args.root, verify=not args.fast, progress=progress)
    if args.json:
        _print_json(listing.to_json(), out)
    else:
        out.write(render_listing(listing))
    return EXIT_OK if listing.valid else EXIT_INVALID


def cmd_validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with ProgressLine(err, prefix="validate") as progress:
        reports = [validate_checkpoint(p, progress=_labelled(progress, p)) for p in args.paths]
    valid = all(r.valid for r in reports)
    if args.json:
        _print_json({"valid": valid, "checkpoints": [r.to_json() for r in reports]}, out)
    else:
        out.write(render_validation(reports))
    return EXIT_OK if valid else EXIT_INVALID


def cmd_diff(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with ProgressLine(err, prefix="diff") as progress:
        diff = diff_checkpoints(args.a, args.b, progress=progress)
    if args.json:
        _print_json(diff.to_json(), out)
    else:
        out.write(render_diff(diff))
    return EXIT_OK if diff.identical else EXIT_INVALID


def cmd_convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path = convert_format0(args.src, args.dst, overwrite=args.overwrite)
    out.write(f"{escape(str(path))}\n")
    return EXIT_OK


def cmd_import(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    report = import_checkpoint(args.src, args.dst, step=args.step, overwrite=args.overwrite)
    if args.json:
        _print_json(report.to_json(), out)
        return EXIT_OK
    out.write(f"{escape(str(report.path))}\n")
    out.write(f"imported {report.kind} {escape(report.source)} at step {report.step}\n")
    for title, entries in (("carried over", report.carried), ("not carried over", report.not_carried)):
        out.write(f"{title}: {len(entries) or 'nothing'}\n")
        out.write("".join(f"  {escape(e.entry)}: {escape(e.detail)}\n" for e in entries))
    return EXIT_OK


def cmd_export(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    report = export_checkpoint(args.src, args.dst, to=args.to, config=args.config)
    if args.json:
        _print_json(report.to_json(), out)
        return EXIT_OK
    out.write(f"{escape(str(report.path))}\n")
    out.write(f"exported {escape(report.source)} as {report.to}: {', '.join(report.files)}\n")
    out.write(f"changed: {len(report.changed) or 'nothing'}\n")
    out.write("".join(f"  {escape(e.entry)}: {escape(e.detail)}\n" for e in report.changed))
    return EXIT_OK


def cmd_consolidate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path = consolidate_checkpoint(args.src, args.dst, overwrite=args.overwrite)
    out.write(f"{escape(str(path))}\n")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from portable_ckpt.demo.demo import run_demo  # imports the trainer; only the demo needs it

    return run_demo(args.dir, quantize=args.quantize, out=out)


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="portable-ckpt",
        usage="%(prog)s [--traceback] COMMAND [ARGS...]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--traceback", action="store_true", help="also print the traceback of a known error")
    # the epilog lists the commands with examples; argparse's own list would repeat it
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS)

    def command(name: str, description: str, run: Command, error_status: int = EXIT_INVALID) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, prog=f"portable-ckpt {name}", help=COMMANDS[name][0], description=description, formatter_class=raw
        )
        p.set_defaults(run=run, error_status=error_status)
        return p

    p = command("inspect", INSPECT, cmd_inspect)
    p.add_argument("path", metavar="PATH", help="a checkpoint directory or a checkpoints root")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("list", LIST, cmd_list)
    p.add_argument("root", metavar="ROOT", help="a checkpoints root (a directory or a memory:// URL)")
    p.add_argument("--fast", action="store_true", help="check only each manifest, not every file's checksum")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("validate", VALIDATE, cmd_validate)
    p.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint directories or checkpoints roots")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("diff", DIFF, cmd_diff, error_status=EXIT_USAGE)  # 1 means "different", as for diff(1)
    p.add_argument("a", metavar="A", help="a checkpoint directory or a checkpoints root")
    p.add_argument("b", metavar="B", help="a checkpoint directory or a checkpoints root")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("convert", CONVERT, cmd_convert)
    p.add_argument("src", metavar="SRC", help="the format-0 checkpoint directory")
    p.add_argument("dst", metavar="DST", help="the checkpoints root to save into")
    p.add_argument("--overwrite", action="store_true", help="replace the step if DST already has it")

    p = command("import", IMPORT, cmd_import)
    p.add_argument("src", metavar="SRC", help="a torch.save / Lightning file or a Hugging Face Trainer folder")
    p.add_argument("dst", metavar="DST", help="the checkpoints root to save into")
    p.add_argument("--step", type=int, default=None, help="the step to save as (default: the one SRC records)")
    p.add_argument("--overwrite", action="store_true", help="replace the step if DST already has it")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("export", EXPORT, cmd_export)
    p.add_argument("src", metavar="SRC", help="a checkpoint directory or a checkpoints root")
    p.add_argument("dst", metavar="DST", help="the folder to create (new or empty)")
    p.add_argument("--to", required=True, choices=["hf", "compressed-tensors"], help="the format to write")
    p.add_argument("--config", metavar="FILE", default=None, help="the architecture's config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("consolidate", CONSOLIDATE, cmd_consolidate)
    p.add_argument("src", metavar="SRC", help="a sharded checkpoint directory or a checkpoints root")
    p.add_argument("dst", metavar="DST", help="the checkpoints root to save into")
    p.add_argument("--overwrite", action="store_true", help="replace the step if DST already has it")

    p = command("demo", DEMO, cmd_demo)
    p.add_argument("--dir", default="portable-ckpt-demo", help="where to write (default: ./portable-ckpt-demo)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="also run the quantized chapter")
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:  # argparse prints help and usage errors itself, then exits
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    run: Command = args.run
    try:
        return run(args, out, err)
    except CheckpointError as e:
        if args.traceback:
            traceback.print_exc(file=err)
        err.write(f"portable-ckpt {args.command}: {type(e).__name__}: {escape(str(e))}\n")
        return int(args.error_status)


if __name__ == "__main__":
    sys.exit(main())
