# tracekeeper: the commands a developer and CI use. Run as root (BPF, mounts).
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest

.PHONY: setup crds check lint unit kernel e2e e2e-node manifests-check test controlplane node images demo bench reliability clean

setup:            ## install Debian packages, kernel headers link, mounts, venv with bcc
	bash scripts/setup.sh

# crds/ and its copy for kustomize (which loads no file outside manifests/base/).
CRD_DIRS := crds manifests/base/crds

crds:             ## regenerate crds/ and manifests/base/crds/ from the pydantic models in api/
	$(PY) -m tracekeeper_api.crdgen $(foreach d,$(CRD_DIRS),--out $(d))

check: lint unit  ## the inner loop: lint + the unit tier (under a minute)

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

unit:
	$(PYTEST) tests/unit -q

kernel:           ## real BPF programs on this kernel (root)
	$(PYTEST) tests/kernel -q

e2e:              ## real kube-apiserver + etcd (built from Go modules, cached)
	$(PYTEST) tests/e2e -q

manifests-check:  ## manifests/ and Dockerfiles: hadolint, promtool, yamllint, apply + admission + RBAC on the real apiserver
	$(PYTEST) tests/unit/test_manifests.py tests/unit/test_dockerfiles.py tests/e2e/test_manifests.py -q

controlplane:     ## build kube-apiserver, etcd, kubectl from Go modules (cached by version)
	bash tests/controlplane/build.sh

reliability:      ## bad input, load and faults in figures (the differential at 10,000 objects, the API fuzz at 14,000 requests, random seeds; chaos: agent and control-plane faults)
	$(PY) -m reliability.run

node:             ## build kubelet & co, containerd, crictl from Go modules (cached by version)
	bash tests/node/build.sh

images:           ## build the operator, agent, pause and workload images with buildah (cached by content)
	bash tests/node/images.sh

e2e-node:         ## the node tier: a real node, tracekeeper installed with kubectl apply -k (root)
	$(PYTEST) tests/node -q -rs

bench:            ## agent benchmarks (root), a table each; bench/README.md has a recorded run
	$(PY) -m bench.run

# The README's test command: sets the machine up, lints, runs every tier (the node tier too).
# pytest exits 5 when it collected nothing: that fails too.
test: setup lint
	$(PYTEST) tests -q -rs; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$rc

demo: setup       ## the local demo: control plane, operator, agent, a tenant's probes, live output
	$(PY) scripts/demo.py

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
