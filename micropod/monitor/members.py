"""A pod's containers as its monitor runs them in the one VM: each added with its disks lent from the drive pool,
created and started in the agent under its own id and stream, its output in its own log, its exit recorded in
its own row, its restart policy applied, and its disks given back when it is removed."""

from __future__ import annotations

import logging
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from micropod.containerlog import ContainerLog
from micropod.errors import ConflictError, ContainerCommandError, MicropodError, NotFoundError, printable
from micropod.liveness import ProcessRef
from micropod.monitor.pool import DrivePool
from micropod.monitor.restart import BACKOFF_RESET
from micropod.monitor.volumes import PodVolumes
from micropod.paths import StateRoot, VmDir
from micropod.runconfig import RunConfig, restart_backoff
from micropod.state import StateStore
from micropod.vmm.base import VmSpec
from micropod.wire import GuestOp

log = logging.getLogger("micropod.monitor")



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
    restarts: int = 0
    backoff_step: int = 0
    started_at: float = 0.0
    restart_at: float | None = None


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
        self.doomed: list[tuple[str, int]] = []  # ended --rm containers and their codes, removed by the loop

    def booted(self, spec: VmSpec, pool: DrivePool) -> None:
        self.spec, self.pool = spec, pool

    def running(self) -> list[Member]:
        return [m for m in self.by_id.values() if m.running]

    # -- adding and removing ---------------------------------------------------------------------

    def mount(self, cid: str) -> Member:
        """A container of this pod that does not run, its disks mounted in the guest and nothing started (for
        `cp`); its next start makes it afresh."""
        member = self._member(cid)
        if not member.in_agent:
            try:
                disks = self._attach_disks(member)
                self.vm.request(GuestOp.CREATE, time.monotonic() + member.cfg.boot_timeout, id=cid,
                                spec=self._agent_spec(member), disks=disks)
            except BaseException:
                self.remove(cid, quiet=True)
                raise
            member.in_agent = True
        return member

    def _member(self, cid: str) -> Member:
        """The pod's container ``cid``, as the monitor tracks it (loaded on first use)."""
        record = self.store.get(cid)
        if record is None or record.pod != self.pod_id:
            raise NotFoundError(f"no container {cid[:12]} in this pod")
        member = self.by_id.get(cid)
        if member is None:
            vm_dir = self.root.vm(cid)
            cfg = RunConfig.load(vm_dir.config)
            member = Member(cid, cfg, vm_dir, ContainerLog(vm_dir.container_log, cfg.log.max_size, cfg.log.max_files,
                                                           cfg.log.cri_path))
            self.by_id[cid] = member
        return member

    def reload(self, cid: str) -> Member:
        """``cid`` after `micropod update` rewrote its config.json: its limits and restart policy as they are now."""
        member = self._member(cid)
        member.cfg = RunConfig.load(member.vm_dir.config)
        return member

    def add(self, cid: str) -> Member:
        """A container of this pod onto the running VM: disks, create, start; a stopped one is made afresh on the
        disks it has. On failure its row says why, and nothing of it stays on the VM."""
        member = self._member(cid)
        if member.running or member.restart_at is not None:
            raise ConflictError(f"container {member.cfg.name} is already running")
        member.user_stopped = False
        started = time.monotonic()
        try:
            self._run(member)
        except BaseException as exc:
            self.remove(member.cid, quiet=True)
            if isinstance(exc, MicropodError):
                self.store.update(cid, status="exited", exit_code=getattr(exc, "exit_code", 125),
                                  error=printable(str(exc)), finished=time.time())
            raise
        log.info("container %s started in %.0f ms", cid[:12], (time.monotonic() - started) * 1000)
        return member

    def _run(self, member: Member) -> None:
        """Create the container in the agent on its disks (again, for a restart) and start its process."""
        assert self.pool is not None
        cfg = member.cfg
        if member.in_agent:  # an ended run's container: the agent makes each container once
            self.vm.request(GuestOp.REMOVE, time.monotonic() + 10.0, id=member.cid)
            member.in_agent = False
        began = time.monotonic()
        disks = self._attach_disks(member)
        attached = time.monotonic()
        deadline = attached + cfg.boot_timeout
        self.vm.request(GuestOp.CREATE, deadline, id=member.cid, spec=self._agent_spec(member), disks=disks)
        member.in_agent = True
        created = time.monotonic()
        sid = self.vm.next_sid()
        self.vm.request(GuestOp.START, deadline, id=member.cid, sid=sid)
        log.debug("phase: container %s: disks %.0f ms, create %.0f ms, start %.0f ms", member.cid[:12],
                  (attached - began) * 1000, (created - attached) * 1000, (time.monotonic() - created) * 1000)
        member.sid, member.running, member.started_at = sid, True, time.monotonic()
        member.restart_at, member.stop_deadline = None, None
        self.by_sid[sid] = member
        monitor, vmm = self.vm.refs()
        self.store.update(member.cid, status="running", started=time.time(), exit_code=None, error=None,
                          finished=None, monitor_pid=monitor and monitor.pid, monitor_start=monitor and monitor.started,
                          vmm_pid=vmm and vmm.pid, vmm_start=vmm and vmm.started)

    def _attach_disks(self, member: Member) -> dict[str, int]:
        """The container's disks in the pool (those it has already are kept): each one's address and size."""
        from micropod.rootfs.upper import create_upper

        assert self.pool is not None
        cfg = member.cfg
        if not member.vm_dir.upper.exists():
            create_upper(member.vm_dir.upper, cfg.upper_size)
        self.volumes.claim(member.cid, cfg.container.volumes)
        paths = [(Path(cfg.rootfs), False), (member.vm_dir.upper, True),
                 *((Path(v.path), not v.read_only) for v in cfg.container.volumes)]
        return {self.pool.attach(member.cid, path, writable): path.stat().st_size for path, writable in paths}

    def remove(self, cid: str, quiet: bool = False) -> None:
        """An ended container off the VM: unmounted in the guest, its disks out of the pool. Disks the guest
        may not have let go of (a failed unmount, a failed unplug) stay out of use until the VM ends."""
        member = self.by_id.get(cid)
        if member is None:
            return
        if member.running and not quiet:
            raise ConflictError(f"container {member.cfg.name} is running; stop it first")
        problem: MicropodError | None = None
        if member.in_agent:
            try:
                self.vm.request(GuestOp.REMOVE, time.monotonic() + 10.0, id=cid)
            except MicropodError as exc:
                problem = exc
            member.in_agent = False
        if self.pool is not None:
            if problem is not None:
                self.pool.quarantine(cid)
            else:
                try:
                    self.pool.release(cid)
                except MicropodError as exc:
                    problem = exc
        # Its volumes stay claimed, and locked, until the VM ends: a VMM, or a guest, that kept hold of the disk
        # must not share it with another VM.
        member.log.close()
        self.by_sid.pop(member.sid, None)
        del self.by_id[cid]
        if problem is not None:
            log.warning("taking container %s off the VM: %s", cid[:12], printable(str(problem)))
            if not quiet:
                raise problem

    # -- running ---------------------------------------------------------------------------------

    def on_exit(self, cid: str, sid: int, code: int, pod_stopping: bool) -> bool:
        """Process ``sid`` of container ``cid`` ended; False if that is no container's main process."""
        member = self.by_sid.get(sid)
        if member is None or member.cid != cid:
            return False
        del self.by_sid[sid]
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
        if member.cfg.auto_remove:
            # by the loop (no request to the agent while its frames are handled), its exit told once it is gone
            self.doomed.append((member.cid, code))
        else:
            self.vm.exited(member, code, None)
        return True

    def _forget(self, cid: str, code: int) -> None:
        """--rm: the ended container and everything it kept on the host go, as its own monitor would do."""
        member = self.by_id.get(cid)
        if member is None or member.running:
            return
        self.remove(cid, quiet=True)
        self.volumes.forget(cid)
        shutil.rmtree(member.vm_dir.path, ignore_errors=True)
        self.store.delete(cid)
        self.vm.exited(member, code, None)

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
        if self.doomed:
            return time.monotonic()
        times = [t for m in self.by_id.values() for t in (m.stop_deadline, m.restart_at) if t is not None]
        return min(times, default=None)

    def on_timers(self, now: float) -> None:
        while self.doomed:
            self._forget(*self.doomed.pop())
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
            self._run(member)
        except MicropodError as exc:
            error = printable(str(exc))
            self.store.update(member.cid, status="exited", exit_code=125, error=error, finished=time.time())
            self.vm.exited(member, 125, error)

    def _agent_spec(self, member: Member) -> dict[str, Any]:
        """The agent's spec, on the disks the container has in the pool."""
        assert self.pool is not None
        device = self.pool.address_of
        cfg = member.cfg
        rootfs = {"lower": device(cfg.rootfs), "upper": device(member.vm_dir.upper)}
        return cfg.container.to_agent(rootfs, tuple(device(v.path) for v in cfg.container.volumes))
