"""PostgreSQL binary COPY, written straight from numpy records: layouts, encoding, streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

_US_PER_SECOND = 1_000_000
_US_PER_HOUR = 3_600 * _US_PER_SECOND
_US_PER_DAY = 24 * _US_PER_HOUR
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PG_EPOCH_US = 946_684_800 * _US_PER_SECOND  # 2000-01-01 UTC, the origin of binary timestamps


_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_COPY_TRAILER = b"\xff\xff"
_COPY_PIECE = 1 << 20  # bytes per CopyData message


# Column kinds: "int2", "int4", "int8", "ts" (int64 microseconds since the Unix epoch),
# "money" (int64 cents -> numeric with scale 2), ("bytes", n) (fixed n bytes: char(n) / text),
# ("text", n) (variable text of at most n bytes; lengths are passed alongside).
Kind = str | tuple[str, int]


class _RowLayout:
    """A fixed-size numpy record per COPY row; variable text columns are padded to their maximum and
    the padding is cut out with a byte mask, so encoding a chunk is a handful of vector operations."""

    def __init__(self, kinds: Sequence[Kind]) -> None:
        self.kinds = list(kinds)
        names: list[str] = ["nf"]
        formats: list[Any] = [">i2"]
        for k, kind in enumerate(self.kinds):
            names += [f"l{k}", f"v{k}"]
            formats.append(">i4")
            if kind == "int2":
                formats.append(">i2")
            elif kind == "int4":
                formats.append(">i4")
            elif kind in ("int8", "ts"):
                formats.append(">i8")
            elif kind == "money":
                formats.append((">i2", (8,)))  # ndigits, weight, sign, dscale, 4 base-10000 digits
            elif isinstance(kind, tuple) and kind[0] in ("bytes", "text"):
                formats.append(f"S{kind[1]}")
            else:  # pragma: no cover - programming error
                raise ValueError(f"unknown column kind {kind!r}")
        self.dtype = np.dtype({"names": names, "formats": formats})
        self.variable = [k for k, kind in enumerate(self.kinds) if isinstance(kind, tuple) and kind[0] == "text"]

    def encode(self, columns: Sequence[npt.NDArray[Any]], lengths: dict[int, npt.NDArray[Any]] | None = None) -> bytes:
        """COPY BINARY body (no header/trailer) of the given column arrays."""
        n = len(columns[0])
        rows = np.empty(n, dtype=self.dtype)
        rows["nf"] = len(self.kinds)
        for k, (kind, values) in enumerate(zip(self.kinds, columns, strict=True)):
            length_field, value_field = f"l{k}", f"v{k}"
            if kind == "money":
                rows[length_field] = 16
                cents = values.astype(np.int64, copy=False)
                whole = cents // 100
                numeric = rows[value_field]
                numeric[:, 0] = 4
                numeric[:, 1] = 2
                numeric[:, 2] = 0
                numeric[:, 3] = 2
                numeric[:, 4] = whole // 100_000_000
                numeric[:, 5] = (whole // 10_000) % 10_000
                numeric[:, 6] = whole % 10_000
                numeric[:, 7] = (cents % 100) * 100
            elif kind == "ts":
                rows[length_field] = 8
                rows[value_field] = values - _PG_EPOCH_US
            elif isinstance(kind, tuple):
                rows[length_field] = lengths[k] if (lengths is not None and k in lengths) else kind[1]
                rows[value_field] = values
            else:
                rows[length_field] = rows.dtype[value_field].itemsize
                rows[value_field] = values
        raw = rows.view(np.uint8).reshape(n, self.dtype.itemsize)
        if not self.variable or n == 0:
            return raw.tobytes()
        keep = np.ones(raw.shape, dtype=bool)
        for k in self.variable:
            start = self.dtype.fields[f"v{k}"][1]  # type: ignore[index]
            width = self.dtype[f"v{k}"].itemsize
            assert lengths is not None
            keep[:, start : start + width] = np.arange(width) < lengths[k][:, None]
        return raw[keep].tobytes()


_ORDER_LAYOUT = _RowLayout(["int8", "int8", ("text", 9), "money", "ts", "ts"])
_ORDER_COLUMNS = ("id", "customer_id", "status", "total_amount", "created_at", "updated_at")
_ITEM_LAYOUT = _RowLayout(["int8", "int2", "int8", "int4", "money", "ts"])
_ITEM_COLUMNS = ("order_id", "line_no", "product_id", "quantity", "unit_price", "created_at")
_CUSTOMER_COLUMNS = ("id", "email", "name", "country", "created_at")
_PRODUCT_COLUMNS = (
    "id", "sku", "name", "category", "price", "cost", "stock_quantity", "reorder_point", "lead_time_days",
    "created_at",
)  # fmt: skip


async def _pieces(body: bytes) -> AsyncIterator[bytes | memoryview]:
    view = memoryview(body)
    yield _COPY_HEADER
    for start in range(0, len(view), _COPY_PIECE):
        yield view[start : start + _COPY_PIECE]
    yield _COPY_TRAILER


async def _copy(
    conn: asyncpg.Connection, table: str, columns: Sequence[str], body: bytes, freeze: bool = False
) -> None:
    await conn.copy_to_table(
        table, source=_pieces(body), columns=list(columns), format="binary", freeze=True if freeze else None
    )


def _text_column(values: Sequence[str]) -> tuple[npt.NDArray[np.bytes_], npt.NDArray[np.int32]]:
    encoded = [v.encode() for v in values]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int32, count=len(encoded))
    width = max(int(lengths.max()) if len(encoded) else 1, 1)
    return np.array(encoded, dtype=f"S{width}"), lengths
