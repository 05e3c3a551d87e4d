"""Unpacking a tar stream beneath an open directory, following no symlink, as both ends of ``cp`` do.

The host unpacks what a guest sent, and the agent what the host sent into a container that may have
planted links anywhere: the rules are the same. Every path is opened one component at a time from a
directory fd that is held, with ``O_NOFOLLOW`` (``O_DIRECTORY`` for the parents), and ``..`` and
absolute names are refused, so no name resolves outside the destination whatever the tree holds or
how it changes meanwhile. (``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` would give the same
guarantee; the walk is needed anyway to create missing parents, and works on every kernel.)

- A symlink in the way of a member's parent is an error: nothing is written beneath a link. One in the
  place of a file, link or hard link member is replaced, never written through: each of them is made
  under a temporary name in the parent and renamed over the old entry. A directory member over a
  non-directory, or the other way round, is an error, as ``docker cp`` makes it.
- A regular file is written to that temporary name, fsynced and then renamed, so a full disk (or any
  other failure) leaves no partial file.
- A hard link may only name a regular file made earlier by the same copy: its device and inode are
  recorded when it is made and checked before the link is.
- Devices, fifos, sockets and unknown types are skipped and counted (``skipped``); setuid, setgid and
  a file's sticky bit are dropped. Ownership is the tar's only with ``keep_owner``; otherwise what the
  caller creates is its own.
- Names are capped in length and depth. The first component of every name can be replaced (``top``),
  or dropped (``top=""``: the members go straight into the destination).
"""

from __future__ import annotations

import errno
import os
import stat

from micropod.agent.tarstream import DIRECTORY, HARDLINK, MAX_NAME, REGULAR, SYMLINK, Member, TarError, TarReader

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

MAX_DEPTH = 256
MAX_LINK_TARGETS = 1 << 18  # regular files remembered as hard-link targets; later ones cannot be
MAX_DEFERRED = 1 << 16  # directories whose mode and times are applied at the end; later ones at once
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def member_parts(name: str, top: str | None) -> list[str]:
    """The components of a member name, its first one replaced by ``top`` (dropped if it is "", kept if
    None); refuses escapes."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts:
        raise TarError(f"refusing the archive member {name!r}: absolute, empty or with '..'")
    if len(parts) > MAX_DEPTH or any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts):
        raise TarError(f"refusing the archive member {name[:200]!r}...: too deep or a name too long")
    if top is None:
        return parts
    return [top, *parts[1:]] if top else parts[1:]


def _show(parts: list[str]) -> str:
    return "/".join(parts) or "."


class Extractor:
    """A tar handler that unpacks beneath ``dirfd`` (which it does not close)."""

    def __init__(self, dirfd: int, top: str | None, keep_owner: bool = False) -> None:
        self.dirfd = dirfd
        self.top = top
        self.keep_owner = keep_owner
        self.skipped: list[str] = []
        self._links: dict[tuple[str, ...], tuple[int, int]] = {}
        self._deferred: list[tuple[list[str], Member]] = []
        self._cached: tuple[tuple[str, ...], int] | None = None
        self._parts: list[str] = []
        self._member: Member | None = None
        self._file: tuple[int, int, str] | None = None  # (fd, parent fd, temp name) being written

    # The tar handler.

    def begin(self, member: Member) -> None:
        parts = member_parts(member.name, self.top)
        self._parts, self._member = parts, member
        try:
            if member.kind == DIRECTORY:
                self._directory(parts, member)
            elif not parts:
                raise TarError(f"refusing the archive member {member.name!r}: only a directory can be the top")
            elif member.kind == REGULAR:
                self._open_file(parts)
            elif member.kind == SYMLINK:
                self._place(parts, member, lambda pfd, tmp: os.symlink(member.linkname, tmp, dir_fd=pfd))
            elif member.kind == HARDLINK:
                self._hard_link(parts, member)
            else:
                self.skipped.append(_show(parts))
        except OSError as exc:
            raise _translate(exc, parts) from None

    def data(self, chunk: memoryview) -> None:
        if self._file is None:
            return  # a skipped member's
        fd = self._file[0]
        try:
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
        except OSError as exc:
            self.abort()
            raise _translate(exc, self._parts) from None

    def end(self) -> None:
        if self._file is None:
            return
        fd, pfd, tmp = self._file
        member, parts = self._member, self._parts
        assert member is not None
        try:
            self._apply(fd, member, member.mode & 0o777)
            os.fsync(fd)
            st = os.fstat(fd)
            self._rename(pfd, tmp, parts)
        except OSError as exc:
            self.abort()
            raise _translate(exc, parts) from None
        os.close(fd)
        self._file = None
        if len(self._links) < MAX_LINK_TARGETS:
            self._links[tuple(parts)] = (st.st_dev, st.st_ino)

    # The end of the copy.

    def finish(self) -> None:
        """Apply the directories' modes and times, now that their contents are written."""
        try:
            for parts, member in reversed(self._deferred):
                try:
                    fd = self._walk(parts, create=False)
                    try:
                        self._apply(fd, member, member.mode & 0o1777)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    raise _translate(exc, parts) from None
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the file being written, if any, and close every fd held."""
        file, self._file = self._file, None
        if file is not None:
            os.close(file[0])
            _unlink_quietly(file[1], file[2])
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    # Members.

    def _directory(self, parts: list[str], member: Member) -> None:
        if not parts:
            return  # the destination itself keeps its own mode, owner and times
        pfd = self._parent(parts)
        st = _lstat(pfd, parts[-1])
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise TarError(f"cannot overwrite non-directory {_show(parts)} with a directory")
        if st is None:
            os.mkdir(parts[-1], 0o700, dir_fd=pfd)
        if len(self._deferred) < MAX_DEFERRED:
            self._deferred.append((parts, member))
        else:
            fd = self._walk(parts, create=False)
            try:
                self._apply(fd, member, member.mode & 0o1777)
            finally:
                os.close(fd)

    def _open_file(self, parts: list[str]) -> None:
        pfd = self._parent(parts)
        self._refuse_directory(pfd, parts)
        for _ in range(16):
            tmp = f".micropod-cp-{os.urandom(8).hex()}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=pfd)
            except FileExistsError:
                continue
            self._file = (fd, pfd, tmp)
            return
        raise TarError(f"could not create a temporary file beside {_show(parts)}")

    def _hard_link(self, parts: list[str], member: Member) -> None:
        try:
            target = member_parts(member.linkname, self.top)
        except TarError:
            target = []
        recorded = self._links.get(tuple(target)) if target else None
        if recorded is None:
            raise TarError(f"refusing the hard link {_show(parts)}: its target {member.linkname!r} is not a "
                           f"file this copy made")
        tfd = self._walk(target[:-1], create=False)
        try:
            def link(pfd: int, tmp: str) -> None:
                if _identity(_lstat(tfd, target[-1])) != recorded:
                    raise TarError(f"refusing the hard link {_show(parts)}: its target has changed")
                os.link(target[-1], tmp, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
                if _identity(_lstat(pfd, tmp)) != recorded:
                    os.unlink(tmp, dir_fd=pfd)
                    raise TarError(f"refusing the hard link {_show(parts)}: its target has changed")

            self._place(parts, member, link)
        finally:
            os.close(tfd)
        if len(self._links) < MAX_LINK_TARGETS:
            self._links[tuple(parts)] = recorded

    def _place(self, parts: list[str], member: Member, make: Callable[[int, str], None]) -> None:
        """A link made under a temporary name, then renamed over whatever non-directory was there."""
        pfd = self._parent(parts)
        self._refuse_directory(pfd, parts)
        tmp = f".micropod-cp-{os.urandom(8).hex()}"
        make(pfd, tmp)
        try:
            if member.kind == SYMLINK:
                if self.keep_owner:
                    os.chown(tmp, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
                os.utime(tmp, (member.mtime, member.mtime), dir_fd=pfd, follow_symlinks=False)
            self._rename(pfd, tmp, parts)
        except BaseException:
            _unlink_quietly(pfd, tmp)
            raise

    # Helpers.

    def _apply(self, fd: int, member: Member, mode: int) -> None:
        if self.keep_owner:
            os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, mode)  # after fchown, which may clear bits
        os.utime(fd, (member.mtime, member.mtime))

    def _rename(self, pfd: int, tmp: str, parts: list[str]) -> None:
        self._refuse_directory(pfd, parts)
        os.rename(tmp, parts[-1], src_dir_fd=pfd, dst_dir_fd=pfd)

    def _refuse_directory(self, pfd: int, parts: list[str]) -> None:
        st = _lstat(pfd, parts[-1])
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise TarError(f"cannot overwrite directory {_show(parts)} with a non-directory")

    def _parent(self, parts: list[str]) -> int:
        """An fd of the member's parent directory (cached: members come grouped by directory)."""
        key = tuple(parts[:-1])
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        fd = self._walk(parts[:-1], create=True)
        if self._cached is not None:
            os.close(self._cached[1])
        self._cached = (key, fd)
        return fd

    def _walk(self, parts: list[str], create: bool) -> int:
        return open_beneath(self.dirfd, parts, create)


def open_beneath(dirfd: int, parts: list[str], create: bool = False) -> int:
    """A new fd of directory ``parts`` beneath ``dirfd``, following no link on the way (missing
    directories made if ``create``)."""
    fd = os.dup(dirfd)
    try:
        for i, name in enumerate(parts):
            try:
                step = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o755, dir_fd=fd)
                step = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = _lstat(fd, name)
                what = "a symbolic link" if st is not None and stat.S_ISLNK(st.st_mode) else "not a directory"
                raise TarError(f"refusing to write beneath {_show(parts[:i + 1])}: it is {what}") from None
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lstat(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _unlink_quietly(dirfd: int, name: str) -> bool:
    """Clean-up on a failure: a second error here must not hide the first."""
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        return False
    return True


def _identity(st: os.stat_result | None) -> tuple[int, int] | None:
    return (st.st_dev, st.st_ino) if st is not None and stat.S_ISREG(st.st_mode) else None


def _translate(exc: OSError, parts: list[str]) -> TarError:
    if exc.errno in _FULL:
        return TarError(f"no space left on the device while writing {_show(parts)}: the copy stopped")
    return TarError(f"{_show(parts)}: {exc.strerror or exc}")


class Untar:
    """A tar stream unpacked beneath ``dirfd`` as it is fed; the first error ends it (see ``error``)."""

    def __init__(self, dirfd: int, top: str | None, keep_owner: bool = False) -> None:
        self.extractor = Extractor(dirfd, top, keep_owner)
        self.reader = TarReader(self.extractor)
        self.error: TarError | None = None

    def feed(self, data: bytes | memoryview) -> None:
        """Unpack what ``data`` completes; after an error, ignore the rest of the stream."""
        if self.error is not None:
            return
        try:
            self.reader.feed(data)
        except TarError as exc:
            self.error = exc
            self.extractor.abort()

    def close(self) -> None:
        """End the copy: raise its first error, or finish the directories."""
        if self.error is None:
            try:
                self.reader.close()
                self.extractor.finish()
            except TarError as exc:
                self.error = exc
        self.extractor.abort()
        if self.error is not None:
            raise self.error

    @property
    def skipped(self) -> list[str]:
        return self.extractor.skipped


__all__ = ["MAX_NAME", "Extractor", "TarError", "Untar", "member_parts", "open_beneath"]
