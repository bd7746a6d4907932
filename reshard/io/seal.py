"""A manifest's seal (`manifest_xxh3_128`, its last key): the digest covers every byte of the
file, so an edit that keeps the schema valid is still caught (exit 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import xxhash

SEAL_KEY = "manifest_xxh3_128"
UNSEALED = "0" * 32


def seal_tail(digest: str) -> bytes:
    """How a sealed manifest ends: the seal is its last key (json.dumps, indent=1)."""
    return f'\n "{SEAL_KEY}": "{digest}"\n}}\n'.encode()


def seal_bytes(text: bytes) -> bytes:
    """`text` ends with the unsealed tail; put in the digest of the whole unsealed text."""
    tail = seal_tail(UNSEALED)
    assert text.endswith(tail)
    return text[: -len(tail)] + seal_tail(xxhash.xxh3_128(text).hexdigest())


def check_seal(path: Path, raw: bytes, doc: dict[str, Any]) -> str | None:
    """None when the file's bytes are exactly what reshard sealed, else why not."""
    tail = seal_tail(doc[SEAL_KEY])
    if not raw.endswith(tail):
        return f"{path}: '{SEAL_KEY}' is not the file's last line; the manifest was edited"
    digest = xxhash.xxh3_128(raw[: -len(tail)] + seal_tail(UNSEALED)).hexdigest()
    if digest != doc[SEAL_KEY]:
        return (
            f"{path}: content hash {digest} != '{SEAL_KEY}' {doc[SEAL_KEY]}: the manifest was "
            "edited or corrupted after convert; restore it or re-run reshard convert"
        )
    return None
