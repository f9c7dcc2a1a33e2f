"""Opening a ``.safetensors`` file with an error that names it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safe_open(path, framework="pt")``; a truncated or garbled file is a ``ValueError``
    naming it (the library's own error does not)."""
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a readable .safetensors file ({exc}); truncated or "
                         "damaged?") from None
    with handle as f:
        yield f
