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
from tracekeeper_operator.reverse_index import ReverseIndex
from tracekeeper_operator.selection import Selected, Selection


class StatusScope:
    def __init__(self) -> None:
        self._targeting = ReverseIndex()
        """probe id -> the nodes its selection targets."""
        self._left: Mapping[str, tuple[object, ...]] = {}
        self._counting = ReverseIndex()
        """filter key -> the namespaces whose pods its status counted."""

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
            dirty.update(self._targeting.readers(node))
        if left or last:
            dirty.update(p for p in left.keys() | last.keys() if left.get(p) != last.get(p))
        return dirty

    def probe_folded(self, pid: str, selection: Selection | None) -> None:
        """Record the nodes the probe's status read (None: the probe is gone)."""
        targets = tuple(selection.targets) if isinstance(selection, Selected) else ()
        self._targeting.set(pid, targets)

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
            dirty.update(self._counting.readers(ns))
        for pid in changes.probes:
            for probe in (before.probes.get(pid), view.probes.get(pid)):
                if probe is not None and (key := probe.filter_key) is not None:
                    dirty.add(key)
        return dirty

    def filter_folded(self, key: str, spaces: tuple[str, ...] | None) -> None:
        """Record the namespaces the filter's status read (None: the filter is gone)."""
        self._counting.set(key, spaces or ())

    def prune(self, probes: Collection[str] | None, filters: Collection[str] | None = None) -> None:
        """After a pass that folded every probe (every filter): forget those not among them
        (deleted); None: that kind was not folded whole."""
        if probes is not None:
            self._targeting.keep_only(probes)
        if filters is not None:
            self._counting.keep_only(filters)
