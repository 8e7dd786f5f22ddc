"""A real multi-node Slurm cluster on one machine: one network namespace per node.

Each node is a network namespace (``ip netns``) with one end of a veth pair; the other ends hang
on a bridge in the host's namespace that carries a private /24 chosen at random among subnets the
host does not route. Nothing else is reachable from a node, and every address a daemon or a rank
binds to is one this module created (or a namespace's own loopback). munged and slurmctld are
shared and run on the host side: slurmctld on the bridge's address, munged on a Unix socket in the
cluster's directory (a path socket is reachable from every network namespace). Each node's
``slurmd -N <node>`` runs inside its namespace, in its own UTS namespace (``hostname`` is the node
name, as on a real node) and its own mount namespace, where this cluster's hosts file is bind-
mounted over ``/etc/hosts``: node names resolve on the nodes and for the head-side servers started
through :meth:`NetnsSlurmCluster.head_command` (Prometheus), without touching the host's files.
Jobs started by a slurmd inherit its namespaces, so the ranks of a job on ``node2`` really are on
another host as far as the network is concerned.

:meth:`stop` cancels the jobs and stops the daemons (``SlurmCluster.stop``), then deletes the
namespaces, the veth pairs and the bridge; every wait is bounded.
"""

from __future__ import annotations

import ipaddress
import os
import random
import subprocess
from pathlib import Path

from tests.helpers.slurm_cluster import SlurmCluster, SlurmError, _node_hardware

HEAD = "mimhead"  # the controller's (and the host side's) name on the private subnet

# Runs inside fresh mount + UTS namespaces: this cluster's hosts file, the node's own host name.
_NSEXEC = """\
#!/bin/sh
# nsexec.sh HOSTS NAME CMD...: bind HOSTS over /etc/hosts, set the host name, exec CMD
set -eu
mount --bind "$1" /etc/hosts
hostname "$2"
shift 2
exec "$@"
"""


class NamespacesUnavailable(SlurmError):
    """This machine (or user) may not create network namespaces and veth pairs."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise SlurmError("`ip` not found: install iproute2 (the test cluster's network needs it)") from None
    if check and proc.returncode != 0:
        raise SlurmError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps no route or address of the host."""
    used = []
    for line in (_ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "-o", "addr").stdout).splitlines():
        for word in line.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    rng = random.Random()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randrange(64, 250)}.{rng.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise SlurmError("no free private /24 found for the test cluster")


class NetnsSlurmCluster(SlurmCluster):
    """``nodes`` Slurm nodes ``node1`` .. ``nodeN`` (partition ``debug``), one network namespace each."""

    def __init__(self, nodes: int = 2, root: Path | None = None) -> None:
        super().__init__(root)
        tag = os.urandom(2).hex()
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.bridge = f"mimbr{tag}"
        self.node_names = tuple(f"node{i}" for i in range(1, nodes + 1))
        self.addresses = {HEAD: str(hosts[0]), **{n: str(hosts[i]) for i, n in enumerate(self.node_names, 1)}}
        self.controller = f"{HEAD}({self.addresses[HEAD]})"
        self.netns = {n: f"mimae-{tag}-{n}" for n in self.node_names}
        self.veths = {n: f"mimv{tag}{i}" for i, n in enumerate(self.node_names, 1)}
        self.hosts_file = self.root / "hosts"
        self.nsexec = self.root / "nsexec.sh"
        self._made: list[tuple[str, ...]] = []  # `ip` objects created, deleted in reverse on stop

    # -- network ---------------------------------------------------------------------------------

    def _start_network(self) -> None:
        probe = self.netns[self.node_names[0]]
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            why = f"ip netns add failed ({made.stderr.strip()})"
            if any(w in made.stderr for w in ("Operation not permitted", "Permission denied")):
                raise NamespacesUnavailable(f"{why}: network namespaces are not permitted here "
                                            "(they need CAP_SYS_ADMIN and CAP_NET_ADMIN)")
            raise SlurmError(why)
        self._made.append(("netns", "del", probe))
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", "del", self.bridge))
        _ip("addr", "add", f"{self.addresses[HEAD]}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node in self.node_names:
            ns, veth = self.netns[node], self.veths[node]
            if ns != probe:
                _ip("netns", "add", ns)
                self._made.append(("netns", "del", ns))
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._made.append(("link", "del", veth))
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[node]}/{prefix}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        lines = ["127.0.0.1 localhost", *(f"{addr} {name}" for name, addr in self.addresses.items())]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        self.nsexec.write_text(_NSEXEC)

    def _stop_network(self) -> None:
        # Deleting a namespace takes its end of each veth with it; the host ends may linger a moment.
        for args in reversed(self._made):
            _ip(*args, check=False)
        self._made.clear()

    def node_command(self, node: str, cmd: list[str]) -> list[str]:
        """``cmd`` as run on ``node``: its network namespace, host name and hosts file."""
        # nsenter rather than `ip netns exec`, which mounts a fresh /sys and so hides the cgroup
        # file system slurmd needs
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", *self.head_command(cmd, hostname=node)]

    def head_command(self, cmd: list[str], hostname: str = HEAD) -> list[str]:
        """``cmd`` on the host side of the bridge, resolving node names through this cluster's hosts file."""
        return ["unshare", "--mount", "--uts", "--propagation", "private",
                "/bin/sh", str(self.nsexec), str(self.hosts_file), hostname, *cmd]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, ready_timeout: float = 60.0) -> NetnsSlurmCluster:
        try:
            self._start_network()
        except BaseException:
            self._stop_network()
            raise
        try:
            return super().start(ready_timeout)
        except BaseException:
            self._stop_network()
            raise

    def stop(self, timeout: float = 60.0) -> None:
        try:
            super().stop(timeout)
        finally:
            self._stop_network()

    def _start_daemons(self) -> None:
        self._spawn("slurmctld", self.head_command(["slurmctld", "-D", "-c", "-f", str(self.conf)]))
        for node in self.node_names:
            (self.root / "spool" / node).mkdir()
            self._spawn(f"slurmd-{node}", self.node_command(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)]))

    def _nodes_conf(self) -> str:
        r, hardware = self.root, _node_hardware()
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.addresses[n]} NodeHostname={n} {hardware} State=UNKNOWN"
                          for n in self.node_names)
        return f"""\
SlurmdSpoolDir={r / "spool"}/%n
SlurmdPidFile={r}/slurmd-%n.pid
SlurmdLogFile={r}/slurmd-%n.log
{nodes}"""
