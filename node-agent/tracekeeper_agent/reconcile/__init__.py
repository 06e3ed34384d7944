"""Desired state -> loaded programs: the reconciler, the persisted state and tenancy checks."""
