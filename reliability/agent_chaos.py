"""Faults on one node agent (issue 18's chaos, the agent's part): `tracekeeper-agent serve`
SIGKILLed mid-compile and mid-push, its state directory full, its pods' cgroup trees removed
under a loaded probe. Each scenario runs the real agent process on this kernel, checks what
must hold (it raises ChaosFailure naming it) and returns its figures: the kernel tier
(tests/kernel/test_chaos.py) asserts the checks, `reliability.chaos` prints the figures.

Programs are counted two ways: what the agent holds (the `prog_id`/`map_id` of its fds'
fdinfo, exact whoever else loads programs on this shared machine) must be what it reports,
and what it held must be gone from `bpftool prog show` once it is dead (no orphan)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracekeeper_agent.host.bpffs import PIN_ROOT
from tracekeeper_sim import kernel_maps
from tracekeeper_sim.kubelet import create_cgroup, remove_cgroup_tree
from tracekeeper_sim.local_cluster import find_free_ports
from tracekeeper_sim.served_agent import FakePod, kubepods_qos
from tracekeeper_sim.world import (
    AgentProcess,
    bpf_prog_ids,
    hits_by_pod,
    samples,
    wait_bpf_gone,
    wait_until,
)

NAMESPACE = "team-chaos"
RESUME_GOAL_SECONDS = 2.0
"""Issue 18: a restarted agent traces again within 2 s from its persisted state."""
GONE_SECONDS = 10.0
"""The kernel frees a dead process's programs after an RCU grace period, not at once."""
TRACEPOINTS = (
    "syscalls:sys_enter_openat",
    "syscalls:sys_enter_getppid",
    "syscalls:sys_enter_getpgid",
    "syscalls:sys_enter_getsid",
)
"""One shape each: one compile each."""


class ChaosFailure(AssertionError):
    """A check of a chaos scenario did not hold."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise ChaosFailure(what)


@dataclass
class Figures:
    scenario: str
    resume_seconds: float | None = None
    """Restart (or the fault's end) to the state applied and traced again."""
    ready_seconds: float | None = None
    """... of which: the restarted process's start to /readyz (its persisted state applied)."""
    compiles: int = 0
    """Programs the restart compiled, the node's claims program included (~0.35 s each)."""
    adopted: int = 0
    """Programs the restart took over from the killed agent's pins (not compiled)."""
    programs_before: int = 0
    """`bpftool prog show` entries before the scenario (others' programs included)."""
    programs_after: int = 0
    """... after its agents stopped."""
    agent_programs: int = 0
    """Programs the agent held at the end (its probes' plus the node's 2 claims programs)."""
    leaked: int = 0
    """Programs and maps a dead agent held that the kernel still lists (goal 0)."""
    notes: list[str] = field(default_factory=list)
    goal: float | None = None
    """The resume goal, where there is one (an agent restarted from its persisted state)."""

    @property
    def resume_met(self) -> bool | None:
        if self.goal is None or self.resume_seconds is None:
            return None
        return self.resume_seconds <= self.goal


# --- the node: an agent process, its state directory and pods ---------------------------------


def held_bpf_ids(pid: int) -> tuple[set[int], set[int]]:
    """(program ids, map ids) process `pid` holds, from its fds' fdinfo."""
    progs: set[int] = set()
    maps: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in info.splitlines():
            if line.startswith("prog_id:"):
                progs.add(int(line.split()[1]))
            elif line.startswith("map_id:"):
                maps.add(int(line.split()[1]))
    return progs, maps


class Node:
    """One agent process on a state directory, pods under a kubepods tree of its own."""

    def __init__(self, workdir: Path, cgroup_root: Path) -> None:
        self.name = f"chaos-{uuid.uuid4().hex[:6]}"
        self.sandbox = cgroup_root / f"tk-chaos-{self.name}"
        self.qos = kubepods_qos(self.sandbox)  # before the agent starts: it looks at start
        token = secrets.token_hex(16)
        token_file = workdir / f"{self.name}.token"
        token_file.write_text(token)
        port, metrics_port = find_free_ports(2)
        self.agent = AgentProcess(
            self.name, port, workdir / f"{self.name}-state", token, token_file,
            workdir / f"{self.name}.log", metrics_port,
        )  # fmt: skip
        self.pods: list[FakePod] = []
        self.workloads: list[subprocess.Popen[bytes]] = []
        self.held_programs: set[int] = set()
        self.held_maps: set[int] = set()
        """Everything any of this node's agent processes held (the orphan check)."""

    @property
    def state_file(self) -> Path:
        return self.agent.state_dir / "state.json"

    def pod(self, name: str) -> FakePod:
        pod = FakePod.new(self.qos, name, namespace=NAMESPACE)
        create_cgroup(pod.container_dir)
        self.pods.append(pod)
        return pod

    def start(self) -> float:
        """Start the agent; seconds until it answered /readyz (its persisted state applied)."""
        started = time.monotonic()
        self.agent.start()
        return time.monotonic() - started

    @property
    def pid(self) -> int:
        assert self.agent.popen is not None
        return self.agent.popen.pid

    def note_held(self) -> tuple[set[int], set[int]]:
        progs, maps = held_bpf_ids(self.pid)
        self.held_programs |= progs
        self.held_maps |= maps
        return progs, maps

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs; the kernel closes the agent's fds."""
        self.note_held()
        self.agent.kill()

    def put(self, revision: int, probes: list[dict[str, Any]]) -> dict[str, Any]:
        status, text = self.put_raw(revision, probes)
        check(status == 200, f"PUT revision {revision}: {status} {text[:500]}")
        report: dict[str, Any] = json.loads(text)
        return report

    def put_raw(
        self, revision: int, probes: list[dict[str, Any]], timeout: float = 120
    ) -> tuple[int, str]:
        body = json.dumps({"node": self.name, "revision": revision, "probes": probes}).encode()
        req = urllib.request.Request(
            f"{self.agent.endpoint}/v1/state", data=body, method="PUT",
            headers={"Authorization": f"Bearer {self.agent.token}",
                     "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except OSError as e:
            return 0, str(e)

    def put_in_background(self, revision: int, probes: list[dict[str, Any]]) -> None:
        """A push whose answer nobody waits for (the agent is killed while it works)."""
        threading.Thread(target=self.put_raw, args=(revision, probes), daemon=True).start()

    def persisted_revision(self) -> int | None:
        try:
            return int(json.loads(self.state_file.read_text())["revision"])
        except (OSError, ValueError, KeyError):
            return None

    def run_workload(self, pod: FakePod) -> None:
        """A process in the pod's container that opens a file 20 times a second."""
        loop = "while :; do cat /etc/hostname >/dev/null; sleep 0.05; done"
        cg = pod.container_dir
        self.workloads.append(
            subprocess.Popen(
                ["sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec sh -c "$0"', loop],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )
        )  # fmt: skip

    def stop_workloads(self) -> None:
        for proc in self.workloads:
            proc.kill()
            proc.wait()
        self.workloads.clear()

    def hits(self, probe: str = "opens") -> dict[str, float]:
        return hits_by_pod(self.agent.metrics(), NAMESPACE, probe)

    def close(self) -> None:
        self.stop_workloads()
        self.agent.stop()
        remove_cgroup_tree(self.sandbox, evacuate_to=self.sandbox.parent)


@contextlib.contextmanager
def node(workdir: Path, cgroup_root: Path, figures: Figures) -> Iterator[Node]:
    """A node for one scenario; afterwards the program counts and the orphan check."""
    figures.programs_before = len(bpf_prog_ids())
    n = Node(workdir, cgroup_root)
    try:
        yield n
    finally:
        if n.agent.popen is not None and n.agent.popen.poll() is None:
            n.note_held()
        n.close()
    leaked = wait_bpf_gone(n.held_programs, n.held_maps, GONE_SECONDS)
    figures.programs_after = len(bpf_prog_ids())
    figures.leaked = len(leaked)
    check(not leaked, f"{figures.scenario}: BPF objects outlived their agent: {sorted(leaked)}")


def probe(name: str, tracepoint: str, *pods: FakePod, tag: str = "a") -> dict[str, Any]:
    spec: dict[str, Any] = {"tracepoint": tracepoint}
    if name == "opens":
        spec["output"] = {"by": ["pod"]}
    return {
        "id": f"{NAMESPACE}/{name}",
        "specHash": hashlib.sha256(f"{tag}/{name}/{tracepoint}".encode()).hexdigest()[:16],
        "spec": spec,
        "targets": {"pods": [p.target() for p in pods]},
    }


def probes_for(*pods: FakePod, count: int = len(TRACEPOINTS)) -> list[dict[str, Any]]:
    names = ["opens", "ppid", "pgid", "sid"]
    return [probe(names[i], TRACEPOINTS[i], *pods) for i in range(count)]


def loaded(report: dict[str, Any]) -> list[str]:
    return [p["id"] for p in report["probes"] if p["state"] == "Loaded"]


def check_holds_what_it_reports(n: Node, report: dict[str, Any], what: str) -> int:
    n.note_held()
    return check_holds(n.pid, report, what)


def check_holds(pid: int, report: dict[str, Any], what: str) -> int:
    """Agent `pid` holds exactly its probes' programs and the claims pair, no duplicate."""
    reported = [i for p in report["probes"] for i in p["programIds"]]
    claims = report["cgroupClaims"]["programIds"]
    held, _ = held_bpf_ids(pid)
    check(len(set(reported)) == len(reported), f"{what}: a program reported twice: {reported}")
    check(len(claims) == 2, f"{what}: claims programs {claims}")
    check(held == set(reported) | set(claims), f"{what}: holds {held}, reports {reported}+{claims}")
    return len(held)


def wait_hits(n: Node, pod: FakePod, above: float = 0, timeout: float = 30) -> float:
    """Seconds until the opens probe counted more than `above` hits of `pod`."""
    started = time.monotonic()

    def describe() -> str:
        return f"hits {n.hits()}, above {above}; {n.agent.report()['probes']}"

    wait_until(f"hits of {pod.name}", lambda: n.hits().get(pod.name, 0) > above,
               timeout=timeout, describe=describe, max_delay=0.02)  # fmt: skip
    return time.monotonic() - started


# --- the scenarios -----------------------------------------------------------------------------


def kill_mid_compile(workdir: Path, cgroup_root: Path) -> Figures:
    """SIGKILL while the first push's programs compile; the restart resumes that state."""
    figures = Figures("agent SIGKILL mid-compile", goal=RESUME_GOAL_SECONDS)
    with node(workdir, cgroup_root, figures) as n:
        web = n.pod("web-0")
        n.run_workload(web)
        n.start()
        probes = probes_for(web)
        n.put_in_background(1, probes)
        # Persisted before any compile; killed once the first program is attached, while
        # the others compile (one at a time), so that loaded programs die with it too.
        wait_until("revision 1 persisted", lambda: n.persisted_revision() == 1, timeout=30)
        wait_until("a first program", lambda: len(held_bpf_ids(n.pid)[0]) > 2, timeout=60)
        at_kill = len(held_bpf_ids(n.pid)[0]) - 2  # less the node's claims programs
        n.kill()
        figures.notes.append(f"killed holding {at_kill} of {len(probes)} probe programs")
        pinned = check_only_pins_outlive(n)
        figures.ready_seconds = n.start()
        resumed = figures.ready_seconds + wait_hits(n, web)
        report = n.agent.report()
        count_loads(n, figures)
        check(figures.adopted == len(pinned), f"adopted {figures.adopted} of {len(pinned)} pinned")
        check(report["revision"] == 1, f"resumed revision {report['revision']}, not 1")
        check(loaded(report) == [p["id"] for p in probes], f"not all loaded: {report['probes']}")
        figures.agent_programs = check_holds_what_it_reports(n, report, "after the restart")
        check_adopted_or_gone(n, pinned)
        figures.resume_seconds = resumed
    return figures


def kill_mid_push(workdir: Path, cgroup_root: Path) -> Figures:
    """SIGKILL during a push that changes a loaded state (new targets: map writes; new
    shapes: compiles); the restart resumes the new revision whole, nothing of the old one."""
    figures = Figures("agent SIGKILL mid-push", goal=RESUME_GOAL_SECONDS)
    with node(workdir, cgroup_root, figures) as n:
        web, api = n.pod("web-0"), n.pod("api-0")
        n.run_workload(web)
        n.run_workload(api)
        n.start()
        first = n.put(1, [probe("opens", TRACEPOINTS[0], web), probe("old", TRACEPOINTS[3], web)])
        check(len(loaded(first)) == 2, f"revision 1: {first['probes']}")
        wait_hits(n, web)
        second = [probe("opens", TRACEPOINTS[0], web, api), *probes_for(web, api)[1:3]]
        n.put_in_background(2, second)
        wait_until("revision 2 persisted", lambda: n.persisted_revision() == 2, timeout=30)
        n.kill()
        pinned = check_only_pins_outlive(n)
        figures.ready_seconds = n.start()
        resumed = figures.ready_seconds + wait_hits(n, api)
        count_loads(n, figures)
        report = n.agent.report()
        check(report["revision"] == 2, f"resumed revision {report['revision']}, not 2")
        check(loaded(report) == [p["id"] for p in second], f"resumed {report['probes']}")
        figures.agent_programs = check_holds_what_it_reports(n, report, "after the restart")
        check_adopted_or_gone(n, pinned)  # revision 1's "old" probe: detached
        figures.resume_seconds = resumed
    return figures


def kill_while_tracing(workdir: Path, cgroup_root: Path) -> Figures:
    """SIGKILL with every probe loaded (an OOM kill, a crash): the programs stay attached
    through their pins, and the restart adopts them all, compiling none of them."""
    figures = Figures("agent SIGKILL while tracing", goal=RESUME_GOAL_SECONDS)
    with node(workdir, cgroup_root, figures) as n:
        web = n.pod("web-0")
        n.run_workload(web)
        n.start()
        probes = probes_for(web)
        check(len(loaded(n.put(1, probes))) == len(probes), "revision 1 not loaded")
        wait_hits(n, web)
        before = {p["id"]: p["programIds"] for p in n.agent.report()["probes"]}
        n.note_held()
        n.kill()
        pinned = check_only_pins_outlive(n)
        check(len(pinned) == len(probes), f"{len(pinned)} programs pinned, not {len(probes)}")
        figures.ready_seconds = n.start()
        resumed = figures.ready_seconds + wait_hits(n, web)
        report = n.agent.report()
        count_loads(n, figures)
        check(figures.adopted == len(probes), f"adopted {figures.adopted} of {len(probes)}")
        after = {p["id"]: p["programIds"] for p in report["probes"]}
        check(after == before, f"program ids changed: {before} -> {after}")
        figures.agent_programs = check_holds_what_it_reports(n, report, "after the restart")
        check_adopted_or_gone(n, pinned)
        figures.resume_seconds = resumed
    return figures


def kill_during_restore(workdir: Path, cgroup_root: Path) -> Figures:
    """SIGKILL, then SIGKILL again while the restart restores (adopting revision 1's
    programs, compiling revision 2's new shapes): the third start resumes revision 2 whole,
    from what both dead agents left pinned."""
    figures = Figures("agent SIGKILL during its restore", goal=RESUME_GOAL_SECONDS)
    with node(workdir, cgroup_root, figures) as n:
        web = n.pod("web-0")
        n.run_workload(web)
        n.start()
        first = probes_for(web, count=2)
        check(len(loaded(n.put(1, first))) == 2, "revision 1 not loaded")
        second = probes_for(web)
        n.put_in_background(2, second)
        wait_until("revision 2 persisted", lambda: n.persisted_revision() == 2, timeout=30)
        n.kill()
        check_only_pins_outlive(n)
        n.agent.start(wait=False)
        # Killed once it holds more than it adopted (2 + the claims pair): mid-compile.
        wait_until("the restore compiling", lambda: len(held_bpf_ids(n.pid)[0]) > 4,
                   timeout=60, max_delay=0.02)  # fmt: skip
        n.kill()
        pinned = check_only_pins_outlive(n)
        figures.notes.append(f"killed again during the restore, {len(pinned)} programs pinned")
        figures.ready_seconds = n.start()
        resumed = figures.ready_seconds + wait_hits(n, web)
        report = n.agent.report()
        count_loads(n, figures)
        check(figures.adopted == len(pinned), f"adopted {figures.adopted} of {len(pinned)}")
        check(report["revision"] == 2, f"resumed revision {report['revision']}, not 2")
        check(loaded(report) == [p["id"] for p in second], f"resumed {report['probes']}")
        figures.agent_programs = check_holds_what_it_reports(n, report, "after the restart")
        check_adopted_or_gone(n, pinned)
        figures.resume_seconds = resumed
    return figures


def count_loads(n: Node, figures: Figures) -> None:
    """Compiles (the claims program and each compiled shape) and adoptions of the restart."""
    text = n.agent.metrics()
    ((_, compiled),) = samples(text, "tracekeeper_agent_compile_seconds_count")
    ((_, adopted),) = samples(text, "tracekeeper_agent_programs_adopted_total")
    figures.compiles, figures.adopted = int(compiled) + 1, int(adopted)


def pinned_programs(n: Node) -> set[int]:
    """The programs pinned for the node's next agent (bpf/pinned_programs.py)."""
    root = PIN_ROOT / n.name / "programs"
    ids: set[int] = set()
    for pin in root.glob("*/prog-*") if root.exists() else ():
        out = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", str(pin)],
                             capture_output=True, text=True, check=False)  # fmt: skip
        if out.returncode == 0:
            ids.add(int(json.loads(out.stdout)["id"]))
    return ids


def check_only_pins_outlive(n: Node) -> set[int]:
    """After a SIGKILL: only the pinned programs and maps outlive the agent."""
    pinned = pinned_programs(n)
    check(pinned <= n.held_programs, f"pinned {pinned}: not the killed agent's")
    left = wait_bpf_gone(n.held_programs - pinned, n.held_maps - pinned_maps(n), GONE_SECONDS)
    check(not left, f"the killed agent's unpinned objects outlived it: {sorted(left)}")
    return pinned


def check_adopted_or_gone(n: Node, pinned: set[int]) -> None:
    """Once the restart is ready, each pinned program is held by it or detached: none is
    left running for nobody (an orphan) or loaded twice (a duplicate)."""
    held, _ = held_bpf_ids(n.pid)
    orphans = wait_bpf_gone(pinned - held, set(), GONE_SECONDS)
    check(not orphans, f"programs neither adopted nor detached: {sorted(orphans)}")


def identity_pin(n: Node) -> Path:
    """Where `serve` pins its node's identity table."""
    return PIN_ROOT / n.name / "identity"


def pinned_maps(n: Node) -> set[int]:
    """The maps pinned for the node's next agent: the identity table and the pinned
    programs' maps (the next start keeps them, emptied, for the programs it adopts); the
    orphan check at the end covers them. Empty when none is pinned."""
    pins = [identity_pin(n), *(PIN_ROOT / n.name / "programs").glob("*/map-*")]
    ids: set[int] = set()
    for pin in pins:
        with contextlib.suppress(subprocess.CalledProcessError):
            ids.add(kernel_maps.pinned_map_id(pin))
    return ids


@contextlib.contextmanager
def small_filesystem(directory: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of `size` at `directory`: a state directory that can be filled."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(directory)], check=True)  # fmt: skip
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full (what a log or core dump does)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)  # unbuffered: nothing left to flush at close
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def full_state_directory(workdir: Path, cgroup_root: Path) -> Figures:
    """The state directory fills: pushes still apply, the file keeps the last revision it
    could hold (whole, no temporary file left), the report says which and why, the poll
    saves the accepted revision once there is room, and a restart resumes what is on disk."""
    figures = Figures("agent state directory full", goal=RESUME_GOAL_SECONDS)
    with node(workdir, cgroup_root, figures) as n, small_filesystem(n.agent.state_dir):
        web, api = n.pod("web-0"), n.pod("api-0")
        n.run_workload(web)
        n.run_workload(api)
        n.start()
        n.put(1, [probe("opens", TRACEPOINTS[0], web)])
        check(n.agent.report()["persisted"] == {"revision": 1}, "revision 1 not persisted")
        filler = fill(n.agent.state_dir)

        second = n.put(2, [probe("opens", TRACEPOINTS[0], web, api)])
        check(loaded(second) == [f"{NAMESPACE}/opens"], f"revision 2: {second['probes']}")
        persisted = second["persisted"]
        check(persisted["revision"] == 1 and "No space" in persisted.get("error", ""),
              f"a failed save reported as {persisted}")  # fmt: skip
        check(n.persisted_revision() == 1, "the state file is not revision 1 whole")
        check(saved_metric(n) == 0.0, "tracekeeper_agent_state_saved is not 0 while full")
        names = sorted(p.name for p in n.agent.state_dir.iterdir())
        check(names == ["filler", "state.json"], f"the state directory holds {names}")
        wait_hits(n, api)  # revision 2 traces

        # A restart while full resumes what is on disk and writes nothing.
        n.kill()
        figures.ready_seconds = n.start()
        restart = figures.ready_seconds + wait_hits(n, web)
        count_loads(n, figures)
        report = n.agent.report()
        check(report["revision"] == 1 and report["persisted"] == {"revision": 1},
              f"restarted full: revision {report['revision']}, {report['persisted']}")  # fmt: skip
        figures.notes.append("restarted while full: resumed revision 1 (the one on disk)")
        third = n.put(3, [probe("opens", TRACEPOINTS[0], web, api)])  # the operator's push
        check(third["persisted"]["revision"] == 1, f"revision 3 reported {third['persisted']}")

        filler.unlink()
        freed = time.monotonic()
        saved = lambda: n.agent.report()["persisted"] == {"revision": 3}  # noqa: E731
        wait_until("revision 3 saved once there is room", saved, timeout=30)
        figures.notes.append(f"saved {time.monotonic() - freed:.1f} s after room came back")
        check(n.persisted_revision() == 3, "the state file is not revision 3")
        check(saved_metric(n) == 1.0, "tracekeeper_agent_state_saved is not 1 once saved")
        figures.agent_programs = check_holds_what_it_reports(n, report, "full")
        figures.resume_seconds = restart
        n.agent.stop()  # before the tmpfs goes
    return figures


def saved_metric(n: Node) -> float:
    ((_, value),) = samples(n.agent.metrics(), "tracekeeper_agent_state_saved")
    return value


def identity_entries(n: Node) -> int:
    """Entries of the node's identity table, read from the kernel."""
    return len(kernel_maps.dump_pinned(identity_pin(n)))


def cgroup_tree_vanishes(workdir: Path, cgroup_root: Path) -> Figures:
    """A pod's cgroups are removed under a loaded probe, then the whole kubepods tree: the
    program stays (same id, none added), the kernel's identity table and the report drop
    them, and tracing resumes when the cgroups come back."""
    figures = Figures("cgroup tree removed under a pod")
    with node(workdir, cgroup_root, figures) as n:
        web, api = n.pod("web-0"), n.pod("api-0")
        n.run_workload(web)
        n.run_workload(api)
        n.start()
        report = n.put(1, [probe("opens", TRACEPOINTS[0], web, api)])
        (program,) = report["probes"][0]["programIds"]
        wait_hits(n, web)
        wait_hits(n, api)
        check(identity_entries(n) == 2, f"identity table: {identity_entries(n)} entries")

        def entries() -> int:
            outcome = n.agent.outcome(f"{NAMESPACE}/opens")
            assert outcome is not None
            return int(outcome["filterEntries"])

        def outcome_is(count: int, waiting: str | None) -> bool:
            outcome = n.agent.outcome(f"{NAMESPACE}/opens")
            assert outcome is not None
            return (outcome["state"] == "Loaded" and outcome["filterEntries"] == count
                    and outcome["programIds"] == [program]
                    and (waiting is None or waiting in outcome.get("message", "")))  # fmt: skip

        n.stop_workloads()
        remove_cgroup_tree(web.directory, evacuate_to=cgroup_root)
        wait_until("web-0 dropped", lambda: outcome_is(1, "web-0"), timeout=10)
        check(identity_entries(n) == 1, f"after web-0: {identity_entries(n)} entries")
        remove_cgroup_tree(n.sandbox / "kubepods.slice", evacuate_to=cgroup_root)
        wait_until("every pod dropped", lambda: outcome_is(0, "api-0"), timeout=10)
        check(identity_entries(n) == 0, f"after the tree: {identity_entries(n)} entries")
        check(n.agent.http("/healthz")[0] == 200, "the agent stopped answering")

        # kubelet makes them again (a node's cgroup driver restarted, the pods recreated).
        before = n.hits().get(web.name, 0)
        made = time.monotonic()
        kubepods_qos(n.sandbox)
        create_cgroup(web.container_dir)
        n.run_workload(web)
        # The workload runs in its container before the agent learns the pod again (inotify):
        # its cached miss must not outlive the identity write (reconciler: identity_moved).
        wait_hits(n, web, above=before, timeout=15)
        figures.resume_seconds = time.monotonic() - made
        create_cgroup(api.container_dir)
        wait_until("both pods back", lambda: outcome_is(2, None), timeout=10,
                   describe=lambda: str(n.agent.outcome(f"{NAMESPACE}/opens")))  # fmt: skip
        check(entries() == 2 and identity_entries(n) == 2, "the pods did not come back whole")
        figures.agent_programs = check_holds_what_it_reports(n, n.agent.report(), "after")
    return figures


ALL: tuple[Callable[[Path, Path], Figures], ...] = (
    kill_while_tracing,
    kill_mid_compile,
    kill_mid_push,
    kill_during_restore,
    full_state_directory,
    cgroup_tree_vanishes,
)
