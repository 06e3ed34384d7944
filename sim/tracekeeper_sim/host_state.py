"""What a real node changes on its host, recorded first and put back afterwards.

kubelet rewrites kernel sysctls at start (``kernel.panic_on_oops`` 0 -> 1 would turn the
next oops into a VM panic), kube-proxy and kubelet add iptables chains, the CNI bridge
plugin creates a bridge and turns on forwarding, the runtime creates state directories
and network namespaces, kubelet creates the ``kubepods`` cgroups, and the agent's
``mountPropagation: HostToContainer`` volumes need shared mounts (every mount is private
here: PID 1 is not systemd). :class:`HostState` records each of these before the node
starts and :meth:`HostState.restore` undoes them, in reverse order, whatever happened in
between; every step is attempted and the failures are reported together.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

IPTABLES_TABLES = ("filter", "nat", "mangle", "raw")


class HostStateError(RuntimeError):
    """The host could not be put back as it was: what is left, per step."""


def _run(*cmd: str, input: str | None = None) -> str:
    res = subprocess.run(cmd, input=input, capture_output=True, text=True)
    if res.returncode != 0:
        raise HostStateError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def mount_propagation(mountpoint: str) -> str:
    """``shared`` or ``private`` (as far as we use it) for a mount point, from mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == mountpoint:
            optional = fields[6 : fields.index("-")]
            return "shared" if any(o.startswith("shared:") for o in optional) else "private"
    raise HostStateError(f"{mountpoint} is not a mount point (make setup mounts it)")


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below ``prefix``, deepest first (the order to unmount them)."""
    points = [
        line.split()[4].replace("\\040", " ")
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    ]
    inside = [p for p in points if p == prefix or p.startswith(prefix.rstrip("/") + "/")]
    return sorted(set(inside), key=lambda p: p.count("/"), reverse=True)


def cgroup_mounts() -> list[Path]:
    """Every cgroup (v1 controller) and cgroup2 mount point of this host."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2"):
            out.append(Path(fields[4]))
    return out


def _remove_cgroup_tree(root: Path) -> None:
    """rmdir a cgroup and its children, leaves first (cgroupfs refuses rm -r); a cgroup
    whose last process just died may stay busy for a moment."""
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda w: -w[0].count("/")):
        for attempt in range(50):
            try:
                os.rmdir(dirpath)
                break
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == 49:
                    raise
                time.sleep(0.1)


def iptables_tables(save: str) -> dict[str, str]:
    """``iptables-save`` output split by table: {name: "*name ... COMMIT"}."""
    tables: dict[str, str] = {}
    current: list[str] | None = None
    for line in save.splitlines():
        if line.startswith("*"):
            current = [line]
            tables[line[1:]] = ""
        elif current is not None:
            current.append(line)
            if line == "COMMIT":
                tables[current[0][1:]] = "\n".join(current) + "\n"
                current = None
    return tables


@dataclass
class HostState:
    """Records the host's state that a node changes; :meth:`restore` puts it back."""

    _undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def sysctls(self, names: Iterable[str]) -> None:
        """Remember these sysctls' values; :meth:`put_back_sysctls` (and restore) rewrite
        any that changed."""
        for name in names:
            path = Path("/proc/sys") / name.replace(".", "/")
            if not path.exists():
                continue
            value = path.read_text().strip()
            self._undo.append((f"sysctl {name}={value}", self._sysctl_setter(path, value)))

    @staticmethod
    def _sysctl_setter(path: Path, value: str) -> Callable[[], None]:
        def put_back() -> None:
            if path.read_text().strip() != value:
                path.write_text(value + "\n")

        return put_back

    def put_back_sysctls(self) -> None:
        """Undo sysctl changes now (kubelet makes them once at start: the test run need not
        live with a panicking oops), keeping them recorded for :meth:`restore`."""
        for what, undo in self._undo:
            if what.startswith("sysctl "):
                undo()

    def make_shared(self, mountpoint: str, *, recursive: bool = False) -> None:
        """Make a mount shared (for HostToContainer propagation); private again after."""
        if mount_propagation(mountpoint) == "shared":
            return
        flag = "--make-rshared" if recursive else "--make-shared"
        _run("mount", flag, mountpoint)
        back = "--make-rprivate" if recursive else "--make-private"

        def make_private() -> None:
            _run("mount", back, mountpoint)

        self._undo.append((f"mount {back} {mountpoint}", make_private))

    def iptables(self) -> None:
        """Save iptables and ip6tables; restore puts back every table as it was (and
        empties tables that had no rules before: kube-proxy's and kubelet's chains)."""
        for tool in ("iptables", "ip6tables"):
            if shutil.which(f"{tool}-save") is None:
                raise HostStateError(f"{tool}-save is missing: run make setup")
            before = iptables_tables(_run(f"{tool}-save"))
            self._undo.append((f"{tool}-restore", self._iptables_restorer(tool, before)))

    @staticmethod
    def _iptables_restorer(tool: str, before: dict[str, str]) -> Callable[[], None]:
        def restore() -> None:
            now = iptables_tables(_run(f"{tool}-save"))
            for table in sorted(set(now) | set(before)):
                if table not in IPTABLES_TABLES and table not in before:
                    continue
                _run(
                    f"{tool}-restore",
                    "--table",
                    table,
                    input=before.get(table, f"*{table}\nCOMMIT\n"),
                )

        return restore

    def links(self) -> None:
        """Delete network links that appear after this (the CNI bridge, stray veths)."""
        before = set(os.listdir("/sys/class/net"))

        def delete_new() -> None:
            for name in sorted(set(os.listdir("/sys/class/net")) - before):
                with contextlib.suppress(HostStateError):  # a veth gone with its peer
                    _run("ip", "link", "delete", name)
            left = set(os.listdir("/sys/class/net")) - before
            if left:
                raise HostStateError(f"network links left: {', '.join(sorted(left))}")

        self._undo.append(("delete new network links", delete_new))

    def paths(self, paths: Iterable[str]) -> None:
        """Remove these paths at restore if they do not exist now (state directories
        that kubelet, containerd, CNI and the agent create at fixed places); mounts left
        below them are unmounted first."""
        for p in paths:
            if os.path.lexists(p):
                continue
            self._undo.append((f"remove {p}", self._remover(p)))

    @staticmethod
    def _remover(path: str) -> Callable[[], None]:
        def remove() -> None:
            for point in mounts_under(path):
                _run("umount", "--lazy", point)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)

        return remove

    def cgroups(self, name: str) -> None:
        """Remove the cgroup ``name`` (e.g. ``kubepods``) under every cgroup mount where
        it does not exist now, once it is empty."""
        roots = [m / name for m in cgroup_mounts() if not (m / name).exists()]

        def remove() -> None:
            errors = []
            for root in roots:
                if root.exists():
                    try:
                        _remove_cgroup_tree(root)
                    except OSError as e:
                        errors.append(f"{root}: {e}")
            if errors:
                raise HostStateError("cgroups left: " + "; ".join(errors))

        self._undo.append((f"remove cgroup {name}", remove))

    def restore(self) -> None:
        """Undo everything recorded, newest first; raise one error naming what failed."""
        undo, self._undo = self._undo, []
        errors = []
        for what, step in reversed(undo):
            try:
                step()
            except (OSError, HostStateError) as e:
                errors.append(f"{what}: {e}")
        if errors:
            raise HostStateError("the host is not as it was:\n" + "\n".join(errors))
