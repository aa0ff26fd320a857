"""How a checkpoint file is damaged: positions in a file, byte flips and truncations, deleting, replacing
or symlinking a file, edits of JSON documents and of the manifest, and hostile safetensors files built
from a real one. Each returns a function that damages a checkpoint directory (or edits a document);
:mod:`faults.corruption` turns them into the catalog.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from faults.files import read_manifest, st_pack, st_split, write_manifest
from faults.states import QUANT_FILE
from portable_ckpt.format import jsonio as _jsonio


def _pos(spec: str, blob: bytes) -> int:
    """A position in ``blob``: a number ("8"), a byte of the safetensors length field ("len3"), or a named
    place ("half", "hdr-mid", "data-first", "end-22", ...); clamped into the file."""
    n = len(blob)
    header_end = 8 + struct.unpack("<Q", blob[:8])[0] if blob[:1] != b"{" and n >= 8 else 0
    table = {
        "third": n // 3,
        "half": n // 2,
        "2third": 2 * n // 3,
        "end-22": n - 22,
        "end-2": n - 2,
        "end-1": n - 1,
        "hdr-first": 8,
        "hdr-mid": (8 + header_end) // 2,
        "hdr-last": header_end - 1,
        "data-first": header_end,
        "data-mid": (header_end + n) // 2,
        "data-last": n - 1,
    }
    number = spec.removeprefix("len")
    at = int(number) if number.isdigit() else table[spec]
    return min(max(at, 0), max(n - 1, 0))


def edit_bytes(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(ckdir: Path) -> None:
        path = ckdir / name
        path.write_bytes(edit(path.read_bytes()))

    return apply


def flip(spec: str, mask: int) -> Callable[[bytes], bytes]:
    def edit(blob: bytes) -> bytes:
        i = _pos(spec, blob)
        return blob[:i] + bytes([blob[i] ^ mask]) + blob[i + 1 :]

    return edit


def truncate(spec: str) -> Callable[[bytes], bytes]:
    return lambda blob: blob[: _pos(spec, blob)]


def delete_file(name: str) -> Callable[[Path], None]:
    return lambda ckdir: (ckdir / name).unlink()


def replace_file(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda ckdir: (ckdir / name).write_bytes(content)


def edit_manifest(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    """Change the manifest's content (not resealed here; the attacker variant reseals it)."""

    def apply(ckdir: Path) -> None:
        doc = read_manifest(ckdir)
        result = edit(doc)
        write_manifest(ckdir, doc if result is None else result, seal=False)

    return apply


def edit_json(name: str, edit: Callable[[Any], Any]) -> Callable[[Path], None]:
    def apply(ckdir: Path) -> None:
        doc = json.loads((ckdir / name).read_bytes())
        result = edit(doc)
        (ckdir / name).write_bytes(_jsonio.dumps(doc if result is None else result))

    return apply


def edit_st(name: str, edit: Callable[[dict[str, Any], bytes], bytes]) -> Callable[[Path], None]:
    def apply(ckdir: Path) -> None:
        header, data = st_split((ckdir / name).read_bytes())
        (ckdir / name).write_bytes(edit(header, data))

    return apply


def symlink_out(name: str) -> Callable[[Path], None]:
    """Replace ``name`` by a symlink to a copy outside the checkpoint directory whose last byte differs:
    reads follow links, and the checksum must still catch what the link leads to."""

    def apply(ckdir: Path) -> None:
        outside = ckdir.parent / f"outside-{ckdir.name}-{name}"
        data = bytearray((ckdir / name).read_bytes())
        data[-1] ^= 0x01
        outside.write_bytes(bytes(data))
        (ckdir / name).unlink()
        (ckdir / name).symlink_to(outside)

    return apply


DELETE = object()  # set_field(path, DELETE) removes the field


def set_field(path: Sequence[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets (or, with :data:`DELETE`, removes) the field at ``path`` of a JSON document."""

    def edit(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return edit


def _first(header: dict[str, Any]) -> str:
    return min((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])


def st_attacks() -> dict[str, Callable[[dict[str, Any], bytes], bytes]]:
    """Hostile safetensors files built from a real one: header and data, then packed by hand."""

    def entry_set(key: str, value: Any) -> Callable[[dict[str, Any], bytes], bytes]:
        def edit(h: dict[str, Any], d: bytes) -> bytes:
            h[_first(h)][key] = value
            return st_pack(h, d)

        return edit

    def overlap(h: dict[str, Any], d: bytes) -> bytes:
        names = sorted((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"])
        a, b = h[names[0]]["data_offsets"], h[names[1]]["data_offsets"]
        shift = min(4, b[0] - a[0])  # the second tensor starts inside the first; the file keeps its size
        h[names[1]]["data_offsets"] = [b[0] - shift, b[1] - shift]
        return st_pack(h, d)

    def past_end(h: dict[str, Any], d: bytes) -> bytes:
        last = max((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"])
        b, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [b + 64, e + 64]
        return st_pack(h, d)

    def gap(h: dict[str, Any], d: bytes) -> bytes:
        for n in h:
            if n != "__metadata__" and h[n]["data_offsets"][0] > 0:
                b, e = h[n]["data_offsets"]
                h[n]["data_offsets"] = [b + 8, e + 8]
        return st_pack(h, d + bytes(8))

    def shape_mismatch(h: dict[str, Any], d: bytes) -> bytes:
        h[_first(h)]["shape"] = [*h[_first(h)]["shape"], 2]
        return st_pack(h, d)

    def other_itemsize(h: dict[str, Any], d: bytes) -> bytes:
        entry = h[_first(h)]
        entry["dtype"] = "I8" if entry["dtype"] not in ("U8", "I8", "BOOL") else "F32"
        return st_pack(h, d)

    def header_len(n: int) -> Callable[[dict[str, Any], bytes], bytes]:
        return lambda h, d: st_pack(h, d, length=n)

    def raw_header(text: bytes) -> Callable[[dict[str, Any], bytes], bytes]:
        return lambda h, d: st_pack(text, d)

    def duplicate(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        text = json.dumps(h, separators=(",", ":"))
        dup = json.dumps({first: h[first]}, separators=(",", ":"))[1:-1]
        return st_pack(text[:-1].encode() + b"," + dup.encode() + b"}", d)

    def huge_claim(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        b = h[first]["data_offsets"][0]
        h[first]["shape"] = [2**31, 2**31, 2**31]
        h[first]["data_offsets"] = [b, b + 2**93 * 4]
        return st_pack(h, d)

    def trailing(h: dict[str, Any], d: bytes) -> bytes:
        return st_pack(h, d + b"\0" * 8)

    def non_utf8(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        text = json.dumps(h, separators=(",", ":")).encode()
        return st_pack(text.replace(first.encode(), first.encode()[:-1] + b"\xff", 1), d)

    def metadata(value: Any) -> Callable[[dict[str, Any], bytes], bytes]:
        def edit(h: dict[str, Any], d: bytes) -> bytes:
            return st_pack({"__metadata__": value, **h}, d)

        return edit

    def rename_empty(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        h[""] = h.pop(first)
        return st_pack(h, d)

    def big_int_shape(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        text = json.dumps(h, separators=(",", ":"))
        shape = json.dumps(h[first]["shape"], separators=(",", ":"))
        return st_pack(text.replace(f'"shape":{shape}', '"shape":[' + "9" * 5000 + "]", 1).encode(), d)

    def many_huge_dims(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        text = json.dumps(h, separators=(",", ":"))
        shape = json.dumps(h[first]["shape"], separators=(",", ":"))
        dims = ",".join(["9" * 4000] * 60)
        return st_pack(text.replace(f'"shape":{shape}', f'"shape":[{dims}]', 1).encode(), d)

    return {
        "overlapping-offsets": overlap,
        "offsets-past-end": past_end,
        "gap-between-tensors": gap,
        "trailing-bytes": trailing,
        "offsets-reversed": entry_set("data_offsets", [8, 0]),
        "offsets-negative": entry_set("data_offsets", [-4, 0]),
        "offsets-three": entry_set("data_offsets", [0, 4, 8]),
        "offsets-float": entry_set("data_offsets", [0.0, 4.0]),
        "offsets-huge": entry_set("data_offsets", [0, 2**64]),
        "unknown-dtype": entry_set("dtype", "F128"),
        "lowercase-dtype": entry_set("dtype", "f32"),
        "dtype-not-string": entry_set("dtype", 7),
        "shape-x-dtype-disagree": shape_mismatch,
        "dtype-x-span-disagree": other_itemsize,
        "shape-negative": entry_set("shape", [-1, 4]),
        "shape-bool": entry_set("shape", [True]),
        "shape-float": entry_set("shape", [2.0]),
        "shape-string": entry_set("shape", "2x4"),
        "shape-claims-2**93-bytes": huge_claim,
        "shape-5000-digit-int": big_int_shape,
        "shape-60-dims-of-4000-digits": many_huge_dims,
        "entry-missing-key": lambda h, d: (h[_first(h)].pop("dtype"), st_pack(h, d))[1],
        "entry-extra-key": entry_set("crc", 0),
        "entry-not-object": lambda h, d: (h.__setitem__(_first(h), [1, 2]), st_pack(h, d))[1],
        "empty-tensor-name": rename_empty,
        "duplicate-tensor-name": duplicate,
        "metadata-not-strings": metadata({"a": 1}),
        "metadata-not-object": metadata(["a"]),
        "header-len-past-eof": header_len(10**6),
        "header-len-over-limit": header_len(100_000_001),
        "header-len-2**64-1": header_len(2**64 - 1),
        "header-len-zero": header_len(0),
        "header-non-utf8": non_utf8,
        "header-invalid-json": raw_header(b'{"a":{"dtype":"F32",'),
        "header-json-array": raw_header(b"[1,2,3]"),
        "header-deep-nesting": raw_header(b"[" * 100_000 + b"]" * 100_000),
        "header-nan": raw_header(b'{"a":NaN}'),
    }


def manifest_edits(model_names: Sequence[str]) -> dict[str, tuple[Callable[[dict[str, Any]], Any], tuple[str, ...]]]:
    """Manifest edits: id -> (edit, file names a refusal may name besides manifest.json)."""
    st = "model.safetensors"
    tensor = model_names[0]
    return {
        "format-other": (set_field(["format"], "safetensors"), ()),
        "format_version-0": (set_field(["format_version"], 0), ()),
        "format_version-string": (set_field(["format_version"], "1"), ()),
        "format_version-missing": (set_field(["format_version"], DELETE), ()),
        "step-negative": (set_field(["step"], -1), ()),
        "step-string": (set_field(["step"], "3"), ()),
        "step-float": (set_field(["step"], 3.0), ()),
        "step-bool": (set_field(["step"], True), ()),
        "step-other-than-dir": (set_field(["step"], 4), ()),
        "created_at-bad": (set_field(["created_at"], "yesterday"), ()),
        "producer-missing": (set_field(["producer"], DELETE), ()),
        "checksum_algorithm-md5": (set_field(["checksum_algorithm"], "md5"), ()),
        "manifest_checksum-missing": (set_field(["manifest_checksum"], DELETE), ()),
        "manifest_checksum-upper": (lambda d: set_field(["manifest_checksum"], d["manifest_checksum"].upper())(d), ()),
        "files-not-object": (set_field(["files"], [st]), ()),
        "files-model-missing": (set_field(["files", st], DELETE), ()),
        "files-size-string": (lambda d: set_field(["files", st, "size"], str(d["files"][st]["size"]))(d), ()),
        "files-size-float": (lambda d: set_field(["files", st, "size"], float(d["files"][st]["size"]))(d), ()),
        "files-size-wrong": (lambda d: set_field(["files", st, "size"], d["files"][st]["size"] + 1)(d), (st,)),
        "files-size-negative": (set_field(["files", st, "size"], -1), ()),
        "files-checksum-wrong": (set_field(["files", st, "checksum"], "0" * 32), (st,)),
        "files-checksum-short": (set_field(["files", st, "checksum"], "0" * 31), ()),
        "files-checksum-upper": (
            lambda d: set_field(["files", st, "checksum"], d["files"][st]["checksum"].upper())(d),
            (),
        ),
        "files-entry-extra-key": (set_field(["files", st, "mode"], 420), ()),
        "files-tensor-table-missing-name": (set_field(["files", st, "tensors", tensor], DELETE), (st,)),
        "files-tensor-table-extra-name": (set_field(["files", st, "tensors", "ghost"], "0" * 32), (st,)),
        "files-unlisted-missing-file": (
            set_field(["files", "extra.bin"], {"size": 1, "checksum": "0" * 32}),
            ("extra.bin",),
        ),
        "files-too-many": (
            lambda d: d["files"].update({f"f{i}.bin": {"size": 0, "checksum": "0" * 32} for i in range(70)}),
            (),
        ),
        "files-name-dotdot": (set_field(["files", "../config.json"], {"size": 8, "checksum": "0" * 32}), ()),
        "files-name-absolute": (set_field(["files", "/etc/passwd"], {"size": 8, "checksum": "0" * 32}), ()),
        "files-name-subdir": (set_field(["files", "a/b.json"], {"size": 8, "checksum": "0" * 32}), ()),
        "files-name-hidden": (set_field(["files", ".hidden"], {"size": 8, "checksum": "0" * 32}), ()),
        "files-name-manifest": (set_field(["files", "manifest.json"], {"size": 8, "checksum": "0" * 32}), ()),
        "files-name-control-char": (set_field(["files", "a\x1bb"], {"size": 8, "checksum": "0" * 32}), ()),
        "aliases-target-missing": (set_field(["aliases", "x.weight"], "ghost"), (st,)),
        "aliases-shadow-tensor": (set_field(["aliases", tensor], tensor), (st,)),
        "aliases-not-object": (set_field(["aliases"], ["x"]), ()),
        "rng-bogus-source": (set_field(["rng"], ["dice"]), ()),
        "quantization-claimed": (
            set_field(["quantization"], {"mode": "ptq", "bits": 8, "metadata_file": QUANT_FILE}),
            (QUANT_FILE,),
        ),
        "extra-not-object": (set_field(["extra"], [1]), ()),
        "not-an-object": (lambda d: [d], ()),
    }
