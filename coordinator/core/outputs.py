"""Where a finished action's outputs live (pure core, the outputs aggregate).

Outputs up to :data:`INLINE_OUTPUT_BYTES` (the common case) stay on the
:class:`~plait.coordinator.core.model.ActionRecord`. Larger ones are not kept in memory: they are
in the journal already, in the ``ACTION_FINISHED`` event that committed them, so the record keeps
only that event's sequence (``outputs_ref``) and size, and :class:`OutputStore` reads them back
through an LRU cache bounded by bytes. A succeeded map or pipeline whose collected outputs are
larger than :data:`COPIED_COLLECTION_BYTES` is not copied at all (its ``ACTION_FINISHED`` carries
no outputs): its outputs are its children's, put together when read (``outputs_items``, the
children that had succeeded).

So memory per finished action is bounded whatever its outputs' size; the cache is the only
place large outputs stay, and it holds at most ``cache_bytes`` of them (plus those of the batch
being committed: a cache miss reads the journal, which has them only once they are durable).

Reading back is the one read the core makes, through a port it is given (:class:`OutputSource`:
the journal store, from the runtime; a dict in tests). It is a plain synchronous call, one indexed
read of one event, made on a cache miss only: for the outputs of a lease's needs (at most
``max_lease_bytes`` in all, judged from sizes before anything is read), a map's list, a status
page or one action's outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial
from typing import Protocol

from plait.coordinator.core import transitions as t
from plait.coordinator.core.model import ActionRecord
from plait.errors import UnavailableError
from plait.jsonlimits import utf8_len

INLINE_OUTPUT_BYTES = 1024  # outputs up to this many bytes stay in memory
# A map's collected outputs up to this size are copied into its ACTION_FINISHED event, like any
# action's (max_output_bytes); beyond it they are only ever put together when read.
COPIED_COLLECTION_BYTES = 1024 * 1024
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
_OPEN, _CLOSE, _NULL, _EMPTY = '{"items":[', "]}", "null", "{}"


class OutputSource(Protocol):
    """Where outputs too large to keep in memory are read back from (the journal)."""

    def read_outputs(self, sequence: int) -> str | None:
        """``outputs_json`` of the event with this sequence; None if no such event is kept."""
        ...


class OutputCache:
    """Outputs by journal sequence, least recently used evicted first, bounded by bytes.

    Entries ``put(..., pending=True)`` belong to a batch not yet committed: the journal cannot
    give them back yet, so they are never evicted until :meth:`durable` says their sequence is.
    """

    __slots__ = ("_lru", "_pending", "bytes", "capacity", "hits", "misses")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.bytes = 0  # held by committed entries (pending ones are counted when durable)
        self.hits = 0
        self.misses = 0
        self._lru: OrderedDict[int, tuple[str, int]] = OrderedDict()
        self._pending: dict[int, tuple[str, int]] = {}

    def __len__(self) -> int:
        return len(self._lru) + len(self._pending)

    def get(self, key: int) -> str | None:
        """The text under ``key`` (now the most recently used), or None."""
        entry = self._lru.get(key)
        if entry is not None:
            self._lru.move_to_end(key)
            self.hits += 1
            return entry[0]
        entry = self._pending.get(key)
        if entry is not None:
            self.hits += 1
            return entry[0]
        self.misses += 1
        return None

    def put(self, key: int, text: str, size: int, *, pending: bool = False) -> None:
        """Keeps ``text`` (``size`` bytes) under ``key``; evicts the oldest past the capacity."""
        if pending:
            self._pending[key] = (text, size)
            return
        old = self._lru.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        if size > self.capacity:
            return  # would evict everything else and still not fit
        self._lru[key] = (text, size)
        self.bytes += size
        self._evict()

    def durable(self, upto: int | None = None) -> None:
        """Pending entries up to journal sequence ``upto`` (all when None) are committed: they
        become ordinary (evictable) ones."""
        if not self._pending:
            return
        if upto is None:
            pending, self._pending = self._pending, {}
        else:
            pending = {k: v for k, v in self._pending.items() if k <= upto}
            for key in pending:
                del self._pending[key]
        for key, (text, size) in pending.items():
            self.put(key, text, size)

    def _evict(self) -> None:
        lru = self._lru
        while self.bytes > self.capacity and lru:
            _, (_, size) = lru.popitem(last=False)
            self.bytes -= size


class OutputStore:
    """Every action's outputs: inline on the record, or read through the cache."""

    __slots__ = ("cache", "source")

    def __init__(
        self, source: OutputSource | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.source = source
        self.cache = OutputCache(cache_bytes)

    # ---- keeping --------------------------------------------------------------------------

    def keep(self, a: ActionRecord, text: str, sequence: int) -> None:
        """Records the outputs ``a`` committed in the event at ``sequence``.

        ``text`` empty on a map or pipeline: its outputs are its succeeded children's. A large
        ``text`` is cached as pending: the event may not be durable yet (the journal cannot
        give it back until :meth:`OutputCache.durable`, which replay calls after each event).
        """
        if not text and a.children is not None:
            items = [c if c.state == t.SUCCEEDED else None for c in a.children]
            a.outputs_json, a.outputs_ref, a.outputs_items = "", 0, items
            a.outputs_bytes = collected_bytes(items)
            return
        size = utf8_len(text)
        a.outputs_bytes = size
        a.outputs_items = None
        if size <= INLINE_OUTPUT_BYTES:
            a.outputs_json, a.outputs_ref = text, 0
            return
        a.outputs_json, a.outputs_ref = "", sequence
        self.cache.put(sequence, text, size, pending=True)

    # ---- reading --------------------------------------------------------------------------

    def text(self, a: ActionRecord) -> str:
        """``a``'s committed outputs ("" when it has none), reading the journal if need be."""
        if a.outputs_json or not a.outputs_bytes:
            return a.outputs_json
        if a.outputs_ref:
            return self._read(a.outputs_ref)
        assert a.outputs_items is not None
        return self.collect(a.outputs_items)

    def collect(self, items: list[ActionRecord | None]) -> str:
        """``{"items":[...]}`` over ``items`` (None: ``null``), reading large ones back."""
        return "".join(piece() for _, piece in self._sized_pieces(items))

    def read_range(self, a: ActionRecord, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes of ``a``'s outputs (UTF-8) from byte ``offset``.

        Collected outputs are read child by child; children wholly outside the range are
        skipped by their known sizes, unread.
        """
        if a.outputs_items is None:
            return self.text(a).encode()[offset : offset + limit]
        out: list[bytes] = []
        at, end = 0, offset + limit
        for size, piece in self._sized_pieces(a.outputs_items):
            if at >= end:
                break
            if at + size > offset:
                out.append(piece().encode()[max(0, offset - at) : end - at])
            at += size
        return b"".join(out)

    def _read(self, ref: int) -> str:
        text = self.cache.get(ref)
        if text is not None:
            return text
        found = self.source.read_outputs(ref) if self.source is not None else None
        if found is None:
            raise UnavailableError(
                f"outputs at journal sequence {ref} are no longer in the journal"
            )
        self.cache.put(ref, found, utf8_len(found))
        return found

    def _sized_pieces(
        self, items: list[ActionRecord | None]
    ) -> Iterator[tuple[int, Callable[[], str]]]:
        """(bytes, how to get the text) of each piece of collected outputs, in order."""
        yield len(_OPEN), partial(str, _OPEN)
        for i, c in enumerate(items):
            if i:
                yield 1, partial(str, ",")
            if c is None:
                yield len(_NULL), partial(str, _NULL)
            elif not c.outputs_bytes:
                yield len(_EMPTY), partial(str, _EMPTY)
            else:
                yield c.outputs_bytes, partial(self.text, c)
        yield len(_CLOSE), partial(str, _CLOSE)


def collected_bytes(items: list[ActionRecord | None]) -> int:
    """Size of ``{"items":[...]}`` over ``items`` (None: ``null``; no outputs: ``{}``)."""
    total = len(_OPEN) + len(_CLOSE) + max(0, len(items) - 1)
    for c in items:
        total += len(_NULL) if c is None else (c.outputs_bytes or len(_EMPTY))
    return total
