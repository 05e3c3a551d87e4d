"""Reading a tar stream as it arrives, with every field checked and every buffer bounded.

Both ends of ``cp`` unpack what the other side sent: the host a guest's tar, the agent the host's (and
the agent must not trust its container either). ``tarfile`` holds a pax header or a GNU long name in
memory whatever its size and reads from a file, so this is a small push parser instead: ``feed`` it
the bytes of each frame and it calls its handler with each member's header and then its data, never
holding more than one header. It knows ustar, pax (``x``; ``g`` is ignored) and GNU long names (``L``,
``K``); sparse members are refused. Standard library only and cheap to import: the agent ships it.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class Handler(Protocol):
        def begin(self, member: Member) -> None: ...
        def data(self, chunk: memoryview) -> None: ...
        def end(self) -> None: ...

BLOCK = 512
MAX_NAME = 4096  # PATH_MAX, for member and link names
MAX_EXTENDED = 1 << 16  # a pax header or GNU long name; a real one is a few hundred bytes
_ZERO = bytes(BLOCK)
_MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to chown
_MAX_SIZE = 1 << 62
_MAX_TIME = 1 << 40

REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO = "0", "1", "2", "3", "4", "5", "6"
_REGULAR_TYPES = ("0", "\0", "7")  # "7" (contiguous) is a regular file everywhere but on one old OS
_NO_DATA = (HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO)


class TarError(Exception):
    """A stream that is not a tar this code accepts, or a member it refuses; the message is for the user."""


class Member:
    """One member's header, all fields decoded and range-checked. ``kind`` is "0" for a regular file."""

    __slots__ = ("gid", "kind", "linkname", "mode", "mtime", "name", "size", "uid")

    def __init__(self, name: str, kind: str, mode: int, uid: int, gid: int, size: int, mtime: int,
                 linkname: str) -> None:
        self.name, self.kind, self.mode, self.uid, self.gid = name, kind, mode, uid, gid
        self.size, self.mtime, self.linkname = size, mtime, linkname

    def __repr__(self) -> str:
        return f"Member({self.name!r}, kind={self.kind!r}, size={self.size})"


def _number(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:
        if field[0] != 0x80:
            raise TarError(f"the archive has a negative or oversized {what}")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"the archive has a malformed {what} field") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checked_name(name: str, what: str) -> str:
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME or "\0" in name:
        raise TarError(f"the archive has a {what} longer than {MAX_NAME} bytes or with a NUL in it")
    return name


def _pax(data: bytes) -> dict[str, str]:
    """The records ``"<len> <key>=<value>\\n"`` of a pax extended header."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = data[space + 1:pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise TarError("the archive has a malformed pax header")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _pax_int(records: dict[str, str], key: str, default: int, limit: int) -> int:
    if key not in records:
        return default
    text = records[key].split(".", 1)[0] if key == "mtime" else records[key]
    if not text.lstrip("-").isdigit() or not -limit <= int(text) <= limit or (key != "mtime" and int(text) < 0):
        raise TarError(f"the archive has a bad pax {key} value")
    return int(text)


class TarReader:
    """Push parser: ``feed`` bytes as they come, ``close`` at the end of the stream."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.members = 0
        self.ended = False  # the two zero blocks were seen; anything after them is padding
        self._header = bytearray()
        self._remaining = 0  # data bytes of the current member still to come
        self._pad = 0  # padding after it
        self._extended: bytearray | None = None  # the data of an x, g, L or K header being collected
        self._extended_kind = ""
        self._pending: dict[str, str] = {}  # what x, L and K headers said about the next member
        self._in_member = False
        self._zeros = 0

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view) and not self.ended:
            if self._remaining:
                n = min(self._remaining, len(view) - pos)
                if self._extended is not None:
                    self._extended += view[pos:pos + n]
                elif self._in_member:
                    self.handler.data(view[pos:pos + n])
                self._remaining -= n
                pos += n
                if not self._remaining:
                    self._data_done()
            elif self._pad:
                n = min(self._pad, len(view) - pos)
                self._pad -= n
                pos += n
            else:
                n = min(BLOCK - len(self._header), len(view) - pos)
                self._header += view[pos:pos + n]
                pos += n
                if len(self._header) == BLOCK:
                    block = bytes(self._header)
                    self._header.clear()
                    self._on_header(block)

    def close(self) -> None:
        """The stream has ended: it must not end inside a header or a member."""
        if self.ended or self._zeros:
            return
        if self._header or self._remaining or self._pad or self._pending:
            raise TarError("the archive ended in the middle of a member")

    def _data_done(self) -> None:
        if self._extended is not None:
            data, kind = bytes(self._extended), self._extended_kind
            self._extended = None
            if kind == "x":
                self._pending.update(_pax(data))
            elif kind in ("L", "K"):
                self._pending["path" if kind == "L" else "linkpath"] = _text(data)
        elif self._in_member:
            self._in_member = False
            self.handler.end()

    def _on_header(self, block: bytes) -> None:
        if block == _ZERO:
            self._zeros += 1
            self.ended = self._zeros >= 2
            return
        self._zeros = 0
        try:
            stored = _number(block[148:156], "checksum")
        except TarError:
            stored = -1
        unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
        signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b >= 0x80)
        if stored not in (unsigned, signed):
            raise TarError("the archive has a header with a bad checksum (not a tar stream?)")
        kind = chr(block[156])
        size = _number(block[124:136], "size")
        self._pad = -size % BLOCK
        if kind in ("x", "g", "L", "K"):
            if size > MAX_EXTENDED:
                raise TarError(f"the archive has an extended header of {size} bytes (limit {MAX_EXTENDED})")
            self._extended, self._extended_kind, self._remaining = bytearray(), kind, size
            if not size:
                self._data_done()
            return
        if kind == "S" or any(key.startswith("GNU.sparse") for key in self._pending):
            raise TarError("the archive has a sparse member, which cp does not take")
        member = self._member(block, kind, size)
        self._pending = {}
        self.members += 1
        self._remaining = member.size if kind not in _NO_DATA else 0
        self._pad = -self._remaining % BLOCK
        self._in_member = True
        self.handler.begin(member)
        if not self._remaining:
            self._data_done()

    def _member(self, block: bytes, kind: str, size: int) -> Member:
        pax = self._pending
        name = pax.get("path")
        if name is None:
            name = _text(block[0:100])
            prefix = _text(block[345:500]) if block[257:262] == b"ustar" else ""
            if prefix:
                name = prefix + "/" + name
        member = Member(
            name=_checked_name(name, "member name"),
            kind="0" if kind in _REGULAR_TYPES else kind,
            mode=_number(block[100:108], "mode") & 0o7777,
            uid=_pax_int(pax, "uid", _number(block[108:116], "uid"), _MAX_ID),
            gid=_pax_int(pax, "gid", _number(block[116:124], "gid"), _MAX_ID),
            size=_pax_int(pax, "size", size, _MAX_SIZE),
            mtime=_pax_int(pax, "mtime", _number(block[136:148], "mtime"), _MAX_TIME),
            linkname=_checked_name(pax.get("linkpath", _text(block[157:257])), "link name"),
        )
        for what, value, limit in (("uid", member.uid, _MAX_ID), ("gid", member.gid, _MAX_ID),
                                   ("size", member.size, _MAX_SIZE), ("mtime", member.mtime, _MAX_TIME)):
            if not -limit <= value <= limit or (what != "mtime" and value < 0):
                raise TarError(f"the archive has a {what} out of range for {member.name!r}")
        return member
