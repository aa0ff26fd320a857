"""The checksum of the format: XXH3-128, written as 32 lowercase hex digits.

XXH3 runs at memory speed (~24 GB/s on one core here), so verifying every byte on load costs a
fraction of reading it. It detects accidental damage; it is not a signature.
"""

from __future__ import annotations

from typing import Protocol

import xxhash

ALGORITHM = "xxh3-128"


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def new_hasher() -> Hasher:
    return xxhash.xxh3_128()


def checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)
