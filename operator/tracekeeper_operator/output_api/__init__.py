"""The aggregated output API (output.tracekeeper.dev/v1alpha1), served by the operator.

The kube-apiserver authenticates and authorizes app teams (RBAC on traceprobes/log,
traceprobes/values, traceprobes/nodes) and proxies to this server with its front-proxy
client certificate; the server checks that certificate and asks a SubjectAccessReview
again, then reads one probe's output from the agents that run it, with the agent token
tenants never see. The operator already holds that token and knows which nodes run which
probe (its pushes), which is why it serves this rather than another Deployment.
"""
