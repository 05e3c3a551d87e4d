"""A monitor's VM: the host network it is attached to, and one boot's VMM with its agent channel.

Launching gets a live agent: a fresh boot's hello, or a restored snapshot's answer to ``restore``, with a cold
boot when the snapshot does not restore.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from micropod import guestmsg, wire
from micropod.channel import AgentLink, Frame, FramedSocket
from micropod.errors import (
    AgentError,
    BootError,
    ChannelFull,
    ContainerCommandError,
    MicropodError,
    TimeoutExpired,
    printable,
)
from micropod.liveness import ProcessRef
from micropod.metadata.vm import VmMetadata
from micropod.monitor.hostcgroup import VmmCgroup
from micropod.net import lifecycle
from micropod.paths import StateRoot, VmDir
from micropod.quotas import Quotas
from micropod.runconfig import NetworkSettings, RunConfig
from micropod.vmm import snapshot, vmm_ids
from micropod.vmm.base import Vmm, VmSpec
from micropod.vmm.child import log_tail
from micropod.vmm.factory import ROOTFS_DRIVE, UPPER_DRIVE, build_spec, create_vmm, volume_drive
from micropod.vmm.rootsnap import FreshRoot
from micropod.vmm.vmm_ids import VmmId
from micropod.wire import GuestOp

log = logging.getLogger("micropod.monitor")  # one logger for all of the monitor: its log names no module

MAIN = "main"  # the container's id in the agent
MAIN_SID = 1  # the stream id of its main process
EXIT_KILLED = 128 + int(signal.SIGKILL)  # a VM, or a process, ended by SIGKILL, as docker reports it
SHUTDOWN_GRACE = 10.0
# Past this many unsent bytes to the agent, the monitor stops reading stdin for it and refuses requests; the
# channel's own bound (channel.OUT_LIMIT) leaves room for the stdin chunks already read when that happens.
AGENT_HIGH_WATER = 1 << 20
MAX_PENDING = 1024  # requests waiting for the agent's answer

OnReply = Callable[[guestmsg.Reply], None]


_VMM_IDS: dict[str, VmmId] = {}  # the VM's uid, held by this monitor for all of the VM's boots


def confine(spec: VmSpec, backend: str) -> VmSpec:
    """A confined VMM runs as a uid of its own (QEMU in its jail, Firecracker under its jailer); a host
    directory shared over virtio-9p is bound into QEMU's jail (micropod/vmm/qemu_confined.py)."""
    if not spec.confined or spec.vmm_uid is not None or backend not in ("qemu", "firecracker"):
        return spec
    held = _VMM_IDS.get(spec.vm_id)
    if held is None:
        held = _VMM_IDS[spec.vm_id] = vmm_ids.allocate(spec.vm_id)
        log.debug("phase: VMM uid %d", held.uid)
    return replace(spec, vmm_uid=held.uid)


def send_rate(cfg: Machine) -> int:
    """What the guest may send, as the host's rules hold it: on QEMU only (Firecracker limits it itself)."""
    return cfg.quotas.network_rate if cfg.backend == "qemu" else 0


@dataclass
class NetworkAttachment:
    """The VM's TAP on the host bridge: attached for the first boot, kept by restarts, detached at the end."""

    root: StateRoot
    cfg: Machine
    attached: bool = False
    metadata: VmMetadata | None = None  # a container's VM's metadata service (pods have none yet)

    def attach(self) -> None:
        if self.attached:
            return
        network = self.cfg.network
        if network.mode == "cni":  # the CRI server made the TAP in the pod's namespace, where this monitor runs
            self.attached = True
            return
        port = 0
        if isinstance(self.cfg, RunConfig):
            self.metadata = VmMetadata(self.root, self.cfg.metadata_identity(), self.cfg.user_data)
            if self.cfg.backend == "qemu":  # Firecracker serves MMDS itself
                port = self.metadata.open_listener(str(lifecycle.network_of(network).gateway))
        try:
            lifecycle.attach(self.root, self.cfg.vm_id, network, send_rate(self.cfg), port)
            if port and self.metadata is not None:
                self.metadata.serve(network.bridge)
        except BaseException:
            self._close_metadata()
            raise
        self.attached = True
        log.debug("phase: network attached (%s on %s)", network.tap, network.bridge)

    def mmds(self) -> dict[str, Any] | None:
        """The tree a Firecracker VM's MMDS starts with."""
        if self.metadata is None or self.cfg.backend != "firecracker":
            return None
        return self.metadata.tree()

    def _close_metadata(self) -> None:
        if self.metadata is not None:
            self.metadata.close()
            self.metadata = None

    def detach(self) -> str | None:
        """Tear it down; a failure comes back as the error to record, since the exit must still be recorded."""
        if not self.attached:
            return None
        if self.cfg.network.mode == "cni":  # the CRI server tears the pod's network down (CNI DEL)
            self.attached = False
            return None
        error = None
        try:
            # the rules go before the server's port is let go: no one else may take it while they point at it
            lifecycle.detach(self.root, self.cfg.vm_id)
        except MicropodError as exc:
            # reconciliation retries it
            log.error("tearing down the VM's network failed: %s", exc)
            error = f"tearing down the VM's network failed: {exc}"
        self._close_metadata()
        self.attached = False
        return error


class Machine(Protocol):
    """What booting a VM needs of its config: a container's RunConfig, or a pod's PodConfig."""

    @property
    def vm_id(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def boot_timeout(self) -> float: ...
    @property
    def vcpus(self) -> int: ...
    @property
    def memory_mib(self) -> int: ...
    @property
    def cpu_limit(self) -> float: ...
    @property
    def network(self) -> NetworkSettings: ...
    @property
    def quotas(self) -> Quotas: ...


class VmProcess:
    """One boot's VMM child and agent channel. A launch that fails leaves them here, for end() to clean up."""

    def __init__(self, cfg: Machine, vm_dir: VmDir, record_vmm: Callable[[ProcessRef], None],
                 on_frame: Callable[[Frame], None]) -> None:
        self.cfg = cfg
        self.vm_dir = vm_dir
        self.record_vmm = record_vmm  # the VMM's process, for the state store
        self.on_frame = on_frame  # agent frames that are not the reply a request waits for
        self.vmm: Vmm | None = None
        self.pidfd: int | None = None
        self.link: AgentLink | None = None
        self.pending: dict[int, OnReply | None] = {}
        self.host_cgroup: VmmCgroup | None = None

    def power_on(self, network: NetworkAttachment, spec_for: Callable[[bool], VmSpec], with_network: bool,
                 warm: bool = True, fresh: FreshRoot | None = None) -> tuple[VmSpec, float]:
        """The VMM in its host cgroup, the TAP attached (``with_network``), a live agent, the guest's address
        set; the VM's spec and the boot's deadline."""
        if self.host_cgroup is None:
            self.host_cgroup = VmmCgroup(self.cfg.vm_id, self.cfg.cpu_limit or self.cfg.vcpus, self.cfg.memory_mib,
                                         self.cfg.quotas)
            self.host_cgroup.create()
        if self.cfg.network.has_nic and with_network:
            network.attach()
        spec = confine(spec_for(network.attached), self.cfg.backend)
        mmds = network.mmds()
        if mmds is not None:
            spec = replace(spec, mmds=mmds)
        deadline = time.monotonic() + self.cfg.boot_timeout
        self.launch(spec, deadline, warm, fresh)
        patch_mmds = getattr(self.vmm, "patch_mmds", None)
        if mmds is not None and network.metadata is not None and callable(patch_mmds):
            network.metadata.renew_into(patch_mmds)
        if network.attached:
            self.request(GuestOp.NETWORK, deadline, **lifecycle.agent_request(self.cfg.network))
        return spec, deadline

    def launch(self, spec: VmSpec, deadline: float, warm: bool = True, fresh: FreshRoot | None = None) -> None:
        """Restore the boot snapshot if there is one, else boot cold; either way the agent answers after."""
        try:
            self._start(spec, deadline, warm=warm, fresh=fresh)
        except BootError as exc:
            vmm = self.vmm
            if vmm is None or not vmm.warm:
                raise
            # A snapshot that does not restore is useless to every later run too: drop it, boot cold.
            log.warning("restoring the boot snapshot failed, booting cold: %s", exc)
            vmm.kill()
            snapshot.invalidate(getattr(vmm, "snapshot", None))
            self._start(spec, time.monotonic() + self.cfg.boot_timeout, warm=False, fresh=fresh)

    def _start(self, spec: VmSpec, deadline: float, warm: bool, fresh: FreshRoot | None = None) -> None:
        """Start the VMM and get a live agent channel: a fresh boot's hello, or a restored VM's reply."""
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.vmm = create_vmm(self.cfg.backend, spec, warm=warm, fresh=fresh)
        self.vmm.start()
        log.debug("phase: VMM started (%s)", "from snapshot" if self.vmm.warm else "cold boot")
        pid = self.vmm.pid
        if pid is not None:
            if self.host_cgroup is not None:
                self.host_cgroup.add(pid)
            ref = ProcessRef.of(pid)
            if ref:
                self.record_vmm(ref)
            self.pidfd = os.pidfd_open(pid)
        self.vmm.apply_limits()
        channel = FramedSocket(self.vmm.connect_agent(self.cfg.boot_timeout))
        self.link = AgentLink(channel, self.on_frame)
        if not self.vmm.warm:
            self._await_hello(channel, deadline)
            log.debug("phase: agent hello")
            return
        try:
            reply = self.link.request(GuestOp.RESTORE, deadline, self.pidfd, entropy=os.urandom(64).hex(),
                                      time=time.time())
        except (AgentError, TimeoutExpired) as exc:
            raise BootError(f"the restored VM's agent did not answer ({exc}); console tail:\n"
                            f"{console_tail(self.vm_dir, self.vmm)}") from None
        if not reply.ok:
            raise BootError(f"the restored VM's agent refused restore: {reply.message}")
        log.debug("phase: agent restored")

    def _await_hello(self, channel: FramedSocket, deadline: float) -> None:
        try:
            while True:
                frame = channel.next_frame(deadline, also_watch=self.pidfd)
                if frame is None:
                    raise BootError(f"the VM exited during boot:\n{console_tail(self.vm_dir, self.vmm)}")
                if frame[0] == wire.CONTROL:
                    try:
                        message = guestmsg.parse(frame[2])
                    except guestmsg.BadGuestMessage as exc:
                        guestmsg.refuse(str(exc))
                        continue
                    if isinstance(message, guestmsg.Hello):
                        log.debug("agent hello at guest uptime %.3fs", message.uptime or -1)
                        return
        except TimeoutExpired:
            raise BootError(f"the guest agent did not come up within {self.cfg.boot_timeout:.0f}s; "
                            f"console tail:\n{console_tail(self.vm_dir, self.vmm)}") from None
        except AgentError:
            # The channel closes when the guest dies early; let the VMM finish so the tail is whole.
            if self.vmm is not None:
                self.vmm.wait(2.0)
            raise BootError(f"the guest failed to boot; console tail:\n{console_tail(self.vm_dir, self.vmm)}") from None

    def request(self, op: str, deadline: float, **fields: Any) -> None:
        """A request during start-up: a refusal fails the start with the agent's message and exit code."""
        assert self.link is not None
        reply = self.link.request(op, deadline, self.pidfd, **fields)
        if reply.ok:
            return
        raise ContainerCommandError(reply.message or f"{op} failed", reply.code or 125)

    def read_frames(self) -> list[Frame]:
        """What the agent has sent; none once its channel broke (a bad frame header closes it: that happens
        once per boot, so it is logged, never rate-limited like refusals)."""
        assert self.link is not None
        try:
            return self.link.channel.pump()
        except AgentError as exc:
            log.warning("the agent channel broke: %s", printable(str(exc)))
            return []

    @property
    def congested(self) -> bool:
        """The agent has not read what was sent to it: no more stdin or requests until it does."""
        return self.link is not None and self.link.channel.backlog >= AGENT_HIGH_WATER

    def send(self, op: str, **fields: Any) -> None:
        """A request whose answer nobody waits for; ChannelFull if the agent is not reading, AgentError if the
        channel is gone."""
        assert self.link is not None
        if self.congested:
            raise ChannelFull(f"the agent is not reading its channel; {op!r} not sent")
        req = self.link.send(op, **fields)
        if len(self.pending) < MAX_PENDING:
            self.pending[req] = None  # its answer is expected, and goes nowhere

    def send_stdin(self, sid: int, kind: int, payload: bytes) -> None:
        """Input (or its end, for an EOF frame) for process ``sid``; AgentError if the channel is gone."""
        assert self.link is not None
        stream = wire.stream_id(sid, wire.STDIN)
        if kind == wire.EOF:
            self.link.channel.send_eof(stream)
        else:
            self.link.channel.send_data(stream, payload)

    def call(self, op: str, reply: OnReply | None = None, **fields: Any) -> None:
        """A request to the agent whose answer, if wanted, comes back through ``reply`` in the loop."""
        if self.link is None or self.link.channel.closed:
            failure = "the VM is not running"
        elif self.congested:
            failure = "the agent is not reading its channel"
        elif len(self.pending) >= MAX_PENDING:
            failure = "too many requests wait for the agent's answer"
        else:
            try:
                self.pending[self.link.send(op, **fields)] = reply
                return
            except AgentError:
                failure = "the agent channel is gone"
        if reply is not None:
            reply(guestmsg.Reply.failure(failure))

    def deliver_reply(self, reply: guestmsg.Reply) -> None:
        """Hand an agent's ok or error to the call that waits for it."""
        if reply.req not in self.pending:
            guestmsg.refuse(f"a reply to request {reply.req}, which nobody sent or which was answered")
            return
        callback = self.pending.pop(reply.req)
        if callback is not None:
            callback(reply)

    def kill(self) -> None:
        if self.vmm is not None:
            self.vmm.kill()

    def end(self) -> None:
        """Power the VM off (the agent first, the VMM killed after a grace period); close its channel and pidfd."""
        if self.vmm is not None and self.vmm.wait(0) is None:
            if self.link is not None and not self.link.channel.closed:
                with contextlib.suppress(MicropodError):
                    self.link.send(GuestOp.SHUTDOWN)
                    self.link.channel.flush()  # a guest that reads nothing gets killed below, after the grace
            if self.vmm.wait(SHUTDOWN_GRACE) is None:
                self.vmm.kill()
        if self.link is not None:
            self.link.channel.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def boot_container(vm: VmProcess, cfg: RunConfig, network: NetworkAttachment, maintenance: bool) -> None:
    """Boot a container's own VM and create the container; start its main process, unless only its disks are
    wanted."""
    from micropod.rootfs.upper import create_upper

    vm_dir = vm.vm_dir
    fresh = None
    if not vm_dir.upper.exists():
        # a first boot whose mounts are only the root's may resume with them made (micropod/vmm/rootsnap.py)
        if maintenance or cfg.backend != "qemu" or cfg.container.volumes or cfg.container.binds:
            create_upper(vm_dir.upper, cfg.upper_size)
        else:
            fresh = FreshRoot(MAIN, vm_dir.upper, cfg.upper_size, create_upper)
    log.debug("phase: upper disk %s", "to come" if fresh else "ready")
    spec, deadline = vm.power_on(network, lambda attached: build_spec(cfg, vm_dir, with_network=attached),
                                 with_network=not maintenance, fresh=fresh)
    rootfs = {"lower": spec.guest_disk(ROOTFS_DRIVE), "upper": spec.guest_disk(UPPER_DRIVE)}
    volumes = tuple(spec.guest_disk(volume_drive(i)) for i in range(len(cfg.container.volumes)))
    vm.request(GuestOp.CREATE, deadline, id=MAIN, spec=cfg.container.to_agent(rootfs, volumes))
    if maintenance:
        log.debug("phase: container mounted for maintenance")
        return
    log.debug("phase: container created")
    vm.request(GuestOp.START, deadline, id=MAIN, sid=MAIN_SID)
    log.debug("phase: container started")


def remove_vm_sockets(vm_dir: VmDir) -> None:
    """The sockets a boot's VMM and agent leave behind; the next boot, or nobody, binds them again."""
    for path in (vm_dir.agent_sock, vm_dir.qmp_sock, vm_dir.api_sock, vm_dir.vsock):
        path.unlink(missing_ok=True)


def console_tail(vm_dir: VmDir, vmm: Vmm | None = None) -> str:
    if vmm is not None:
        vmm.settle_logs()
    return log_tail(vm_dir.console_log) or "(no output)"
