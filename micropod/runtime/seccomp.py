"""``linux.seccomp``: validated, built into a libseccomp filter (libseccomp.so.2 through ctypes, opened by
preload() before the init enters the container's root) and loaded; and docker's default profile.

The filter is built as runc 1.1 builds it: a syscall name libseccomp does not know is skipped (docker's profile
names syscalls newer than most libseccomp releases and must still load); SCMP_ACT_KILL is KILL_THREAD; ERRNO
and TRACE return EPERM unless errnoRet says otherwise; a rule repeating the default action is skipped;
conditions on one argument become one rule each (an OR); no_new_privs is left to process.noNewPrivileges.
Beyond runc 1.1, which refuses every flag, the runtime-spec's flags map to libseccomp's filter attributes; and
as the runtime-spec requires (runc 1.1 ignores it), errnoRet on an action that returns no errno is an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from micropod import syscalls
from micropod.errors import SeccompError, SpecError

ACTIONS: dict[str, int] = {
    "SCMP_ACT_KILL": 0, "SCMP_ACT_KILL_THREAD": 0, "SCMP_ACT_KILL_PROCESS": 0x80000000, "SCMP_ACT_TRAP": 0x30000,
    "SCMP_ACT_ERRNO": 0x50000, "SCMP_ACT_TRACE": 0x7FF00000, "SCMP_ACT_LOG": 0x7FFC0000,
    "SCMP_ACT_NOTIFY": 0x7FC00000, "SCMP_ACT_ALLOW": 0x7FFF0000,
}
_TAKES_ERRNO = ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE")

OPERATORS: dict[str, int] = {  # enum scmp_compare
    "SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}

# The runtime-spec's names; libseccomp's, for seccomp_arch_resolve_name(), are the same in lower case.
ARCHITECTURES: dict[str, str] = {f"SCMP_ARCH_{name.upper()}": name for name in (
    "x86", "x86_64", "x32", "arm", "aarch64", "mips", "mips64", "mips64n32", "mipsel", "mipsel64", "mipsel64n32",
    "ppc", "ppc64", "ppc64le", "s390", "s390x", "parisc", "parisc64", "riscv64", "loongarch64")}

# The runtime-spec's flags, as libseccomp filter attributes (enum scmp_filter_attr) set to 1.
FLAGS: dict[str, int] = {
    "SECCOMP_FILTER_FLAG_TSYNC": 4,  # SCMP_FLTATR_CTL_TSYNC
    "SECCOMP_FILTER_FLAG_LOG": 6,  # SCMP_FLTATR_CTL_LOG
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 7,  # SCMP_FLTATR_CTL_SSB
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": 10,  # SCMP_FLTATR_CTL_WAITKILL, libseccomp 2.6
}
_ATTR_CTL_NNP, _ATTR_CTL_OPTIMIZE, _ATTR_API_SYSRAWRC = 3, 8, 9
_NR_SCMP_ERROR = -1
_EPERM = 1
_UINT64_MAX = (1 << 64) - 1

MACHINE = os.uname().machine


@dataclass(frozen=True)
class Condition:
    index: int
    op: int
    value: int  # the mask for SCMP_CMP_MASKED_EQ
    value_two: int


@dataclass(frozen=True)
class Rule:
    field: str  # where it came from, e.g. linux.seccomp.syscalls[3], for errors at load time
    names: tuple[str, ...]
    action: int
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Filter:
    field: str
    default_action: int
    architectures: tuple[str, ...]
    flags: tuple[str, ...]
    rules: tuple[Rule, ...]
    listener_path: str | None
    listener_metadata: str | None

    @property
    def notifies(self) -> bool:
        return any(rule.action == ACTIONS["SCMP_ACT_NOTIFY"] for rule in self.rules)


def _uint(value: Any, field: str, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise SpecError(field, f"must be an integer from 0 to {maximum}")
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise SpecError(field, "must be a non-empty string")
    return value


def _array(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(field, "must be an array")
    return value


def _choice(value: Any, field: str, choices: Mapping[str, Any], what: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise SpecError(field, f"{value!r} is not a known {what}" if value is not None else "is required")
    return value


def _action(name: str, errno_ret: Any, field: str) -> int:
    if errno_ret is None:
        return ACTIONS[name] | (_EPERM if name in _TAKES_ERRNO else 0)
    if name not in _TAKES_ERRNO:
        raise SpecError(field, f"is not allowed with {name}, which returns no errno")
    return ACTIONS[name] | _uint(errno_ret, field, 0xFFFF)


def _condition(arg: Any, field: str) -> Condition:
    if not isinstance(arg, Mapping):
        raise SpecError(field, "must be an object")
    value_two = arg.get("valueTwo")
    return Condition(
        index=_uint(arg.get("index"), f"{field}.index", 5),  # a syscall has six arguments
        op=OPERATORS[_choice(arg.get("op"), f"{field}.op", OPERATORS, "operator")],
        value=_uint(arg.get("value"), f"{field}.value", _UINT64_MAX),
        value_two=0 if value_two is None else _uint(value_two, f"{field}.valueTwo", _UINT64_MAX),
    )


def _rule(entry: Any, field: str) -> Rule:
    if not isinstance(entry, Mapping):
        raise SpecError(field, "must be an object")
    # runc accepts a rule without names (it matches nothing); the names it has must be real strings.
    names = [_string(name, f"{field}.names[{i}]")
             for i, name in enumerate(_array(entry.get("names"), f"{field}.names"))]
    action_name = _choice(entry.get("action"), f"{field}.action", ACTIONS, "action")
    if action_name == "SCMP_ACT_NOTIFY" and "write" in names:
        # As in runc: the init reports the notify fd after loading the filter, so write must not block on it.
        raise SpecError(f"{field}.names[{names.index('write')}]", "SCMP_ACT_NOTIFY cannot be used for write")
    action = _action(action_name, entry.get("errnoRet"), f"{field}.errnoRet")
    args = _array(entry.get("args"), f"{field}.args")
    conditions = tuple(_condition(arg, f"{field}.args[{i}]") for i, arg in enumerate(args))
    return Rule(field, tuple(names), action, conditions)


def parse(seccomp: Mapping[str, Any] | None, field: str = "linux.seccomp") -> Filter | None:
    """The filter ``seccomp`` describes, every field checked; None when it asks for no filter.

    As in runc, an object with neither ``defaultAction`` nor ``syscalls`` means no seccomp at all.
    """
    if seccomp is None:
        return None
    if not isinstance(seccomp, Mapping):
        raise SpecError(field, "must be an object")
    architectures = tuple(_choice(arch, f"{field}.architectures[{i}]", ARCHITECTURES, "architecture")
                          for i, arch in enumerate(_array(seccomp.get("architectures"), f"{field}.architectures")))
    flags = tuple(_choice(flag, f"{field}.flags[{i}]", FLAGS, "seccomp flag")
                  for i, flag in enumerate(_array(seccomp.get("flags"), f"{field}.flags")))
    listener_path = seccomp.get("listenerPath")
    if listener_path is not None:
        _string(listener_path, f"{field}.listenerPath")
    metadata = seccomp.get("listenerMetadata")
    if metadata is not None and (not isinstance(metadata, str) or listener_path is None):
        raise SpecError(f"{field}.listenerMetadata", "must be a string, and set only with listenerPath")
    syscalls = _array(seccomp.get("syscalls"), f"{field}.syscalls")
    rules = tuple(_rule(entry, f"{field}.syscalls[{i}]") for i, entry in enumerate(syscalls))
    default = seccomp.get("defaultAction")
    errno_ret = seccomp.get("defaultErrnoRet")
    if default in (None, "") and not rules and errno_ret is None:
        return None
    default_name = _choice(default, f"{field}.defaultAction", ACTIONS, "action")
    if default_name == "SCMP_ACT_NOTIFY":
        raise SpecError(f"{field}.defaultAction", "SCMP_ACT_NOTIFY cannot be the default action")
    result = Filter(field, _action(default_name, errno_ret, f"{field}.defaultErrnoRet"), architectures, flags,
                    rules, listener_path, metadata)
    if result.notifies and listener_path is None:
        raise SpecError(f"{field}.listenerPath", "is required when a rule uses SCMP_ACT_NOTIFY")
    return result


def validate(seccomp: Mapping[str, Any] | None, field: str = "linux.seccomp") -> None:
    parse(seccomp, field)


class _ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class _Version(ctypes.Structure):  # struct scmp_version
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


_lib: ctypes.CDLL | None = None
_ROOT_AT_IMPORT = os.stat("/")[1:3]  # (st_ino, st_dev): see _libseccomp()


def _open_libseccomp() -> ctypes.CDLL:
    # The loader's own search first: it finds a guest image's bare .so.2 without running ldconfig.
    for candidate in ("libseccomp.so.2", f"/usr/lib/{MACHINE}-linux-gnu/libseccomp.so.2", ""):
        if not candidate:
            from ctypes.util import find_library  # it may run ldconfig or gcc: the last resort

            candidate = find_library("seccomp") or "libseccomp.so"
        with contextlib.suppress(OSError):
            return ctypes.CDLL(candidate)
    raise SeccompError("seccomp: libseccomp.so.2 not found (Debian: apt-get install libseccomp2)")


def _libseccomp() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        if os.stat("/")[1:3] != _ROOT_AT_IMPORT:
            # Past pivot_root or chroot, the library (or the ldconfig that looks for it) would come from the
            # container's rootfs, and run with the init's privileges.
            raise SeccompError("seccomp: libseccomp must be opened before entering the container's root"
                               " (call seccomp.preload() first)")
        lib = _open_libseccomp()
        ctx, u32 = ctypes.c_void_p, ctypes.c_uint32
        for name, restype, argtypes in (
            ("seccomp_init", ctx, [u32]),
            ("seccomp_release", None, [ctx]),
            ("seccomp_attr_set", ctypes.c_int, [ctx, ctypes.c_int, u32]),
            ("seccomp_arch_resolve_name", u32, [ctypes.c_char_p]),
            ("seccomp_arch_add", ctypes.c_int, [ctx, u32]),
            ("seccomp_syscall_resolve_name", ctypes.c_int, [ctypes.c_char_p]),
            ("seccomp_rule_add_array", ctypes.c_int, [ctx, u32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]),
            ("seccomp_load", ctypes.c_int, [ctx]),
            ("seccomp_notify_fd", ctypes.c_int, [ctx]),
            ("seccomp_export_bpf", ctypes.c_int, [ctx, ctypes.c_int]),
            ("seccomp_version", ctypes.POINTER(_Version), []),
        ):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        _lib = lib
    return _lib


def preload() -> None:
    """Open libseccomp now: the container's init calls it before pivot_root, if the config has a filter."""
    _libseccomp()


def version() -> tuple[int, int, int]:
    """libseccomp's version, e.g. (2, 5, 4)."""
    found = _libseccomp().seccomp_version().contents
    return found.major, found.minor, found.micro


def syscall_number(name: str) -> int | None:
    """``name``'s number on this architecture, or None if it has no such syscall."""
    number: int = _libseccomp().seccomp_syscall_resolve_name(name.encode())
    return number if number >= 0 else None


def unknown_syscalls(seccomp: Mapping[str, Any] | None) -> list[str]:
    """The names load() skips because libseccomp does not know them (runc logs them at debug level)."""
    parsed = parse(seccomp)
    if parsed is None:
        return []
    lib = _libseccomp()
    names = dict.fromkeys(name for rule in parsed.rules for name in rule.names)
    return [name for name in names if lib.seccomp_syscall_resolve_name(name.encode()) == _NR_SCMP_ERROR]


def _condition_groups(conditions: Sequence[Condition]) -> list[Sequence[Condition]]:
    if len({c.index for c in conditions}) == len(conditions):
        return [conditions]  # one rule whose conditions all must hold
    return [(c,) for c in conditions]  # libseccomp refuses two checks of one argument in a rule: runc ORs them


def _build(lib: ctypes.CDLL, ctx: int, flt: Filter) -> None:
    libseccomp = ".".join(map(str, version()))
    if lib.seccomp_attr_set(ctx, _ATTR_CTL_NNP, 0) < 0:
        raise SeccompError("seccomp: cannot leave no_new_privs to process.noNewPrivileges")
    lib.seccomp_attr_set(ctx, _ATTR_API_SYSRAWRC, 1)  # the kernel's own errno from seccomp_load; best effort
    for i, arch in enumerate(flt.architectures):
        token = lib.seccomp_arch_resolve_name(ARCHITECTURES[arch].encode())
        result = lib.seccomp_arch_add(ctx, token) if token else -errno.EINVAL
        if result not in (0, -errno.EEXIST):  # EEXIST: the native architecture, there from seccomp_init
            raise SeccompError(f"{flt.field}.architectures[{i}]: {arch} is not supported by libseccomp {libseccomp}")
    for i, flag in enumerate(flt.flags):
        if lib.seccomp_attr_set(ctx, FLAGS[flag], 1) < 0:
            raise SeccompError(f"{flt.field}.flags[{i}]: {flag} is not supported by libseccomp {libseccomp}"
                               " or this kernel")
    if sum(len(rule.names) for rule in flt.rules) > 32:
        # A binary tree of syscalls, as runc asks for; libseccomp <= 2.5.4 mishandles it on tiny filters.
        lib.seccomp_attr_set(ctx, _ATTR_CTL_OPTIMIZE, 2)
    for rule in flt.rules:
        if rule.action == flt.default_action:
            continue
        for name in rule.names:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number == _NR_SCMP_ERROR:
                continue
            for group in _condition_groups(rule.conditions):
                array = (_ArgCmp * len(group))(*(_ArgCmp(c.index, c.op, c.value, c.value_two) for c in group))
                result = lib.seccomp_rule_add_array(ctx, rule.action, number, len(group), array)
                if result < 0:
                    raise SeccompError(f"{rule.field}: adding the rule for {name}: {os.strerror(-result)}")


# Kernel flags for seccomp(2), for filters loaded from libseccomp's compiled program.
_KERNEL_FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": 1, "SECCOMP_FILTER_FLAG_LOG": 2, "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4}
_compiled: dict[Filter, bytes] = {}


def compile_filter(flt: Filter) -> bytes:
    """libseccomp's BPF program for ``flt`` (seccomp_export_bpf), kept: building docker's profile rule by rule
    costs 40 ms natively and far more under emulation, and the same profile serves every container."""
    found = _compiled.get(flt)
    if found is not None:
        return found
    lib = _libseccomp()
    ctx = lib.seccomp_init(flt.default_action)
    if not ctx:
        raise SeccompError(f"{flt.field}.defaultAction: libseccomp cannot make a filter with this default action")
    out = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    try:
        _build(lib, ctx, flt)
        result = lib.seccomp_export_bpf(ctx, out)
        if result < 0:
            raise SeccompError(f"seccomp: compiling the filter: {os.strerror(-result)}")
        program = os.pread(out, os.fstat(out).st_size, 0)
    finally:
        os.close(out)
        lib.seccomp_release(ctx)
    _compiled[flt] = program
    return program


def precompile(seccomp: Mapping[str, Any] | None) -> None:
    """Compile now (at the agent's boot) what containers will load later."""
    flt = parse(seccomp)
    if flt is not None and not flt.notifies and all(flag in _KERNEL_FLAGS for flag in flt.flags):
        compile_filter(flt)


def load(seccomp: Mapping[str, Any] | Filter | None) -> int | None:
    """Build the filter and load it into the calling process (all its threads with TSYNC); preload() first.

    Returns the notify fd (close-on-exec) when a rule uses SCMP_ACT_NOTIFY, else None; None too when
    ``seccomp`` asks for no filter. Call it in the container's init right before exec, with no_new_privs set
    or CAP_SYS_ADMIN held. SpecError for a bad field, SeccompError for what libseccomp or the kernel refuse.
    """
    flt = seccomp if isinstance(seccomp, Filter) else parse(seccomp)
    if flt is None:
        return None
    if not flt.notifies and all(flag in _KERNEL_FLAGS for flag in flt.flags):
        flags = 0
        for flag in flt.flags:
            flags |= _KERNEL_FLAGS[flag]
        try:
            syscalls.seccomp_set_filter(compile_filter(flt), flags)
        except OSError as exc:
            hint = " (set process.noNewPrivileges, or keep CAP_SYS_ADMIN)" if exc.errno == errno.EACCES else ""
            raise SeccompError(f"seccomp: loading the filter: {os.strerror(exc.errno or 0)}{hint}") from None
        return None
    lib = _libseccomp()
    ctx = lib.seccomp_init(flt.default_action)
    if not ctx:
        raise SeccompError(f"{flt.field}.defaultAction: libseccomp cannot make a filter with this default action")
    try:
        _build(lib, ctx, flt)
        result = lib.seccomp_load(ctx)
        if result < 0:
            hint = " (set process.noNewPrivileges, or keep CAP_SYS_ADMIN)" if result == -errno.EACCES else ""
            raise SeccompError(f"seccomp: loading the filter: {os.strerror(-result)}{hint}")
        if not flt.notifies:
            return None
        fd: int = lib.seccomp_notify_fd(ctx)
        if fd < 0:
            raise SeccompError(f"seccomp: no notify fd: {os.strerror(-fd)}")
        return fd
    finally:
        lib.seccomp_release(ctx)
