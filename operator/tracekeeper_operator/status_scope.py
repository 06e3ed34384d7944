"""Which statuses a pass must fold again: the objects whose fold inputs may have changed
since the last pass, told from what changed (pure bookkeeping).

A probe's status reads its record, selection, render and session (what the plan looked at
again: `PlanMemo.looked_at`), the status it is folded over, what budgets and kernels left
out, and the agents of the nodes it targets; a filter's its record, the pods of the
namespaces it may select, the probes naming it, and the status it is folded over. Each
pass names what moved of those, and the objects reading them are the ones folded (through
`status_memo` still, which skips those whose inputs turn out equal). When that cannot be
told (`None`), every object is folded, and `prune` drops what was deleted.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from tracekeeper_operator.cluster_view import ClusterView, ViewChanges
from tracekeeper_operator.selection import Selected, Selection


def _move(index: dict[str, set[str]], item: str, old: Iterable[str], new: Iterable[str]) -> None:
    for key in old:
        members = index.get(key)
        if members is not None:
            members.discard(item)
            if not members:
                del index[key]
    for key in new:
        index.setdefault(key, set()).add(item)


def _read(
    reads: dict[str, tuple[str, ...]], index: dict[str, set[str]], item: str, new: tuple[str, ...]
) -> None:
    """`item` now reads `new` (keys of `index`, which lists who reads each)."""
    old = reads.get(item, ())
    if old == new:
        return
    _move(index, item, old, new)
    if new:
        reads[item] = new
    else:
        reads.pop(item, None)


class StatusScope:
    def __init__(self) -> None:
        self._targets: dict[str, tuple[str, ...]] = {}
        """probe id -> the nodes its selection targets."""
        self._targeting: dict[str, set[str]] = {}
        """node -> the probes targeting it."""
        self._left: Mapping[str, tuple[object, ...]] = {}
        self._spaces: dict[str, tuple[str, ...]] = {}
        """filter key -> the namespaces whose pods its status counted."""
        self._counting: dict[str, set[str]] = {}
        """namespace -> the filters counting its pods."""

    def probes(
        self,
        looked_at: Collection[str] | None,
        previous_changed: Iterable[str],
        moved_nodes: Iterable[str],
        left: Mapping[str, tuple[object, ...]],
    ) -> set[str] | None:
        """The probes to fold: `looked_at` by the plan (None: all), `previous_changed` (the
        status to fold over changed), those on `moved_nodes` (their agent's view moved), and
        those whose `left` (`status_memo.left_out`) changed."""
        last, self._left = self._left, left
        if looked_at is None:
            return None
        dirty = set(looked_at)
        dirty.update(previous_changed)
        for node in moved_nodes:
            dirty.update(self._targeting.get(node, ()))
        if left or last:
            dirty.update(p for p in left.keys() | last.keys() if left.get(p) != last.get(p))
        return dirty

    def probe_folded(self, pid: str, selection: Selection | None) -> None:
        """Record the nodes the probe's status read (None: the probe is gone)."""
        targets = tuple(selection.targets) if isinstance(selection, Selected) else ()
        _read(self._targets, self._targeting, pid, targets)

    def filters(
        self,
        changes: ViewChanges,
        before: ClusterView | None,
        view: ClusterView,
        previous_changed: Iterable[str],
    ) -> set[str] | None:
        """The filters to fold: changed, counting pods of a namespace whose pods changed,
        named by a probe that changed, or `previous_changed`; None: all."""
        if changes.everything or before is None:
            return None
        dirty = set(changes.filters)
        dirty.update(previous_changed)
        for ns in changes.pod_namespaces:
            dirty.update(self._counting.get(ns, ()))
        for pid in changes.probes:
            for probe in (before.probes.get(pid), view.probes.get(pid)):
                if probe is not None and probe.spec is not None and probe.spec.filter_ref:
                    dirty.add(f"{probe.ref.namespace}/{probe.spec.filter_ref}")
        return dirty

    def filter_folded(self, key: str, spaces: tuple[str, ...] | None) -> None:
        """Record the namespaces the filter's status read (None: the filter is gone)."""
        _read(self._spaces, self._counting, key, spaces or ())

    def prune(self, probes: Collection[str] | None, filters: Collection[str] | None = None) -> None:
        """After a pass that folded every probe (every filter): forget those not among them
        (deleted); None: that kind was not folded whole."""
        for pid in self._targets.keys() - set(probes) if probes is not None else ():
            self.probe_folded(pid, None)
        for key in self._spaces.keys() - set(filters) if filters is not None else ():
            self.filter_folded(key, None)
