"""A real Kubernetes control plane (etcd + kube-apiserver) on loopback.

Used by the e2e tests and the demo. The binaries come from tests/controlplane/build.sh
(built from Go modules, cached by version). Everything the cluster needs lives in one
directory: certificates, keys, a static token file, logs, the etcd data and one
kubeconfig per user (``kubeconfig-admin``, ``kubeconfig-alice``, ...).

Authentication is by static bearer tokens: ``admin`` is in ``system:masters``; tenants
are plain users (only ``system:authenticated``), so RBAC decides what they may do.

CLI (the demo uses it)::

    python -m tracekeeper_sim.local_cluster start --dir DIR

starts the cluster, writes DIR/pids and the kubeconfigs, prints the admin kubeconfig
path and stays in the foreground until SIGINT or SIGTERM, then stops it cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

CONTROLPLANE_DIR = Path(__file__).resolve().parents[2] / "tests" / "controlplane"
"""The Go module that builds the binaries (go.mod, build.sh), kept beside the tests."""
BUILD_SCRIPT = CONTROLPLANE_DIR / "build.sh"
BINARIES = ("etcd", "kube-apiserver", "kubectl")
ADMIN = "admin"
DEFAULT_TENANTS = ("alice", "bob")
SERVICE_CIDR = "10.96.0.0/16"  # only allocated from, never routed: nothing runs a proxy
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
LOOPBACK = "127.0.0.1"

# Admission plugins on by default that need controllers we do not run (ServiceAccount
# waits for the token controller's default SA; Pods would be refused) or that only cost
# time here. Kept: NamespaceLifecycle, the webhooks and ValidatingAdmissionPolicy, which
# tracekeeper ships for privileged-field checks.
DISABLED_ADMISSION_PLUGINS = (
    "ServiceAccount",
    "LimitRanger",
    "TaintNodesByCondition",
    "PodSecurity",
    "Priority",
    "DefaultTolerationSeconds",
    "DefaultStorageClass",
    "StorageObjectInUseProtection",
    "PersistentVolumeClaimResize",
    "RuntimeClass",
    "CertificateApproval",
    "CertificateSigning",
    "ClusterTrustBundleAttest",
    "CertificateSubjectRestriction",
    "DefaultIngressClass",
    "PodTopologyLabels",
    "PodGroupProtection",
    "NodeDeclaredFeatureValidator",
    "PodResizeValidator",
    "ResourceQuota",
)
ENABLED_ADMISSION_PLUGINS = (
    "NamespaceLifecycle",
    "MutatingAdmissionWebhook",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionWebhook",
)

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or reached."""


@dataclass(frozen=True)
class User:
    name: str
    token: str
    groups: tuple[str, ...] = ()


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] = field(repr=False)


def build_binaries(*, echo: bool = True) -> Path:
    """Run build.sh (a no-op when the binaries for this version are cached); return the
    bin dir. Progress goes to our stderr when ``echo``; on failure the error carries it."""
    proc = subprocess.Popen(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if echo:
            print(line, end="", file=sys.stderr, flush=True)
    if proc.wait() != 0 or not lines:
        tail = "\n".join(lines[-40:])
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n{tail}")
    return Path(lines[-1])


def find_free_ports(count: int) -> list[int]:
    """Ports the kernel picks as free, held open together so that they are distinct."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError as e:
            raise ControlPlaneError(f"{what} port {LOOPBACK}:{port} is taken: {e}") from e


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the Python process dies without
    # stopping us (SIGKILL, a crash), the kernel sends SIGTERM; no orphans left behind.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def exited(procs: Sequence[_Proc]) -> str:
    """Which of ``procs`` have exited, with their logs' tails; empty while all run."""
    return "\n".join(
        f"{p.name} exited with code {p.popen.returncode}; {p.log_path} ends with:\n"
        + _tail(p.log_path)
        for p in procs
        if p.popen.poll() is not None
    )


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise ControlPlaneError("the openssl CLI is required (apt-get install openssl)")
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{res.stderr}")


def _ec_key(path: str, cwd: Path) -> None:
    # P-256 keys: generated in milliseconds, unlike RSA, and accepted everywhere here.
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", path, cwd=cwd)  # fmt: skip


FRONT_PROXY_CLIENT = "front-proxy-client"


def _write_front_proxy_pki(pki: Path) -> None:
    """The aggregation layer's own CA (not the cluster CA: a client certificate of the
    cluster CA must not pass for the front proxy) and the apiserver's client certificate,
    which it presents to aggregated APIs with the user in X-Remote-* headers."""
    _ec_key("front-proxy-ca.key", pki)
    _openssl("req", "-x509", "-new", "-key", "front-proxy-ca.key", "-out", "front-proxy-ca.crt",
             "-days", "3650", "-subj", "/CN=tracekeeper-front-proxy-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=pki)  # fmt: skip
    _ec_key("front-proxy-client.key", pki)
    _openssl("req", "-new", "-key", "front-proxy-client.key", "-out", "front-proxy-client.csr",
             "-subj", f"/CN={FRONT_PROXY_CLIENT}", cwd=pki)  # fmt: skip
    (pki / "front-proxy-client.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n"
    )
    _openssl("x509", "-req", "-in", "front-proxy-client.csr", "-CA", "front-proxy-ca.crt",
             "-CAkey", "front-proxy-ca.key", "-CAcreateserial", "-out", "front-proxy-client.crt",
             "-days", "3650", "-extfile", "front-proxy-client.ext", cwd=pki)  # fmt: skip


def _aggregation_flags(pki: Path) -> list[str]:
    """The aggregation layer. No --enable-aggregator-routing: an aggregated server running
    as a local process is reached through an ExternalName Service (localhost), which only
    the default (service) routing resolves; endpoint routing takes ClusterIP Services only
    and Endpoints refuse loopback addresses."""
    return [
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
        f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
    ]


class LocalCluster:
    """etcd and kube-apiserver on free loopback ports, RBAC on, token authentication."""

    def __init__(
        self,
        bin_dir: Path,
        cluster_dir: Path | None = None,
        *,
        tenants: Sequence[str] = DEFAULT_TENANTS,
        apiserver_port: int | None = None,
        etcd_port: int | None = None,
        startup_timeout: float = 120.0,
        stop_timeout: float = 15.0,
        extra_apiserver_args: Sequence[str] = (),
        node_ip: str | None = None,
    ) -> None:
        self.bin_dir = Path(bin_dir)
        # With a real node (tests/node): the apiserver also listens on the node's address,
        # which pods reach and the kubernetes Service's endpoint names (loopback is
        # refused there); ServiceAccount admission mounts the pods' tokens.
        self.node_ip = node_ip
        self._owns_dir = cluster_dir is None
        self.dir = Path(cluster_dir) if cluster_dir else Path(tempfile.mkdtemp(prefix="tk-k8s-"))
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_apiserver_args = tuple(extra_apiserver_args)
        self._requested_ports = (apiserver_port, etcd_port)
        self.apiserver_port = 0
        self.etcd_port = 0
        self.etcd_peer_port = 0
        self.users: dict[str, User] = {
            ADMIN: User(ADMIN, secrets.token_hex(16), ("system:masters",))
        }
        for name in tenants:
            if name in self.users:
                raise ValueError(f"duplicate user {name!r}")
            self.users[name] = User(name, secrets.token_hex(16))
        self._procs: list[_Proc] = []
        self._lock = threading.Lock()

    # -- paths and accessors -------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://{LOOPBACK}:{self.apiserver_port}"

    @property
    def ca_file(self) -> Path:
        return self.dir / "pki" / "ca.crt"

    def kubeconfig(self, user: str = ADMIN) -> Path:
        if user not in self.users:
            raise KeyError(f"no such user {user!r}; users: {', '.join(self.users)}")
        return self.dir / f"kubeconfig-{user}"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self._procs}

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.popen.poll() is None for p in self._procs)

    def exited(self) -> str:
        """Which processes have exited, with their logs' tails; empty while all run."""
        return exited(self._procs)

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._procs:
            raise ControlPlaneError("cluster already started")
        missing = [b for b in BINARIES if not os.access(self.binary(b), os.X_OK)]
        if missing:
            raise ControlPlaneError(
                f"missing {', '.join(missing)} in {self.bin_dir}: run bash {BUILD_SCRIPT} "
                "(it builds them from Go modules and prints the bin dir)"
            )
        self._pick_ports()
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._write_pki()
            self._write_tokens()
            self._start_etcd()
            self._start_apiserver()
            for user in self.users:
                self._write_kubeconfig(user)
            self._write_state()
        except BaseException:
            self.stop(remove_dir=False)
            raise

    def stop(self, *, remove_dir: bool | None = None) -> None:
        """Stop the apiserver, then etcd: SIGTERM, SIGKILL after the grace period."""
        with self._lock:
            procs, self._procs = self._procs, []
        for proc in reversed(procs):
            if proc.popen.poll() is None:
                proc.popen.terminate()
                try:
                    proc.popen.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.popen.kill()
                    proc.popen.wait()
            proc.log_file.close()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "pids").unlink()
        if remove_dir if remove_dir is not None else self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self, name: str, *, down_for: float = 0.0) -> None:
        """SIGKILL one component (a crash: "etcd" or "kube-apiserver") and start it again on
        its ports and data after `down_for` seconds; returns once it serves again."""
        with self._lock:
            (proc,) = [p for p in self._procs if p.name == name]
            self._procs.remove(proc)
        proc.popen.kill()
        proc.popen.wait()
        proc.log_file.close()
        time.sleep(down_for)
        {"etcd": self._start_etcd, "kube-apiserver": self._start_apiserver}[name]()
        self._write_state()  # the new pid

    # -- clients -----------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        user: str = ADMIN,
        input: str | None = None,
        check: bool = False,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run this cluster's kubectl (the version built with the apiserver) as ``user``."""
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        # A discovery cache per cluster: never stale resources from an earlier cluster
        # that happened to use the same port.
        env["KUBECACHEDIR"] = str(self.dir / "kube-cache")
        cmd = [str(self.binary("kubectl")), "--kubeconfig", str(self.kubeconfig(user)), *args]
        res = subprocess.run(
            cmd, input=input, capture_output=True, text=True, env=env, timeout=timeout
        )
        if check and res.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} as {user} failed ({res.returncode}):\n"
                f"{res.stdout}{res.stderr}"
            )
        return res

    def apply_crds(self, directory: Path) -> None:
        """Apply every CRD in `directory` and wait until each is established."""
        self.kubectl("apply", "-f", str(directory), check=True)
        self.kubectl(
            "wait", "--for", "condition=established", "--timeout=60s", "crd", "--all", check=True
        )

    def get(self, kind: str, name: str, namespace: str, *, user: str = ADMIN) -> dict[str, Any]:
        """``kubectl get -o json`` of one object."""
        out = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", user=user, check=True)
        obj: dict[str, Any] = json.loads(out.stdout)
        return obj

    def request(
        self,
        path: str,
        *,
        user: str = ADMIN,
        method: str = "GET",
        body: str | None = None,
        content_type: str = "application/json",
        timeout: float = 5.0,
    ) -> tuple[int, str]:
        """One HTTP request to the apiserver as ``user``: (HTTP status, response body)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        headers = {"Authorization": f"Bearer {self.users[user].token}"}
        if body is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(
            self.server + path,
            data=body.encode() if body is not None else None,
            headers=headers,
            method=method,
        )
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    # -- internals -------------------------------------------------------------------

    def _pick_ports(self) -> None:
        want_api, want_etcd = self._requested_ports
        for port, what in ((want_api, "kube-apiserver"), (want_etcd, "etcd client")):
            if port is not None:
                _check_port_free(port, what)
        free = iter(find_free_ports(3))
        self.apiserver_port = want_api or next(free)
        self.etcd_port = want_etcd or next(free)
        self.etcd_peer_port = next(free)

    def _write_pki(self) -> None:
        pki = self.dir / "pki"
        pki.mkdir(exist_ok=True)
        _ec_key("ca.key", pki)
        _openssl("req", "-x509", "-new", "-key", "ca.key", "-out", "ca.crt", "-days", "3650",
                 "-subj", "/CN=tracekeeper-test-ca",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=pki)  # fmt: skip
        _ec_key("apiserver.key", pki)
        _openssl("req", "-new", "-key", "apiserver.key", "-out", "apiserver.csr",
                 "-subj", "/CN=kube-apiserver", cwd=pki)  # fmt: skip
        sans = ",".join(
            [
                f"IP:{LOOPBACK}",
                "IP:::1",
                *([f"IP:{self.node_ip}"] if self.node_ip else []),
                "IP:10.96.0.1",  # the kubernetes Service's cluster IP
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ]
        )
        (pki / "apiserver.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName={sans}\n"
        )
        _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", "apiserver.crt", "-days", "3650",
                 "-extfile", "apiserver.ext", cwd=pki)  # fmt: skip
        # Service account token signing key pair (ES256).
        _ec_key("sa.key", pki)
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
        _write_front_proxy_pki(pki)

    def _write_tokens(self) -> None:
        lines = []
        for u in self.users.values():
            line = f"{u.token},{u.name},{u.name}"
            if u.groups:
                line += ',"' + ",".join(u.groups) + '"'
            lines.append(line)
        path = self.dir / "tokens.csv"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)

    def _write_kubeconfig(self, user: str) -> None:
        # JSON is valid YAML: no YAML library needed to run this module.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "tracekeeper",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": self.users[user].token}}],
            "contexts": [
                {
                    "name": user,
                    "context": {"cluster": "tracekeeper", "user": user, "namespace": "default"},
                }
            ],
            "current-context": user,
        }
        path = self.kubeconfig(user)
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)

    def _write_state(self) -> None:
        (self.dir / "pids").write_text(
            "".join(f"{name} {pid}\n" for name, pid in self.pids.items())
        )
        state = {
            "server": self.server,
            "ca": str(self.ca_file),
            "kubeconfigs": {u: str(self.kubeconfig(u)) for u in self.users},
            "pids": self.pids,
            "bin_dir": str(self.bin_dir),
        }
        (self.dir / "cluster.json").write_text(json.dumps(state, indent=2) + "\n")

    def _spawn(self, name: str, args: Sequence[str]) -> _Proc:
        log_path = self.dir / f"{name}.log"
        log_file = log_path.open("ab")  # a restarted component's log follows the first's
        popen = subprocess.Popen(
            [str(self.binary(name)), *args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            # Own session: a terminal's Ctrl-C reaches us, and we stop them in order.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        proc = _Proc(name, popen, log_path, log_file)
        with self._lock:
            self._procs.append(proc)
        return proc

    def _poll_until(self, proc: _Proc, what: str, ready: Callable[[], tuple[bool, str]]) -> None:
        """Poll ``ready`` (-> ok, detail) until true; fail early if the process exits, and
        at the deadline, with the log's tail either way."""
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        delay = 0.05
        while True:
            code = proc.popen.poll()
            if code is not None:
                log = _tail(proc.log_path)
                hint = ""
                if "address already in use" in log:
                    hint = " (a port was taken between choosing and binding it; retry)"
                raise ControlPlaneError(
                    f"{proc.name} exited with code {code} before {what}{hint}; "
                    f"{proc.log_path} ends with:\n{log}"
                )
            ok, last = ready()
            if ok:
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{proc.name} not {what} after {self.startup_timeout:.0f}s "
                    f"(last: {last}); {proc.log_path} ends with:\n{_tail(proc.log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _start_etcd(self) -> None:
        client = f"http://{LOOPBACK}:{self.etcd_port}"
        peer = f"http://{LOOPBACK}:{self.etcd_peer_port}"
        proc = self._spawn(
            "etcd",
            [
                "--name=tracekeeper",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=tracekeeper={peer}",
                "--initial-cluster-state=new",
                # Throwaway data: durability buys nothing and fsync dominates latency.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

        def healthy() -> tuple[bool, str]:
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=2) as resp:
                    body = resp.read().decode()
            except (OSError, urllib.error.URLError) as e:
                return False, str(e)
            return '"health":"true"' in body.replace(" ", ""), body

        self._poll_until(proc, "healthy", healthy)

    def _node_flags(self) -> list[str]:
        """Where the apiserver listens and what it admits: loopback only and no
        ServiceAccount admission, or (with a node) the node's address too."""
        enabled, disabled = list(ENABLED_ADMISSION_PLUGINS), list(DISABLED_ADMISSION_PLUGINS)
        if self.node_ip is None:
            return [
                f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}",
                f"--enable-admission-plugins={','.join(enabled)}",
                f"--disable-admission-plugins={','.join(disabled)}",
                # No kubelets or controllers: nothing to reconcile the kubernetes
                # Endpoints for, and a loopback address there is invalid anyway.
                "--endpoint-reconciler-type=none",
            ]
        disabled.remove("ServiceAccount")
        return [
            "--bind-address=0.0.0.0",
            f"--advertise-address={self.node_ip}",
            f"--enable-admission-plugins={','.join([*enabled, 'ServiceAccount'])}",
            f"--disable-admission-plugins={','.join(disabled)}",
            # The agent DaemonSet's hostPID.
            "--allow-privileged=true",
            # The node's hostname resolves to 127.0.0.1 here: kubectl exec and logs go
            # to its InternalIP.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
        ]

    def _start_apiserver(self) -> None:
        pki = self.dir / "pki"
        proc = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://{LOOPBACK}:{self.etcd_port}",
                *self._node_flags(),
                f"--secure-port={self.apiserver_port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={self.dir / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                *_aggregation_flags(pki),
                "--profiling=false",
                "--v=1",
                *self.extra_apiserver_args,
            ],
        )

        def readyz() -> tuple[bool, str]:
            try:
                status, body = self.request("/readyz", timeout=2)
            except OSError as e:
                return False, str(e)
            return status == 200, f"HTTP {status}: {body.strip()[-300:]}"

        self._poll_until(proc, "ready (/readyz)", readyz)

        # /readyz covers the RBAC bootstrap; the system namespaces are created by a
        # controller right after, and tests and the demo expect "default" to exist.
        def default_namespace() -> tuple[bool, str]:
            status, body = self.request("/api/v1/namespaces/default", timeout=2)
            return status == 200, f"HTTP {status}: {body.strip()[-300:]}"

        self._poll_until(proc, "serving the default namespace", default_namespace)


# -- CLI -----------------------------------------------------------------------------------


def _cmd_start(args: argparse.Namespace) -> int:
    bin_dir = Path(args.bin_dir) if args.bin_dir else build_binaries()
    cluster = LocalCluster(
        bin_dir,
        Path(args.dir).resolve(),
        tenants=args.tenant or DEFAULT_TENANTS,
        apiserver_port=args.port,
        startup_timeout=args.timeout,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    # Installed before start: a signal during startup still ends in a clean stop.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        cluster.start()
    except ControlPlaneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        with (cluster.dir / "pids").open("a") as f:
            f.write(f"local_cluster {os.getpid()}\n")
        print(
            f"cluster ready in {time.monotonic() - started:.1f}s at {cluster.server}; "
            f"users: {', '.join(cluster.users)}; logs in {cluster.dir}; Ctrl-C stops it",
            file=sys.stderr,
        )
        print(cluster.kubeconfig(ADMIN), flush=True)
        while not stop.wait(1.0):
            exited = cluster.exited()
            if exited:
                print(f"error: {exited}", file=sys.stderr)
                return 1
        print("stopping", file=sys.stderr)
        return 0
    finally:
        cluster.stop(remove_dir=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run etcd + kube-apiserver until SIGINT/SIGTERM")
    start.add_argument("--dir", required=True, help="cluster directory (created if missing)")
    start.add_argument("--bin-dir", help="binaries (default: run build.sh, cached)")
    start.add_argument("--port", type=int, help="kube-apiserver port (default: a free one)")
    start.add_argument("--tenant", action="append", help="tenant user (default: alice, bob)")
    start.add_argument("--timeout", type=float, default=120.0, help="startup deadline (s)")
    args = parser.parse_args(argv)
    if args.command == "start":
        return _cmd_start(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
