"""Our format as DCP's storage, on the save side: ``dcp.save(state, storage_writer=PortableStorageWriter(...))``.

DCP plans (which rank writes which chunk, deduplicating replicated tensors); this writer decides
where the bytes go. The coordinator opens the staging area when it sees the global plan and hands
its name to every rank in the plan; each rank writes its chunks as safetensors files (one per
top-level key: ``model-RRRRR-of-WWWWW.safetensors``, ``optimizer-...``), syncs them and reports their
checksums; only when every rank reported success does the coordinator write ``sharding.json`` and
``manifest.json`` and commit (format_spec/README.md §20). A failed or dead rank leaves nothing
committed: DCP does not call ``finish``, and the coordinator aborts the staging area (``abort``, or
at the latest the next ``reset``); the manager's ``clean`` removes what a dead coordinator left.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from portable_ckpt.errors import CheckpointError, CheckpointInputError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import names
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import sharding as _sharding
from portable_ckpt.format.hashing import checksum
from portable_ckpt.root import display
from portable_ckpt.storage import Storage, storage_for
from portable_ckpt.storage.base import Joined, Staging, write_error

FileEntries = dict[str, dict[str, Any]]
# writes files into the staging area and returns their manifest entries
FilesHook = Callable[[Joined | Staging, int, int], FileEntries]
_FILES = "\x00files"  # the index of the WriteResult that carries a rank's file entries, never a state key


def write_bytes(sink: Joined | Staging, name: str, data: bytes) -> FileEntries:
    """Create, fill and sync one small file; returns its manifest entry."""
    f = sink.create(name)
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view) :]
    finally:
        f.close()
    sink.sync(name)
    return {name: {"size": len(data), "checksum": checksum(data)}}


def write_tensors(sink: Joined | Staging, name: str, tensors: dict[str, torch.Tensor]) -> _safetensors.WriteResult:
    """Create, fill and sync one safetensors file."""
    f = sink.create(name)
    try:
        written = _safetensors.write(f, tensors)
    finally:
        f.close()
    sink.sync(name)
    return written


def accepts(checkpoint_id: str | os.PathLike[str]) -> bool:
    """DCP's ``validate_checkpoint_id``: a path or URL some storage backend takes."""
    try:
        storage_for(checkpoint_id)
    except CheckpointError:
        return False
    return True


def _group(fqn: str) -> str:
    return _sharding.GROUPS.get(fqn.split(".", 1)[0], _sharding.OTHER_GROUP)


@dataclass
class PortableStorageWriter(StorageWriter):
    """Write ``dcp.save``'s state as one portable checkpoint ``<root>/step-NNNNNNNN`` (format_version 2).

    root: a checkpoints root (path or URL, as everywhere in the library). config, vocab, extra: as
    for ``save_checkpoint``. ``coordinator_files`` and ``rank_files`` write further files into the
    staging area (the coordinator's shared files; each rank's own, such as its RNG state): used by
    ``save_checkpoint`` under a process group.

    >>> writer = PortableStorageWriter("ckpts", step=100)  # doctest: +SKIP
    >>> dcp.save({"model": model.state_dict()}, storage_writer=writer)  # doctest: +SKIP
    """

    root: str | os.PathLike[str] | Storage
    step: int
    config: dict[str, Any] = field(default_factory=dict)
    vocab: list[str] | dict[str, int] | None = None
    extra: dict[str, Any] | None = None
    overwrite: bool = False
    mesh: dict[str, Any] | None = None
    rng_sources: list[str] = field(default_factory=list)
    coordinator_files: FilesHook | None = None
    rank_files: FilesHook | None = None
    location: str | None = field(default=None, init=False)
    _staging: Staging | None = field(default=None, init=False, repr=False)
    _rank: int = field(default=0, init=False)
    _coordinator: bool = field(default=True, init=False)
    _shared: FileEntries = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.storage = storage_for(self.root)
        self.step = int(self.step)
        self.config = _jsonio.to_json_value(self.config, "config")
        self.vocab = _jsonio.to_json_value(self.vocab, "vocab")

    # -- DCP's protocol ------------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.abort()  # a staging area a failed save left open is removed before the next one begins
        if checkpoint_id is not None:
            self.root = checkpoint_id
            self.storage = storage_for(checkpoint_id)
        self.location = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._coordinator = is_coordinator
        self._rank = int(kwargs.get("rank", 0))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator: open the staging area, write the shared files, tell every rank where."""
        self.abort()  # a failed save's staging area, if DCP did not reset this writer in between
        try:
            self.storage.make_root()
            self._staging = self.storage.stage(names.step_name(self.step), overwrite=self.overwrite)
            self._shared = (
                self.coordinator_files(self._staging, 0, len(plans)) if self.coordinator_files is not None else {}
            )
            self._shared |= write_bytes(self._staging, names.CONFIG, _jsonio.dumps(self.config))
            if self.vocab is not None:
                self._shared |= write_bytes(self._staging, names.VOCAB, _jsonio.dumps(self.vocab))
        except OSError as e:
            self.abort()
            raise write_error(e, f"saving step {self.step} into {self.storage.location}") from e
        except BaseException:
            self.abort()
            raise
        area = self._staging.area
        return [
            replace(plan, storage_data={"area": area, "rank": rank, "world_size": len(plans)})
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        where = plan.storage_data
        try:
            results = self._write(plan.items, planner, where["area"], where["rank"], where["world_size"])
        except OSError as e:
            raise write_error(e, f"rank {where['rank']}: saving step {self.step} into {self.storage.location}") from e
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator, after every rank wrote and synced its files: the table, the manifest, commit."""
        if self._staging is None:
            raise CheckpointInputError("PortableStorageWriter.finish called without a staging area (no global plan)")
        try:
            files = dict(self._shared)
            table = _table(metadata, results, files, len(results), self.mesh)
            files |= write_bytes(self._staging, _sharding.SHARDING, table)
            doc = _manifest.build(
                step=self.step,
                files=files,
                aliases={},
                rng=self.rng_sources,
                quantization=None,
                extra=self.extra,
                version=_sharding.FORMAT_VERSION,
            )
            write_bytes(self._staging, names.MANIFEST, _manifest.encode(doc))
            location = self._staging.commit()
            self._staging = None
            self.location = str(display(storage_for(location)))
        except OSError as e:
            self.abort()
            raise write_error(e, f"committing step {self.step} into {self.storage.location}") from e
        except BaseException:
            self.abort()
            raise

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return accepts(checkpoint_id)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.storage.location)

    # -- ours ----------------------------------------------------------------------------------

    def abort(self) -> None:
        """Remove the staging area of a save that will not commit (the coordinator's; no-op elsewhere)."""
        if self._staging is not None:
            staging, self._staging = self._staging, None
            staging.abort()

    def _write(
        self, items: list[WriteItem], planner: SavePlanner, area: str, rank: int, world_size: int
    ) -> list[WriteResult]:
        sink = self._staging if self._staging is not None else self.storage.join(area)
        results: list[WriteResult] = []
        files: FileEntries = {}
        by_group: dict[str, list[WriteItem]] = {}
        for item in items:
            if item.type == WriteItemType.BYTE_IO:
                results.append(_value_result(item, planner))
            else:
                by_group.setdefault(_group(item.index.fqn), []).append(item)
        for group, group_items in sorted(by_group.items()):
            name = _sharding.shard_file(group, rank, world_size)
            counts: dict[str, int] = {}
            for item in group_items:
                counts[item.index.fqn] = counts.get(item.index.fqn, 0) + 1
            tensors: dict[str, torch.Tensor] = {}
            for item in group_items:
                t = cast(torch.Tensor, planner.resolve_data(item))  # DCP's contract for TENSOR and SHARD items
                chunk = item.tensor_data.chunk if item.tensor_data is not None else None
                offsets = tuple(chunk.offsets) if chunk is not None else ()
                key = _sharding.chunk_key(item.index.fqn, offsets, counts[item.index.fqn] == 1)
                tensors[key] = t.detach()
                results.append(
                    WriteResult(
                        index=item.index,
                        size_in_bytes=t.numel() * t.element_size(),
                        storage_data={"file": name, "key": key},
                    )
                )
            written = write_tensors(sink, name, tensors)
            files[name] = {"size": written.size, "checksum": written.checksum, "tensors": written.tensor_checksums}
        if self.rank_files is not None:
            files |= self.rank_files(sink, rank, world_size)
        results.append(WriteResult(index=MetadataIndex(f"{_FILES}{rank}"), size_in_bytes=0, storage_data=files))
        return results


def _value_result(item: WriteItem, planner: SavePlanner) -> WriteResult:
    """A non-tensor entry, kept as typed JSON (never pickled into the checkpoint)."""
    lookup = getattr(planner, "lookup_object", None)
    # a planner without DefaultSavePlanner's lookup: the bytes DCP would store, read back safely
    data = planner.resolve_data(item) if not callable(lookup) else None
    value = lookup(item.index) if callable(lookup) else torch.load(cast(io.BytesIO, data), weights_only=True)
    return WriteResult(
        index=item.index,
        size_in_bytes=0,
        storage_data={"value": _sharding.encode_value(value, item.index.fqn)},
    )


def _table(
    metadata: Metadata, results: list[list[WriteResult]], files: FileEntries, world_size: int, mesh: Any
) -> bytes:
    chunks: dict[tuple[str, tuple[int, ...]], tuple[str, str]] = {}
    values: dict[str, Any] = {}
    for rank_results in results:
        for wr in rank_results:
            data = wr.storage_data
            if wr.index.fqn.startswith(_FILES):
                files |= data
            elif "value" in data:
                values[wr.index.fqn] = data["value"]
            else:
                chunks[(wr.index.fqn, tuple(wr.index.offset or ()))] = (data["file"], data["key"])
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    entries: dict[str, _sharding.Entry] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        path = tuple(paths.get(fqn, (fqn,)))
        if isinstance(md, TensorStorageMetadata):
            entries[fqn] = _sharding.Entry(
                name=fqn,
                path=path,
                dtype=_safetensors.DTYPE_NAMES[md.properties.dtype],
                shape=tuple(md.size),
                chunks=tuple(
                    _sharding.Chunk(*chunks[(fqn, tuple(c.offsets))], tuple(c.offsets), tuple(c.sizes))
                    for c in md.chunks
                ),
            )
        else:
            entries[fqn] = _sharding.Entry(name=fqn, path=path, value=values[fqn])
    data = _jsonio.dumps(_sharding.build(world_size, mesh, entries))
    if len(data) > _jsonio.MAX_JSON_BYTES:
        raise CheckpointInputError(
            f"sharding.json would be {len(data):,} bytes, over the format's limit of {_jsonio.MAX_JSON_BYTES:,}; "
            "save fewer, larger tensors"
        )
    _sharding.parse(data, _sharding.SHARDING, {**files, _sharding.SHARDING: {}})  # what saves must load
    return data
