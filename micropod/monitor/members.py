"""A pod's containers as its monitor runs them in the one VM: each added with its disks lent from the drive pool,
created and started in the agent under its own id and stream, its output in its own log, its exit recorded in
its own row, its restart policy applied, and its disks given back when it is removed."""

from __future__ import annotations

import logging
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from micropod.containerlog import ContainerLog
from micropod.errors import ConflictError, ContainerCommandError, MicropodError, NotFoundError
from micropod.liveness import ProcessRef
from micropod.monitor.pool import DrivePool
from micropod.monitor.volumes import PodVolumes
from micropod.paths import StateRoot, VmDir
from micropod.runconfig import RunConfig, restart_backoff
from micropod.state import StateStore
from micropod.vmm.base import VmSpec
from micropod.wire import GuestOp

log = logging.getLogger("micropod.monitor")

BACKOFF_RESET = 10.0


@dataclass
class Member:
    cid: str
    cfg: RunConfig
    vm_dir: VmDir
    log: ContainerLog
    sid: int = 0  # its main process's stream in the agent, while it runs
    running: bool = False
    in_agent: bool = False  # created (mounted) in the agent
    user_stopped: bool = False
    stop_deadline: float | None = None
    escalated: bool = False
    restarts: int = 0
    backoff_step: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    waiters: set[int] = field(default_factory=set)


class PodVm(Protocol):
    """What the members need of the pod's VM."""

    def request(self, op: str, deadline: float, **fields: Any) -> None:
        """A request the agent must answer before the deadline; ContainerCommandError if it refuses."""

    def send(self, op: str, **fields: Any) -> None: ...

    def next_sid(self) -> int: ...

    def refs(self) -> tuple[ProcessRef | None, ProcessRef | None]:
        """The monitor's and the VMM's processes, for the containers' rows."""

    def exited(self, member: Member, code: int, error: str | None) -> None:
        """Tell the clients that wait for ``member`` that it ended."""


class Members:
    def __init__(self, root: StateRoot, pod_id: str, store: StateStore, vm: PodVm) -> None:
        self.root, self.pod_id, self.store, self.vm = root, pod_id, store, vm
        self.by_id: dict[str, Member] = {}
        self.by_sid: dict[int, Member] = {}
        self.volumes = PodVolumes(root, pod_id)
        self.pool: DrivePool | None = None
        self.spec: VmSpec | None = None

    def booted(self, spec: VmSpec, pool: DrivePool) -> None:
        self.spec, self.pool = spec, pool

    def running(self) -> list[Member]:
        return [m for m in self.by_id.values() if m.running]

    # -- adding and removing ---------------------------------------------------------------------

    def add(self, cid: str) -> Member:
        """A container of this pod onto the running VM: disks, create, start. On failure nothing of it stays
        on the VM and its row says why."""
        record = self.store.get(cid)
        if record is None or record.pod != self.pod_id:
            raise NotFoundError(f"no container {cid[:12]} in this pod")
        member = self.by_id.get(cid)
        if member is not None and (member.running or member.restart_at is not None):
            raise ConflictError(f"container {record.name} is already running")
        if member is None:
            vm_dir = self.root.vm(cid)
            cfg = RunConfig.load(vm_dir.config)
            member = Member(cid, cfg, vm_dir, ContainerLog(vm_dir.container_log, cfg.log.max_size, cfg.log.max_files))
            self.by_id[cid] = member
        member.user_stopped = False
        try:
            if not member.in_agent:
                self._create(member)
            self._start(member)
        except BaseException as exc:
            self.remove(member.cid, quiet=True)
            if isinstance(exc, MicropodError):
                self.store.update(cid, status="exited", exit_code=getattr(exc, "exit_code", 125), error=str(exc),
                                  finished=time.time())
            raise
        return member

    def _create(self, member: Member) -> None:
        from micropod.rootfs.upper import create_upper

        assert self.pool is not None and self.spec is not None
        cfg = member.cfg
        if not member.vm_dir.upper.exists():
            create_upper(member.vm_dir.upper, cfg.upper_size)
        self.volumes.claim(member.cid, cfg.container.volumes)
        paths = [(Path(cfg.rootfs), False), (member.vm_dir.upper, True),
                 *((Path(v.path), not v.read_only) for v in cfg.container.volumes)]
        disks = {self.pool.attach(member.cid, path, writable): path.stat().st_size for path, writable in paths}
        deadline = time.monotonic() + cfg.boot_timeout
        self.vm.request(GuestOp.CREATE, deadline, id=member.cid, spec=self._agent_spec(member), disks=disks)
        member.in_agent = True
        log.debug("phase: container %s mounted", member.cid[:12])

    def _start(self, member: Member) -> None:
        sid = self.vm.next_sid()
        self.vm.request(GuestOp.START, time.monotonic() + member.cfg.boot_timeout, id=member.cid, sid=sid)
        member.sid, member.running, member.started_at = sid, True, time.monotonic()
        member.restart_at, member.stop_deadline, member.escalated = None, None, False
        self.by_sid[sid] = member
        monitor, vmm = self.vm.refs()
        self.store.update(member.cid, status="running", started=time.time(), exit_code=None, error=None,
                          finished=None, monitor_pid=monitor and monitor.pid, monitor_start=monitor and monitor.started,
                          vmm_pid=vmm and vmm.pid, vmm_start=vmm and vmm.started)
        log.info("container %s started", member.cid[:12])

    def remove(self, cid: str, quiet: bool = False) -> None:
        """An ended container off the VM: unmounted in the guest, its drives back in the pool."""
        member = self.by_id.get(cid)
        if member is None:
            return
        if member.running and not quiet:
            raise ConflictError(f"container {member.cfg.name} is running; stop it first")
        if member.in_agent:
            try:
                self.vm.request(GuestOp.REMOVE, time.monotonic() + 10.0, id=cid)
            except MicropodError as exc:
                if not quiet:
                    raise
                log.warning("removing container %s from the guest: %s", cid[:12], exc)
            member.in_agent = False
        if self.pool is not None:
            try:
                self.pool.release(cid)
            except MicropodError as exc:
                if not quiet:
                    raise
                log.warning("taking the disks of container %s off the VM: %s", cid[:12], exc)
        self.volumes.release(cid)
        member.log.close()
        self.by_sid.pop(member.sid, None)
        del self.by_id[cid]

    # -- running ---------------------------------------------------------------------------------

    def on_exit(self, sid: int, code: int, pod_stopping: bool) -> bool:
        """Process ``sid`` ended; False if it is no container's main process."""
        member = self.by_sid.pop(sid, None)
        if member is None:
            return False
        member.running = False
        member.stop_deadline = None
        log.info("container %s exited with %d", member.cid[:12], code)
        policy = member.cfg.restart
        if not pod_stopping and policy.wants_restart(code, member.restarts, member.user_stopped):
            if time.monotonic() - member.started_at >= BACKOFF_RESET:
                member.backoff_step = 0
            member.restarts += 1
            member.restart_at = time.monotonic() + restart_backoff(member.backoff_step)
            member.backoff_step += 1
            self.store.update(member.cid, status="restarting", exit_code=code, finished=time.time(),
                              restart_count=member.restarts)
            self.vm.exited(member, code, None)
            return True
        self.store.update(member.cid, status="exited", exit_code=code, finished=time.time())
        self.vm.exited(member, code, None)
        if member.cfg.auto_remove:
            self._forget(member)
        return True

    def _forget(self, member: Member) -> None:
        """--rm: the ended container and everything it kept on the host go, as its own monitor would do."""
        self.remove(member.cid, quiet=True)
        self.volumes.forget(member.cid)
        shutil.rmtree(member.vm_dir.path, ignore_errors=True)
        self.store.delete(member.cid)

    def ended_with_vm(self, code: int, error: str | None) -> None:
        """The VM is gone: whatever ran in it ended."""
        for member in list(self.by_id.values()):
            if member.running or member.restart_at is not None:
                member.running, member.restart_at = False, None
                self.store.update(member.cid, status="exited", exit_code=code, error=error, finished=time.time())
                self.vm.exited(member, code, error)
            member.log.close()
        self.by_id.clear()
        self.by_sid.clear()
        self.volumes.release_all()

    def signal(self, cid: str, signum: int) -> None:
        member = self._running(cid)
        self.vm.send(GuestOp.SIGNAL, id=cid, signal=signum)
        if signum == int(signal.SIGKILL):
            member.user_stopped = True

    def stop(self, cid: str, signum: int, timeout: float) -> None:
        member = self.by_id.get(cid)
        if member is not None and member.restart_at is not None:  # waiting out a backoff: it stays down
            member.restart_at = None
            self.store.update(cid, status="exited")
            self.vm.exited(member, self._last_code(cid), None)
            return
        member = self._running(cid)
        member.user_stopped = True
        member.stop_deadline = time.monotonic() + max(0.0, timeout)
        self.vm.send(GuestOp.SIGNAL, id=cid, signal=signum)

    def _last_code(self, cid: str) -> int:
        record = self.store.get(cid)
        return 0 if record is None or record.exit_code is None else record.exit_code

    def _running(self, cid: str) -> Member:
        member = self.by_id.get(cid)
        if member is None or not member.running:
            name = member.cfg.name if member else cid[:12]
            raise ContainerCommandError(f"container {name} is not running", 125)
        return member

    def next_deadline(self) -> float | None:
        times = [t for m in self.by_id.values() for t in (m.stop_deadline, m.restart_at) if t is not None]
        return min(times, default=None)

    def on_timers(self, now: float) -> None:
        for member in list(self.by_id.values()):
            if member.stop_deadline is not None and now >= member.stop_deadline:
                # docker's SIGKILL after the stop timeout; the agent reports the exit
                member.stop_deadline = None
                if member.running:
                    self.vm.send(GuestOp.SIGNAL, id=member.cid, signal=int(signal.SIGKILL))
            if member.restart_at is not None and now >= member.restart_at:
                self._restart(member)

    def _restart(self, member: Member) -> None:
        """Its restart policy's next run: a fresh process in a fresh container, on the disks it has."""
        member.restart_at = None
        log.info("restarting container %s (restart %d)", member.cid[:12], member.restarts)
        try:
            if member.in_agent:
                self.vm.request(GuestOp.REMOVE, time.monotonic() + 10.0, id=member.cid)
                member.in_agent = False
            deadline = time.monotonic() + member.cfg.boot_timeout
            self.vm.request(GuestOp.CREATE, deadline, id=member.cid, spec=self._agent_spec(member))
            member.in_agent = True
            self._start(member)
        except MicropodError as exc:
            self.store.update(member.cid, status="exited", exit_code=125, error=str(exc), finished=time.time())
            self.vm.exited(member, 125, str(exc))

    def _agent_spec(self, member: Member) -> dict[str, Any]:
        """The agent's spec, on the disks the container has in the pool."""
        assert self.pool is not None
        device = self.pool.address_of
        cfg = member.cfg
        rootfs = {"lower": device(cfg.rootfs), "upper": device(member.vm_dir.upper)}
        return cfg.container.to_agent(rootfs, tuple(device(v.path) for v in cfg.container.volumes))
