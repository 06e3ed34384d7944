"""Where the agent pins in bpffs: <PIN_ROOT>/<node>/identity (the node's identity table)
and <PIN_ROOT>/<node>/programs/ (its programs, for the node's next agent to adopt). The
DaemonSet mounts the host's /sys/fs/bpf, so the pins outlive the agent's container."""

from __future__ import annotations

from pathlib import Path

PIN_ROOT = Path("/sys/fs/bpf/tracekeeper")
