"""Our format as DCP's storage, on the load side: ``dcp.load(state, storage_reader=PortableStorageReader(path))``.

``read_metadata`` turns ``sharding.json`` into DCP's ``Metadata`` (every global tensor with its
chunks, every non-tensor value), so DCP's planner reshards to whatever the loading ranks hold.
``read_data`` fills each requested region from its chunk: straight into the destination when the
region is the whole chunk, else through one chunk-sized buffer; every chunk's checksum is checked.
Non-tensor values come from JSON; DCP's planner receives them as ``torch.save`` bytes this reader
made itself from the decoded JSON, so nothing of the checkpoint is ever unpickled.
"""

from __future__ import annotations

import io
import os
from typing import Any, cast

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from portable_ckpt.dcp.writer import accepts
from portable_ckpt.errors import CheckpointInputError
from portable_ckpt.files import CheckpointFiles
from portable_ckpt.format import sharding as _sharding
from portable_ckpt.root import resolve
from portable_ckpt.sharded import ShardedFiles, is_sharded
from portable_ckpt.storage import Storage


class PortableStorageReader(StorageReader):
    """Read a sharded portable checkpoint (or a root's newest one) with ``dcp.load``.

    verify: check each chunk's checksum (default). The reader resolves ``latest`` once; under a
    process group, resolve it on one rank and pass the same directory to every rank.

    >>> dcp.load(state, storage_reader=PortableStorageReader("ckpts/step-00000100"))  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str] | Storage, *, verify: bool = True) -> None:
        super().__init__()
        self.path = path
        self.verify = verify
        self._sharded: ShardedFiles | None = None
        self._refs: dict[MetadataIndex, tuple[_sharding.Entry, _sharding.Chunk | None]] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.close()
        if checkpoint_id is not None:
            self.path = checkpoint_id

    def close(self) -> None:
        if self._sharded is not None:
            sharded, self._sharded = self._sharded, None
            sharded.close()
            sharded.files.close()

    def open(self) -> ShardedFiles:
        if self._sharded is None:
            files = CheckpointFiles(resolve(self.path), self.verify)
            try:
                if not is_sharded(files.manifest):
                    raise CheckpointInputError(
                        f"{files.location}: format_version {files.manifest['format_version']} is not sharded; load it "
                        "with load_checkpoint (which also fills a sharded model from it)",
                        file=files.location,
                    )
                self._sharded = ShardedFiles(files)
            except BaseException:
                files.close()
                raise
        return self._sharded

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        sharded = self.open()
        state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        self._refs = {}
        for name, e in sharded.table.entries.items():
            if e.is_tensor:
                state[name] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=_sharding.torch_dtype(e.dtype or "F32")),
                    size=torch.Size(e.shape),
                    chunks=[ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in e.chunks],
                )
                for c in e.chunks:
                    self._refs[MetadataIndex(name, c.offsets)] = (e, c)
            else:
                state[name] = BytesStorageMetadata()
                self._refs[MetadataIndex(name)] = (e, None)
        return Metadata(
            state_dict_metadata=state,
            planner_data={name: e.path for name, e in sharded.table.entries.items()},
            storage_meta=StorageMeta(checkpoint_id=sharded.files.location),
        )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.open()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        sharded = self.open()
        # by chunk, so a chunk that feeds several regions of this rank is read once
        by_chunk: dict[tuple[str, str], list[ReadItem]] = {}
        for item in plan.items:
            entry, chunk = self._ref(item.storage_index)
            if item.type == LoadItemType.BYTE_IO or chunk is None:
                buf = io.BytesIO()
                torch.save(entry.value, buf)  # our own bytes, from the decoded JSON value
                buf.seek(0)
                planner.load_bytes(item, buf)
            else:
                by_chunk.setdefault((chunk.file, chunk.key), []).append(item)
        for items in by_chunk.values():
            entry, found = self._ref(items[0].storage_index)
            chunk = cast(_sharding.Chunk, found)
            whole = len(items) == 1 and tuple(items[0].lengths) == chunk.sizes
            if whole:
                dst = planner.resolve_tensor(items[0]).detach()
                if (
                    dst.device.type == "cpu"
                    and dst.is_contiguous()
                    and dst.dtype == _sharding.torch_dtype(entry.dtype or "F32")
                ):
                    sharded.read_chunk(entry, chunk, dst)
                    planner.commit_tensor(items[0], dst)
                    continue
            data = sharded.read_chunk(entry, chunk)
            for item in items:
                region = data[tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths, strict=True))]
                dst = planner.resolve_tensor(item).detach()
                dst.copy_(region)
                planner.commit_tensor(item, dst)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _ref(self, index: MetadataIndex) -> tuple[_sharding.Entry, _sharding.Chunk | None]:
        ref = self._refs.get(index)
        if ref is None:  # DCP's index carries no hint we rely on: look it up by name and offsets
            ref = self._refs.get(MetadataIndex(index.fqn, index.offset))
        if ref is None:
            raise CheckpointInputError(f"{self.path}: DCP asked for {index.fqn} at {index.offset}, which is not saved")
        return ref

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return accepts(checkpoint_id)
