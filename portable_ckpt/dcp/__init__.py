"""Our format as the storage of PyTorch's distributed checkpointing (DCP): sharded saves, resharding loads.

``PortableStorageWriter``/``PortableStorageReader`` plug into ``torch.distributed.checkpoint.save``
and ``load``; ``collective.py`` makes ``save_checkpoint``, ``load_checkpoint`` and the manager
collective under a process group.
"""

from portable_ckpt.dcp.reader import PortableStorageReader
from portable_ckpt.dcp.writer import PortableStorageWriter

__all__ = ["PortableStorageReader", "PortableStorageWriter"]
