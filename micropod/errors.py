"""The one error tree of micropod.

Domain code raises these; only the CLI's top-level handler turns them into a one-line message and an
exit code. Foreign exceptions are translated at the boundary with ``raise X(...) from exc``.
Exit codes follow docker: 125 for micropod's own failures, 126 when the command cannot be invoked,
127 when it is not found.
"""

from __future__ import annotations

import re

# C0 controls but newline and tab, DEL, C1 controls: a guest's string must not drive the user's terminal.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with its control characters (ESC, CR, C1...) shown as ``\\xNN`` escapes, lines and tabs kept."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class MicropodError(Exception):
    """Base of every error micropod reports to a user."""

    exit_code = 125

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        # Messages often quote what a guest or a registry sent: what reaches a terminal is escaped here, once.
        return printable(self.message if not self.hint else f"{self.message} ({self.hint})")


class UsageError(MicropodError):
    """The user's input is malformed: a flag value, a reference, a port spec."""


class NotFoundError(MicropodError):
    """A named thing (image, container, blob) does not exist."""


class ConflictError(MicropodError):
    """The request collides with existing state: a duplicate name, an image in use."""


class InvalidReferenceError(UsageError):
    """An image reference that does not parse."""


class ImageError(MicropodError):
    """An image or layer is malformed, unsupported or fails verification."""


class DigestMismatchError(ImageError):
    """Content did not hash to the digest that names it."""


class RootfsError(MicropodError):
    """Building a root filesystem from an image failed."""


class StateError(MicropodError):
    """The state store is unusable or inconsistent."""


class CommandError(MicropodError):
    """An external program failed; the message carries the tail of its stderr."""


class GuestMissingError(MicropodError):
    """The guest kernel or system image has not been built."""


class NetworkError(MicropodError):
    """Setting up or tearing down VM networking (bridge, TAP, nftables) failed."""


class VmmError(MicropodError):
    """The VMM could not be found, configured or controlled."""


class VmmUnavailableError(VmmError):
    """No usable VMM on this host for the requested backend."""


class FirecrackerApiError(VmmError):
    """Firecracker answered an API request with a fault."""

    def __init__(self, method: str, path: str, status: int, fault: str) -> None:
        super().__init__(f"firecracker: {method} {path}: {status}: {fault}")
        self.status = status
        self.fault = fault


class BootError(VmmError):
    """The guest did not come up; the message carries the console tail."""


class AgentError(MicropodError):
    """The guest agent misbehaved or the channel to it broke."""


class ProtocolError(AgentError):
    """A frame on an agent or monitor channel was malformed."""


class ChannelFull(AgentError):
    """A channel's outbound queue is at its bound: the peer is not reading."""


class ContainerCommandError(MicropodError):
    """The container's command could not be started (not found: 127, not executable: 126)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TimeoutExpired(MicropodError):
    """A bounded wait ran out."""


class RegistryError(MicropodError):
    """A registry could not be reached or answered a request with an error."""


class AuthError(RegistryError):
    """A registry refused the credentials (401) or the access (403)."""


class OciRuntimeError(MicropodError):
    """micropod-runtime's errors: runc reports every failure with exit status 1 and one line."""

    exit_code = 1
    launch_code = 125  # what docker's `run` exits with when this stops the container from starting


class ProgramError(OciRuntimeError):
    """The container's program cannot be run: docker's 127 (not found) or 126 (not executable, bad cwd)."""

    def __init__(self, message: str, launch_code: int) -> None:
        super().__init__(message)
        self.launch_code = launch_code


class SpecError(OciRuntimeError):
    """A bad config.json: the message starts with the field's path, e.g. ``process.args: must not be empty``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field


class ContainerStateError(OciRuntimeError):
    """An unknown or duplicate id, or an operation the container's status does not allow."""


class CgroupError(OciRuntimeError):
    pass


class SeccompError(OciRuntimeError):
    pass
