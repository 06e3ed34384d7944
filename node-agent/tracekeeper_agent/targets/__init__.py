"""Whom a probe traces: node cgroups, the cgroup watch, processes, and pod attribution."""
