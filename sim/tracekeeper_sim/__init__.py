"""Dev-only simulation harness: kubelet's cgroup layout and fake pods, LocalCluster (a real
kube-apiserver + etcd), the e2e World and the benchmarks' served agent. Not in the wheel;
the product never imports it (import-linter)."""
