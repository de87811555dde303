"""The unit every reader produces: raw fields plus where they came from, for one-line error messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Record:
    """One example as read from disk.

    ``source`` is "path:LINE" (first line of the example) for line-based formats, and
    "path:LOCATION" for JSON-based ones (e.g. ``dev.json:data[3].paragraphs[0].qas[2]``),
    so task code can prefix its own complaints about a record with it.
    """

    fields: dict[str, Any]
    source: str
