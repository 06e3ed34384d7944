"""tracekeeper's shared API: CRD models and the operator -> agent wire protocol.

One source of truth: the CRD YAML in crds/ is generated from these models.
"""

GROUP = "tracekeeper.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
