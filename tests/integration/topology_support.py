"""Real Redis topologies on loopback for the scaling tests: Sentinel (primary, replica, 3 sentinels)
and Cluster (3 primaries), each a set of redis-server children in a temp dir.

    with SentinelSet(tmp_path, base_port=17300) as sentinels:
        url = sentinels.url()                  # redis+sentinel://127.0.0.1:17302,.../mymaster/0
        sentinels.kill_primary()               # kill -9; the sentinels promote the replica
    with ClusterSet(tmp_path, base_port=17400) as cluster:
        url = cluster.url()                    # redis+cluster://127.0.0.1:17400,...

Ports come from the range the caller passes (the cluster bus uses ``--cluster-port`` in the same
range). ``TopologyFleet`` is chaos_support's Fleet on such a URL.
"""

from __future__ import annotations

import pathlib
import shutil
import signal
import subprocess
import time
from typing import Any, Self

import redis
from chaos_support import Fleet, RedisServer
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

SERVICE = "mymaster"


def _wait(check: Any, timeout_s: float, what: str) -> None:
    give_up_at = time.monotonic() + timeout_s
    while time.monotonic() < give_up_at:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not within {timeout_s} s")


class SentinelSet:
    """A primary, one replica and 3 sentinels (quorum 2, down after 1.5 s: less flags a busy CI box)."""

    def __init__(self, root: pathlib.Path, *, base_port: int) -> None:
        self.root = root
        self.primary = RedisServer(root / "primary", port=base_port)
        self.replica = RedisServer(root / "replica", port=base_port + 1)
        self.sentinel_ports = [base_port + 2 + i for i in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Self:
        self.primary.start("--appendonly", "no", "--save", "")
        self.replica.start("--appendonly", "no", "--save", "", "--replicaof", "127.0.0.1", str(self.primary.port))
        binary = shutil.which("redis-server")
        assert binary is not None
        for port in self.sentinel_ports:
            folder = self.root / f"sentinel-{port}"
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "sentinel.conf"  # sentinels rewrite their config: one file each
            config.write_text(f"port {port}\nbind 127.0.0.1\ndir {folder}\nlogfile {folder / 'sentinel.log'}\n"
                              f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                              f"sentinel down-after-milliseconds {SERVICE} 1500\n"
                              f"sentinel failover-timeout {SERVICE} 4000\n"
                              f"sentinel parallel-syncs {SERVICE} 1\n")
            self.sentinels.append(subprocess.Popen([binary, str(config), "--sentinel"], stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: self.replica.client().info("replication")["master_link_status"] == "up", 15, "replica sync")
        _wait(self._sentinels_see_replica, 20, "sentinels know the replica")
        return self

    def _sentinels_see_replica(self) -> bool:
        for port in self.sentinel_ports:
            with redis.Redis(port=port, socket_timeout=2) as client:
                if not client.sentinel_slaves(SERVICE) or len(client.sentinel_sentinels(SERVICE)) < 2:
                    return False
        return True

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}"

    def master_client(self) -> redis.Redis:
        sentinel = Sentinel([("127.0.0.1", port) for port in self.sentinel_ports], socket_timeout=2)
        return sentinel.master_for(SERVICE, socket_timeout=5)

    def primary_port(self) -> int:
        """The primary every sentinel agrees on; -1 while they disagree (a failover in progress)."""
        ports = set()
        for port in self.sentinel_ports:
            with redis.Redis(port=port, socket_timeout=2) as client:
                ports.add(int(client.sentinel_get_master_addr_by_name(SERVICE)[1]))
        return ports.pop() if len(ports) == 1 else -1

    def kill_primary(self) -> None:
        self.primary.stop(signal.SIGKILL)

    def __exit__(self, *exc_info: object) -> None:
        for process in self.sentinels:
            process.kill()
            process.wait(timeout=10)
        self.replica.stop(signal.SIGKILL)
        self.primary.stop(signal.SIGKILL)


class ClusterSet:
    """3 primaries, no replicas, slots split evenly by ``redis-cli --cluster create``."""

    def __init__(self, root: pathlib.Path, *, base_port: int, num_nodes: int = 3) -> None:
        self.ports = [base_port + i for i in range(num_nodes)]
        self.nodes = [RedisServer(root / f"node-{port}", port=port) for port in self.ports]

    def __enter__(self) -> Self:
        for node in self.nodes:  # the bus port in our range too (default: port + 10000)
            node.start("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port",
                       str(node.port + 50), "--appendonly", "no", "--save", "")
        binary = shutil.which("redis-cli")
        assert binary is not None
        subprocess.run([binary, "--cluster", "create", *[f"127.0.0.1:{port}" for port in self.ports],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        _wait(lambda: all(node.client().cluster("info")["cluster_state"] == "ok" for node in self.nodes), 30,
              "cluster_state ok")
        return self

    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def client(self) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", port) for port in self.ports], socket_timeout=5)

    def __exit__(self, *exc_info: object) -> None:
        for node in self.nodes:
            node.stop(signal.SIGKILL)


class TopologyFleet(Fleet):
    """chaos_support.Fleet on a Sentinel or Cluster URL, with a sync client that understands it."""

    def __init__(self, redis_url: str, log_dir: pathlib.Path, model_dir: pathlib.Path, *, sync_client: Any,
                 **env: str) -> None:
        super().__init__("redis://127.0.0.1:1/0", log_dir, model_dir, **env)  # placeholder, replaced below
        self._redis.close()
        self.redis_url = redis_url
        self.env["ALIGNQ_REDIS_URL"] = redis_url
        self._redis = sync_client
