"""A real single node beside the test control plane: containerd, kubelet, scheduler, kube-proxy.

Pods really run: containerd (with Debian's runc and CNI plugins) runs them, the bridge CNI wires
them to a bridge of their own, kube-proxy (iptables) makes ClusterIP Services work, and CoreDNS
and local-path-provisioner run as pods from images assembled locally (hack/node/images.py).
See docs/test-control-plane.md, "The node".

Safety first: before anything starts, the pod, Service and node ranges are routed to a blackhole
(rules of ours handle the addresses really in use), pods get routes to the cluster's ranges only,
and the host never forwards between the pods' bridge and any other interface; so no packet for
or from the cluster leaves the machine, even when a rule is missing. One node per machine at a
time: an flock on ``LOCK_PATH``. Everything the node makes outside its work directory is recorded
in ``STATE_PATH`` as it is made, so ``teardown`` removes it all, also after a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from tests.support.controlplane import (
    BIN_DIR,
    REPO,
    SERVICE_CIDR,
    STATE_DIR,
    Cluster,
    ControlPlaneError,
    find_tools,
    free_port,
)

NODE_NAME = "memspace-test-node"
# The node's address: a /32 on lo. kubelet refuses 127.0.0.0/8, the kernel here has no dummy
# links, and the apiserver must be reachable from pods, so it is an address of TEST-NET-2
# (RFC 5737: documentation only, never routed on the internet). Not TEST-NET-1: machines here
# may use 192.0.2.0/24 for their own network. `check_ranges` refuses to start on any overlap.
NODE_IP = "198.51.100.10"
NODE_RANGE = "198.51.100.0/24"
CLUSTER_CIDR = "10.244.0.0/16"  # every pod address; blackholed but for the bridge's subnet
POD_SUBNET = "10.244.0.0/24"  # the bridge's subnet (host-local IPAM)
POD_GATEWAY = "10.244.0.1"
DNS_IP = "10.0.0.10"  # CoreDNS's Service, inside SERVICE_CIDR
BRIDGE = "memspace0"
FORWARD_CHAIN = "MEMSPACE-NODE-FORWARD"
BLACKHOLES = (CLUSTER_CIDR, SERVICE_CIDR, NODE_RANGE)
NODE_TOOLS = (
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "kubelet",
    "kube-scheduler",
    "kube-proxy",
)
IMAGES_DIR = Path(os.environ.get("MEMSPACE_NODE_IMAGES_DIR", STATE_DIR / "images"))
IMAGES = ("pause", "coredns", "local-path-provisioner", "busybox")
BUSYBOX_IMAGE = "memspace.test/busybox:1"  # a toolbox for tests: sh, wget, nslookup, ...
STORAGE_CLASS = "local-path"  # the default: WaitForFirstConsumer, as on kind
IMMEDIATE_STORAGE_CLASS = (
    "local-path-immediate"  # binds at once (one node: no topology to wait for)
)

# Machine-wide: one node per machine, whatever checkout or test run starts it.
RUN_DIR = Path("/run/memspace-test-node")
LOCK_PATH = RUN_DIR / "lock"
SHIM_SOCKETS = RUN_DIR / "s"  # containerd allows at most 42 characters
STATE_PATH = RUN_DIR / "state.json"
LOCK_TIMEOUT = float(os.environ.get("MEMSPACE_NODE_LOCK_TIMEOUT", "900"))
# What kubelet and containerd write outside their own directories.
OUTSIDE_PATHS = (
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
    "/run/netns",
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_NAMES = ("kubepods", "k8s.io")
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
)
OUR_CHAINS = re.compile(r"^(KUBE-|CNI-|MEMSPACE-)")


class NodeError(RuntimeError):
    """The node did not start, or the machine cannot host it safely."""


def run(*argv: str, check: bool = True, input: str | None = None) -> str:
    """Run a host command; its stdout, or a NodeError carrying its stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if check and result.returncode != 0:
        raise NodeError(f"{shlex.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


# --- the machine: ranges, routes, locks -----------------------------------------------------------


def check_ranges() -> None:
    """Refuse to start if the node's ranges overlap a route, an address or a resolver here."""
    ours = [ipaddress.ip_network(cidr) for cidr in BLACKHOLES]
    seen: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    kinds = ("unicast", "local", "broadcast", "blackhole", "unreachable", "prohibit", "throw")
    for line in run("ip", "-4", "-o", "route", "show", "table", "all").splitlines():
        words = line.split()
        kind = words.pop(0) if words and words[0] in kinds else "unicast"
        if not words or words[0] == "default" or BRIDGE in words or NODE_IP in words[:1]:
            continue
        if kind == "blackhole" and words[0] in BLACKHOLES:
            continue  # ours, from an earlier start
        with contextlib.suppress(ValueError):
            seen.append((f"route {line.strip()}", ipaddress.ip_network(words[0], strict=False)))
    for line in run("ip", "-4", "-o", "addr", "show").splitlines():
        words = line.split()
        if "inet" in words and words[1] != BRIDGE:
            address = ipaddress.ip_interface(words[words.index("inet") + 1])
            if str(address.ip) != NODE_IP:
                seen.append((f"address {address} on {words[1]}", address.network))
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    seen.append((f"resolver {words[1]}", ipaddress.ip_network(words[1])))
    for what, network in seen:
        for mine in ours:
            if network.version == mine.version and network.overlaps(mine):
                raise NodeError(
                    f"the test node's range {mine} overlaps this machine's {what}: the node "
                    "would shadow it. Nothing was started."
                )


def succeeds(*argv: str) -> bool:
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def add_blackholes() -> None:
    """Route the pod, Service and node ranges nowhere: only rules of ours reach inside them."""
    for cidr in BLACKHOLES:
        run("ip", "route", "replace", "blackhole", cidr, "proto", "static", "metric", "4000")


def remove_blackholes() -> None:
    for cidr in BLACKHOLES:
        run(
            "ip",
            "route",
            "del",
            "blackhole",
            cidr,
            "proto",
            "static",
            "metric",
            "4000",
            check=False,
        )


def add_forward_guard() -> None:
    """The host never forwards between the pods' bridge and another interface, either way.

    In the mangle table, whose FORWARD hook runs before the filter table's: no rule that
    kube-proxy or the CNI put first in filter FORWARD (their ACCEPTs) can come before it.
    """
    for binary in ("iptables", "ip6tables"):
        table = (binary, "-w", "-t", "mangle")
        run(*table, "-N", FORWARD_CHAIN, check=False)
        run(*table, "-F", FORWARD_CHAIN)
        run(*table, "-A", FORWARD_CHAIN, "-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP")
        run(*table, "-A", FORWARD_CHAIN, "!", "-i", BRIDGE, "-o", BRIDGE, "-j", "DROP")
        if not succeeds(*table, "-C", "FORWARD", "-j", FORWARD_CHAIN):
            run(*table, "-I", "FORWARD", "1", "-j", FORWARD_CHAIN)


@contextlib.contextmanager
def machine_lock(timeout: float = LOCK_TIMEOUT) -> Iterator[int]:
    """Hold the one-node-per-machine lock (waiting up to ``timeout`` s); yields its descriptor."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise NodeError(
                        f"another test node runs on this machine (lock {LOCK_PATH}); "
                        "`make cluster-down` stops one started by `make cluster`"
                    ) from None
                time.sleep(1)
        yield fd
    finally:
        os.close(fd)


# --- processes ------------------------------------------------------------------------------------


def _exe_name(pid: int) -> str | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name
    except OSError:
        return None


def _exe_path(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def shims_of(socket: str) -> list[int]:
    """The runc shims of the containerd at ``socket`` (they outlive it)."""
    return [
        pid
        for pid in _pids()
        if _exe_name(pid) == "containerd-shim-runc-v2" and socket in _cmdline(pid)
    ]


def _cgroup_dirs() -> list[Path]:
    """Every cgroup directory of the node (kubepods, k8s.io) in every hierarchy, deepest first."""
    found: list[Path] = []
    if not CGROUP_ROOT.is_dir():
        return found
    for hierarchy in CGROUP_ROOT.iterdir():
        for name in CGROUP_NAMES:
            top = hierarchy / name
            if top.is_dir() and not top.is_symlink():
                found.extend(Path(d) for d, _, _ in os.walk(top))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _cgroup_pids() -> set[int]:
    pids: set[int] = set()
    for cgroup in _cgroup_dirs():
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(p) for p in (cgroup / "cgroup.procs").read_text().split())
    return pids


def _kill_and_wait(pids: Sequence[int] | set[int], timeout: float = 20.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]:
            return
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Is ``pid`` a running process (not gone, not a zombie waiting for its reaper)?"""
    return Path(f"/proc/{pid}").exists() and not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# --- state kept while a node lives ----------------------------------------------------------------


def _load_state() -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(STATE_PATH.read_text())
    except (OSError, ValueError):
        return None
    return state


def _save_state(state: dict[str, Any]) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_PATH.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(STATE_PATH)


def own_state(workdir: Path) -> dict[str, Any] | None:
    """The machine's node state if it is the node whose work directory is ``workdir``."""
    state = _load_state()
    if state is None or Path(state.get("workdir", "")) != Path(workdir):
        return None
    return state


def teardown_own(workdir: Path) -> list[str]:
    """Tear down the node of ``workdir`` (``make cluster-down``), leaving any other node alone."""
    state = own_state(workdir)
    return teardown(state) if state is not None else []


def _read_sysctl(name: str) -> str | None:
    try:
        return (Path("/proc/sys") / name).read_text().strip()
    except OSError:
        return None


def _write_sysctl(name: str, value: str) -> None:
    with contextlib.suppress(OSError):
        (Path("/proc/sys") / name).write_text(value)


def teardown(state: dict[str, Any] | None = None) -> list[str]:
    """Remove everything a node made (recorded in ``state``, else in STATE_PATH); idempotent.

    Works after a crash too: recorded PIDs are checked before they are killed (a PID may have
    been reused), shims are found by their containerd socket and pods by their cgroups. Returns
    notes of what could not be removed (empty when all is clean).
    """
    state = state if state is not None else (_load_state() or {})
    notes: list[str] = []
    # 1. The node's processes (kubelet first, so it restarts nothing), then shims and containers.
    pids = dict(state.get("pids", {}))
    holder = pids.pop("lock-holder", None)  # released last: no other node starts meanwhile
    order = ("kubelet", "kube-proxy", "kube-scheduler", "containerd")
    for name in sorted(pids, key=lambda n: order.index(n) if n in order else -1):
        pid = pids[name]
        if _exe_name(pid) == name and not _zombie(pid):  # else gone, or the PID was reused
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _kill_and_wait([pid])
    socket = state.get("containerd_socket")
    if socket:
        _kill_and_wait(shims_of(socket))
    for _ in range(3):
        if not (left := _cgroup_pids()):
            break
        _kill_and_wait(left)
    # 2. Mounts: pods' volumes, rootfs overlays, shm, network namespaces (deepest first).
    workdir = state.get("workdir")
    roots = [*OUTSIDE_PATHS, "/var/run/netns", *([workdir] if workdir else [])]
    for mount_point in _mounts_under(roots):
        run("umount", "-l", mount_point, check=False)
    if mounts_left := _mounts_under(roots):
        notes.append(f"mounts left: {mounts_left}")
    # 3. Network: veths and the bridge, iptables chains, the node's address, routes come last.
    for link in _links_of_bridge():
        run("ip", "link", "del", link, check=False)
    run("ip", "link", "del", BRIDGE, check=False)
    for binary in ("iptables", "ip6tables"):
        _remove_chains(binary)
    run("ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo", check=False)
    # 4. cgroups, deepest first (empty once their processes are gone).
    for cgroup in _cgroup_dirs():
        with contextlib.suppress(OSError):
            cgroup.rmdir()
    if left_cgroups := _cgroup_dirs():
        notes.append(f"cgroups left: {[str(c) for c in left_cgroups[:5]]}")
    # 5. Files kubelet, containerd and the CNI write outside their directories.
    created = set(state.get("created", OUTSIDE_PATHS))
    for path in OUTSIDE_PATHS:
        target = Path(path)
        if path in created:
            shutil.rmtree(target, ignore_errors=True)
        elif path == "/run/netns" and target.is_dir():
            for entry in target.glob("cni-*"):
                entry.unlink(missing_ok=True)
    shutil.rmtree(SHIM_SOCKETS, ignore_errors=True)
    if workdir:
        for sub in ("containerd", "kubelet", "local-path", "cni"):
            shutil.rmtree(Path(workdir) / sub, ignore_errors=True)
    # 6. Settings, then the blackholes, then the record.
    for name, value in state.get("sysctls", {}).items():
        if value is not None:
            _write_sysctl(name, value)
    remove_blackholes()
    STATE_PATH.unlink(missing_ok=True)
    if holder is not None and _exe_name(holder) == "sleep" and not _zombie(holder):
        _kill_and_wait([holder])
    return notes


def _mounts_under(roots: Sequence[str]) -> list[str]:
    prefixes = [str(Path(r).resolve()) if Path(r).exists() else r for r in roots]
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def _links_of_bridge() -> list[str]:
    out = run("ip", "-o", "link", "show", "master", BRIDGE, check=False)
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _remove_chains(binary: str) -> None:
    """Delete the KUBE-*, CNI-* and MEMSPACE-* chains of every table, and the jumps to them."""
    saved = run(f"{binary}-save", check=False)
    table = ""
    jumps: list[tuple[str, list[str]]] = []
    raw_jumps: list[tuple[str, str]] = []  # as iptables-save wrote them (its quoting)
    chains: dict[str, list[str]] = {}
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":") and OUR_CHAINS.match(line[1:]):
            chains.setdefault(table, []).append(line[1:].split()[0])
        elif line.startswith("-A "):
            words = shlex.split(line)
            chain = words[1]
            target = words[words.index("-j") + 1] if "-j" in words else ""
            if not OUR_CHAINS.match(chain) and OUR_CHAINS.match(target):
                jumps.append((table, words[1:]))
                raw_jumps.append((table, line[3:]))
    # One iptables-restore per table (kube-proxy makes hundreds of chains); rule by rule if not.
    for table in sorted({t for t, _ in jumps} | set(chains)):
        batch = [f"*{table}"]
        batch += [f"-D {rule}" for t, rule in raw_jumps if t == table]
        batch += [f"-F {name}" for name in chains.get(table, [])]
        batch += [f"-X {name}" for name in chains.get(table, [])]
        restore = subprocess.run(
            [f"{binary}-restore", "-w", "--noflush"],
            input="\n".join([*batch, "COMMIT", ""]),
            capture_output=True,
            text=True,
            check=False,
        )
        if restore.returncode == 0:
            jumps = [(t, rule) for t, rule in jumps if t != table]
            chains.pop(table, None)
    for table, rule in jumps:
        run(binary, "-w", "-t", table, "-D", *rule, check=False)
    for table, names in chains.items():
        for name in names:
            run(binary, "-w", "-t", table, "-F", name, check=False)
        for name in names:
            run(binary, "-w", "-t", table, "-X", name, check=False)


def snapshot() -> dict[str, list[str]]:
    """What a node leaves on the machine, for a before/after comparison."""
    chains = []
    for binary in ("iptables", "ip6tables"):
        table = ""
        for line in run(f"{binary}-save", check=False).splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":") and OUR_CHAINS.match(line[1:]):
                chains.append(f"{binary} {table} {line[1:].split()[0]}")
            elif line.startswith("-A ") and re.search(r"-j (KUBE-|CNI-|MEMSPACE-)", line):
                chains.append(f"{binary} {table} {line}")
    routes = [
        line.strip()
        for line in run("ip", "-4", "route", "show", "table", "all").splitlines()
        if any(part in line for part in ("10.244.", "10.0.0.", "198.51.100.", BRIDGE))
    ]
    links = [
        line.split(":")[1].strip()
        for line in run("ip", "-o", "link").splitlines()
        if BRIDGE in line or "veth" in line
    ]
    addresses = [
        line.split()[3] for line in run("ip", "-o", "-4", "addr").splitlines() if NODE_IP in line
    ]
    ours = {str(path.resolve()) for path in find_tools(BIN_DIR, NODE_TOOLS).values()}
    processes = sorted(
        f"{pid} {exe}"
        for pid in _pids()
        if (exe := _exe_path(pid)) in ours
        or Path(exe).name in ("coredns", "local-path-provisioner", "pause")
    )
    return {
        "routes": sorted(routes),
        "links": sorted(links),
        "addresses": addresses,
        "iptables": sorted(chains),
        "mounts": _mounts_under([*OUTSIDE_PATHS, "/var/run/netns"]),
        "cgroups": sorted(str(c) for c in _cgroup_dirs()),
        "paths": [p for p in OUTSIDE_PATHS if Path(p).exists() and p != "/run/netns"],
        "netns": sorted(str(p) for p in Path("/run/netns").glob("cni-*")),
        "processes": processes,
        "sysctls": [f"{name}={_read_sysctl(name)}" for name in SYSCTLS],
        "state": [str(p) for p in (STATE_PATH, SHIM_SOCKETS) if p.exists()],
    }


# --- the node -------------------------------------------------------------------------------------


class Node:
    """The node of ``cluster``: started around its control plane, torn down without a trace.

    ``start()`` prepares the machine (lock, blackholes, the node address), starts the control
    plane if it is not running, then containerd, kubelet, kube-scheduler and kube-proxy, imports
    the node's images and deploys CoreDNS and local-path-provisioner; it returns once the node is
    Ready, both are Available and kube-proxy serves the DNS Service. ``stop()`` removes it all.
    """

    def __init__(
        self,
        cluster: Cluster,
        workdir: Path,
        *,
        bin_dir: Path | None = None,
        images_dir: Path = IMAGES_DIR,
    ) -> None:
        self.cluster = cluster
        self.tools = find_tools(bin_dir or cluster.bin_dir, NODE_TOOLS)
        self.images_dir = images_dir
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.socket = str(workdir / "containerd" / "containerd.sock")
        self.name = NODE_NAME
        self.ip = NODE_IP
        self.state: dict[str, Any] = {}
        self.before: dict[str, list[str]] = {}  # snapshot() of the machine before it started
        self.after: dict[str, list[str]] = {}  # and after stop() (taken under the lock)
        self.timings: dict[str, float] = {}  # seconds from start() to each step
        self._t0 = time.monotonic()
        self._processes: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
        self._lock: contextlib.ExitStack | None = None
        self._lock_fd: int | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 300.0, *, lock_timeout: float = LOCK_TIMEOUT) -> None:
        if os.geteuid() != 0:
            raise NodeError("the test node needs root (network, mounts, cgroups)")
        for image in IMAGES:
            if not (self.images_dir / f"{image}.tar").exists():
                raise NodeError(f"{self.images_dir}/{image}.tar is missing: run `make k8s-tools`")
        if len(self.socket) > 100:
            raise NodeError(
                f"containerd's socket path is too long for a unix socket: {self.socket}"
            )
        self._lock = contextlib.ExitStack()
        self._lock_fd = self._lock.enter_context(machine_lock(lock_timeout))
        deadline = time.monotonic() + timeout  # from the moment the machine is ours
        try:
            if (stale := _load_state()) is not None:
                teardown(stale)  # a node that crashed: its leftovers go first
            self.before = snapshot()
            self._t0 = time.monotonic()
            self.timings = {}
            self._prepare_machine()
            if not self.cluster.groups:
                self.cluster.start()
                self._mark("control plane ready")
            self._start_components(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> list[str]:
        """Stop the node and remove all it made; notes of anything left (normally none)."""
        notes = teardown(self.state) if self.state else []
        if self.state:
            self.after = snapshot()  # while the lock is held: no other node has started yet
        self.state = {}
        for process, log in self._processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)  # killed by teardown: reap it
            log.close()
        self._processes.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = self._lock_fd = None
        return notes

    def detach(self) -> None:
        """Let the node outlive this process (``make cluster``); a holder process keeps the lock."""
        assert self._lock_fd is not None
        holder = subprocess.Popen(
            ["sleep", "infinity"],
            pass_fds=(self._lock_fd,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.state["pids"]["lock-holder"] = holder.pid
        _save_state(self.state)
        for _, log in self._processes.values():
            log.close()
        self._processes.clear()
        if self._lock is not None:
            self._lock.close()  # the holder's copy of the descriptor keeps the lock
            self._lock = self._lock_fd = None

    def _prepare_machine(self) -> None:
        """Before anything starts: check the ranges, blackhole them, guard forwarding."""
        check_ranges()
        self.state = {
            "workdir": str(self.workdir),
            "containerd_socket": self.socket,
            "pids": {},
            "sysctls": {name: _read_sysctl(name) for name in SYSCTLS},
            "created": [path for path in OUTSIDE_PATHS if not Path(path).exists()],
        }
        _save_state(self.state)
        add_blackholes()
        add_forward_guard()
        run("ip", "addr", "replace", f"{NODE_IP}/32", "dev", "lo")
        for name in ("net/ipv4/ip_forward", *SYSCTLS[2:]):
            if _read_sysctl(name) is None:
                raise NodeError(f"/proc/sys/{name} is missing: the node needs it")
            _write_sysctl(name, "1")

    def _start_components(self, deadline: float) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        config = self._write_configs()
        self._spawn("containerd", ["--config", str(config["containerd"])])
        self._wait("containerd", deadline, lambda: succeeds(*self.ctr(), "version"))
        self._mark("containerd ready")
        for image in IMAGES:
            self.import_image(self.images_dir / f"{image}.tar")
        self._mark("images imported")
        kubeconfig = str(self.cluster.kubeconfig)
        self._spawn(
            "kubelet",
            [
                f"--config={config['kubelet']}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--root-dir={self.workdir / 'kubelet'}",
                f"--cert-dir={self.workdir / 'kubelet-pki'}",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
            ],
        )
        self._spawn("kube-proxy", [f"--config={config['kube-proxy']}"])
        self._wait("the node to be Ready", deadline, self._node_ready)
        self._mark("node Ready")
        self.cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(self._addons()))
        for namespace, name in (("kube-system", "coredns"), ("local-path-storage", "local-path")):
            left = max(1, int(deadline - time.monotonic()))
            self.cluster.kubectl(
                "rollout",
                "status",
                f"deployment/{name}",
                "-n",
                namespace,
                f"--timeout={left}s",
                timeout=left + 10,
            )
        self._wait("kube-proxy to serve the DNS Service", deadline, self._dns_service_ready)
        self._mark("CoreDNS and local-path-provisioner serving")

    def _mark(self, step: str) -> None:
        self.timings[step] = round(time.monotonic() - self._t0, 1)

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        path = os.environ.get("PATH", "/usr/bin:/bin")
        process = subprocess.Popen(
            [str(self.tools[name]), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # containerd finds its shim on PATH; kubelet and kube-proxy need iptables, mount.
            env={**os.environ, "PATH": f"{self.tools[name].parent}:{path}:/usr/sbin:/sbin"},
        )
        self._processes[name] = (process, log)
        self.state["pids"][name] = process.pid
        _save_state(self.state)
        self.cluster.watch(process.pid)

    def _wait(self, what: str, deadline: float, ready: Any) -> None:
        while True:
            for name, (process, _) in self._processes.items():
                if process.poll() is not None:
                    raise NodeError(f"{name} exited ({process.returncode}):\n{self.log_tail(name)}")
            with contextlib.suppress(OSError, ControlPlaneError, subprocess.SubprocessError):
                if ready():
                    return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in self._processes)
                raise NodeError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _node_ready(self) -> bool:
        status, body = self.cluster.request("GET", f"/api/v1/nodes/{NODE_NAME}")
        conditions = body.get("status", {}).get("conditions", []) if status == 200 else []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _dns_service_ready(self) -> bool:
        nat = run("iptables-save", "-t", "nat")
        return all(
            re.search(rf"-A KUBE-SERVICES -d {DNS_IP}/32 -p {proto} .*-j KUBE-SVC-", nat)
            for proto in ("udp", "tcp")
        )

    # --- using it ---------------------------------------------------------------------------------

    def ctr(self) -> list[str]:
        """The ctr command line for this node's containerd (namespace k8s.io, kubelet's)."""
        return [str(self.tools["ctr"]), f"--address={self.socket}", "--namespace=k8s.io"]

    def import_image(self, tar: Path) -> list[str]:
        """Import a `docker save`-format tar into the node; returns the image names it held.

        Pods then use it by that name with ``imagePullPolicy: Never`` (or ``IfNotPresent``).
        """
        if not Path(tar).is_file():
            raise NodeError(f"no image tar at {tar}")
        before = set(self.images())
        run(*self.ctr(), "images", "import", "--no-unpack=false", str(tar))
        return sorted(set(self.images()) - before) or [
            line.split()[0]
            for line in run(*self.ctr(), "images", "list").splitlines()[1:]
            if line.split()[0] in before
        ]

    def images(self) -> list[str]:
        """The image names the node's containerd holds."""
        out = run(*self.ctr(), "images", "list", "--quiet")
        return sorted(out.split())

    def wait_for_service_account(self, namespace: str, timeout: float = 60) -> None:
        """Wait for the ``default`` ServiceAccount of ``namespace``: pods need it to be created."""
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/default"
        deadline = time.monotonic() + timeout
        self._wait(
            f"ServiceAccount {namespace}/default",
            deadline,
            lambda: self.cluster.request("GET", path)[0] == 200,
        )

    # --- configuration ----------------------------------------------------------------------------

    def _write_configs(self) -> dict[str, Path]:
        conf = self.workdir / "conf"
        cni_conf = conf / "cni"
        cni_conf.mkdir(parents=True, exist_ok=True)
        containerd = self.workdir / "containerd"
        containerd.mkdir(parents=True, exist_ok=True)
        pki = self.cluster.pki
        # pods: routes to the cluster's ranges and the node only; no default route, no masquerade.
        (cni_conf / "10-memspace.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "memspace-test",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "isDefaultGateway": False,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_SUBNET, "gateway": POD_GATEWAY}]],
                                "routes": [
                                    {"dst": CLUSTER_CIDR},
                                    {"dst": SERVICE_CIDR},
                                    {"dst": f"{NODE_IP}/32"},
                                ],
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=2,
            )
        )
        toml = f"""\
version = 3
root = "{containerd / "root"}"
state = "{containerd / "state"}"
disabled_plugins = ["io.containerd.nri.v1.nri"]
imports = []

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

# Shim sockets and runc's state of our own, not in /run/containerd (which other engines share).
[plugins."io.containerd.shim.v1.manager"]
  socket_dir = "{SHIM_SOCKETS}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{containerd / "opt"}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "memspace.test/pause:1"

[plugins."io.containerd.cri.v1.runtime"]
  # The VM lacks CAP_SYS_RESOURCE: runc cannot lower a container's oom_score_adj below ours.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{containerd / "state" / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""
        (conf / "containerd.toml").write_text(toml)
        resolv = conf / "resolv.conf"  # pods never learn the machine's resolvers
        resolv.write_text("")
        kubelet = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 0,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs",
            "failSwapOn": False,
            "failCgroupV1": False,
            "clusterDNS": [DNS_IP],
            "clusterDomain": "cluster.local",
            "resolvConf": str(resolv),
            "volumePluginDir": str(self.workdir / "kubelet-plugins"),
            "serializeImagePulls": False,
            # Images cannot be pulled again here: never collect them, evict only when really full.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "shutdownGracePeriod": "0s",
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
        }
        (conf / "kubelet.json").write_text(json.dumps(kubelet, indent=2))
        proxy = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.cluster.kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "mode": "iptables",
            "clusterCIDR": CLUSTER_CIDR,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [f"{NODE_IP}/32"],  # never on the machine's own interfaces
            # Leave the machine's conntrack settings alone.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
            "iptables": {"syncPeriod": "30s", "minSyncPeriod": "0s"},
        }
        (conf / "kube-proxy.json").write_text(json.dumps(proxy, indent=2))
        return {
            "containerd": conf / "containerd.toml",
            "kubelet": conf / "kubelet.json",
            "kube-proxy": conf / "kube-proxy.json",
        }

    def _addons(self) -> dict[str, Any]:
        """CoreDNS and local-path-provisioner (the default StorageClass), as one List."""
        version = _versions()
        corefile = """\
.:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
}
"""  # no `forward`: names outside the cluster never leave the machine
        local_path = self.workdir / "local-path"
        for sub in ("node", "any"):
            (local_path / sub).mkdir(parents=True, exist_ok=True)
        helper_pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "helper-pod"},
            "spec": {
                "priorityClassName": "system-node-critical",
                "tolerations": [{"key": "node.kubernetes.io/disk-pressure", "operator": "Exists"}],
                "containers": [
                    {"name": "helper-pod", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never"}
                ],
            },
        }
        lpp = "local-path-provisioner"
        items: list[dict[str, Any]] = [
            _obj("v1", "ServiceAccount", "coredns", "kube-system"),
            _obj(
                "rbac.authorization.k8s.io/v1",
                "ClusterRole",
                "system:coredns",
                rules=[
                    {
                        "apiGroups": [""],
                        "resources": ["endpoints", "services", "pods", "namespaces"],
                        "verbs": ["list", "watch"],
                    },
                    {
                        "apiGroups": ["discovery.k8s.io"],
                        "resources": ["endpointslices"],
                        "verbs": ["list", "watch"],
                    },
                ],
            ),
            _binding("system:coredns", "coredns", "kube-system"),
            _obj("v1", "ConfigMap", "coredns", "kube-system", data={"Corefile": corefile}),
            _deployment(
                "coredns",
                "kube-system",
                "coredns",
                image=f"memspace.test/coredns:{version['COREDNS_VERSION']}",
                args=["-conf", "/etc/coredns/Corefile"],
                config="coredns",
                mount="/etc/coredns",
                extra={
                    "dnsPolicy": "Default",
                    "priorityClassName": "system-cluster-critical",
                },
                ports=[
                    {"containerPort": 53, "protocol": proto, "name": f"dns-{proto.lower()}"}
                    for proto in ("UDP", "TCP")
                ],
                probe={"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 1},
            ),
            _obj(
                "v1",
                "Service",
                "kube-dns",
                "kube-system",
                spec={
                    "clusterIP": DNS_IP,
                    "selector": {"app": "coredns"},
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP"},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    ],
                },
            ),
            _obj("v1", "Namespace", "local-path-storage"),
            _obj("v1", "ServiceAccount", lpp, "local-path-storage"),
            # A throwaway test cluster: the provisioner (and its helper pods) act as admin.
            _binding("cluster-admin", lpp, "local-path-storage", name=lpp),
            _obj(
                "v1",
                "ConfigMap",
                "local-path-config",
                "local-path-storage",
                data={
                    "config.json": json.dumps(
                        {
                            "storageClassConfigs": {
                                STORAGE_CLASS: {
                                    "nodePathMap": [
                                        {
                                            "node": "DEFAULT_PATH_FOR_NON_LISTED_NODES",
                                            "paths": [str(local_path / "node")],
                                        }
                                    ]
                                },
                                # A "shared file system" needs no node: it binds before any pod.
                                IMMEDIATE_STORAGE_CLASS: {
                                    "sharedFileSystemPath": str(local_path / "any")
                                },
                            }
                        }
                    ),
                    # World-writable, so that non-root pods (uid 10001) can write their volumes.
                    "setup": 'set -eu\nmkdir -m 0777 -p "$VOL_DIR"\n',
                    "teardown": 'set -eu\nrm -rf "$VOL_DIR"\n',
                    "helperPod.yaml": json.dumps(helper_pod),
                },
            ),
            _deployment(
                "local-path",
                "local-path-storage",
                lpp,
                image=f"memspace.test/{lpp}:{version['LOCAL_PATH_PROVISIONER_VERSION']}",
                args=[
                    "--debug",
                    "start",
                    "--config",
                    "/etc/config/config.json",
                    "--service-account-name",
                    lpp,
                    "--helper-image",
                    BUSYBOX_IMAGE,
                ],
                config="local-path-config",
                mount="/etc/config",
                env=[
                    {
                        "name": "POD_NAMESPACE",
                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                    },
                    {"name": "CONFIG_MOUNT_PATH", "value": "/etc/config/"},
                ],
            ),
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {
                    "name": STORAGE_CLASS,
                    "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
                },
                "provisioner": "rancher.io/local-path",
                "reclaimPolicy": "Delete",
                "volumeBindingMode": "WaitForFirstConsumer",
            },
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {"name": IMMEDIATE_STORAGE_CLASS},
                "provisioner": "rancher.io/local-path",
                "reclaimPolicy": "Delete",
                "volumeBindingMode": "Immediate",
            },
        ]
        return {"apiVersion": "v1", "kind": "List", "items": items}


def _versions() -> dict[str, str]:
    values = {}
    for line in (REPO / "hack" / "k8s" / "versions.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _obj(
    api: str, kind: str, name: str, namespace: str | None = None, **fields: Any
) -> dict[str, Any]:
    metadata: dict[str, str] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": api, "kind": kind, "metadata": metadata, **fields}


def _binding(role: str, account: str, namespace: str, name: str | None = None) -> dict[str, Any]:
    return _obj(
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        name or role,
        roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        subjects=[{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    )


def _deployment(
    name: str,
    namespace: str,
    account: str,
    *,
    image: str,
    args: list[str],
    config: str,
    mount: str,
    extra: dict[str, Any] | None = None,
    env: list[dict[str, Any]] | None = None,
    ports: list[dict[str, Any]] | None = None,
    probe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "Never",
        "args": args,
        "volumeMounts": [{"name": "config", "mountPath": mount, "readOnly": True}],
        "env": env or [],
        "ports": ports or [],
    }
    if probe:
        container["readinessProbe"] = probe
    return _obj(
        "apps/v1",
        "Deployment",
        name,
        namespace,
        spec={
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "serviceAccountName": account,
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": config}}],
                    "tolerations": [{"operator": "Exists"}],
                    **(extra or {}),
                },
            },
        },
    )
