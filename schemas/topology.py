"""Past one Redis server: the Sentinel and Cluster URL schemes, and writes that wait for replicas.

``schemas.transport.connect`` hands these URLs here, so every process accepts them:

    redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]
        a primary that Sentinel watches; redis-py's Sentinel pool asks the sentinels for the current
        primary on every new connection, so a failover is followed without a restart (the broken
        connections raise ConnectionError, which ``retry_with_backoff`` rides out)
    redis+cluster://[:password@]host:port[,host:port...]
        a Redis Cluster; keys carry hash tags (``schemas.keys``) so every script touches one slot

``eval_replicated`` runs a script and, when ``min_replicas`` > 0, WAITs on the same connection (WAIT
counts the replicas that hold this connection's writes), so an acknowledged submit or answer survives
the primary's death. Fewer replicas than asked within ``WAIT_TIMEOUT_MS`` raise ``NotReplicated``, a
connection error: callers retry the (idempotent) script as they would after a failover.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas.keys import Keys

__all__ = [
    "CLUSTER_SCHEME",
    "SENTINEL_SCHEME",
    "WAIT_TIMEOUT_MS",
    "AlignqCluster",
    "NotReplicated",
    "check_min_replicas",
    "check_replicas",
    "cluster_client",
    "deployment_keys",
    "eval_replicated",
    "is_cluster",
    "is_cluster_url",
    "parse_hosts",
    "sentinel_client",
]

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
WAIT_TIMEOUT_MS = 2_000  # an unreplicated write fails after this long (then is retried)
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REDIS_PORT = 6379


class NotReplicated(RedisConnectionError):
    """WAIT saw fewer replicas than ``min_replicas``: the write may not survive a failover; retry it."""


class SentinelRedis(aioredis.Redis):
    """The primary's client; closing it closes the connections to the sentinels too."""

    watched_by: Sentinel | None = None  # not "sentinel": Redis has a sentinel() command

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for client in self.watched_by.sentinels if self.watched_by is not None else ():
            await client.aclose()


class AlignqCluster(RedisCluster):
    """An asyncio RedisCluster whose MGET splits keys by slot (a worker polls many requests' markers)."""

    async def mget(self, keys: Any, *args: Any) -> list[Any]:  # type: ignore[override]
        return await self.mget_nonatomic(keys, *args)


def is_cluster_url(redis_url: str) -> bool:
    return redis_url.startswith(CLUSTER_SCHEME + "://")


def deployment_keys(namespace: str, num_shards: int, redis_url: str | None) -> Keys:
    """The key names every process of one deployment must agree on: namespace, S, and cluster or not."""
    return Keys.sharded(namespace, num_shards, cluster=is_cluster_url(redis_url or ""))


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


def parse_hosts(netloc: str, default_port: int) -> tuple[str | None, list[tuple[str, int]]]:
    """``[:password@]host:port[,host:port...]`` -> (password, [(host, port)]); ValueError when malformed."""
    userinfo, _, hostlist = netloc.rpartition("@")
    password = urllib.parse.unquote(userinfo.partition(":")[2]) if userinfo else None
    hosts = []
    for item in filter(None, hostlist.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, str(default_port)
        if not host or not port.isdigit():
            raise ValueError(f"bad host:port {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    if not hosts:
        raise ValueError("no host:port given")
    return password or None, hosts


def _split(redis_url: str) -> tuple[str, str]:
    _, sep, rest = redis_url.partition("://")
    if not sep:
        raise ValueError(f"not a URL: {redis_url!r}")
    netloc, _, path = rest.partition("/")
    return netloc, path.partition("?")[0]


def sentinel_client(redis_url: str, **options: Any) -> aioredis.Redis:
    """The current primary of ``service_name``, followed across failovers."""
    netloc, path = _split(redis_url)
    password, sentinels = parse_hosts(netloc, DEFAULT_SENTINEL_PORT)
    service_name, _, db = path.partition("/")
    if not service_name:
        raise ValueError(f"{SENTINEL_SCHEME}:// needs a service name: {SENTINEL_SCHEME}://host:port/mymaster[/db]")
    if db and not db.isdigit():
        raise ValueError(f"bad db {db!r} in {SENTINEL_SCHEME} URL")
    options.pop("health_check_interval", None)  # a dead primary is found by the failing call itself
    sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)
    client = sentinel.master_for(service_name, redis_class=SentinelRedis, db=int(db or 0), password=password,
                                 decode_responses=False, **options)
    client.watched_by = sentinel
    return client


def cluster_client(redis_url: str, **options: Any) -> AlignqCluster:
    netloc, path = _split(redis_url)
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only db 0: {redis_url!r}")
    password, hosts = parse_hosts(netloc, DEFAULT_REDIS_PORT)
    options.pop("health_check_interval", None)
    max_connections = options.pop("max_connections", None)
    if max_connections is not None:
        options["max_connections"] = max_connections
    return AlignqCluster(startup_nodes=[ClusterNode(host, port) for host, port in hosts], password=password,
                         decode_responses=False, **options)


async def eval_replicated(redis: Any, script: Any, *, keys: Sequence[Any], args: Sequence[Any],
                          min_replicas: int) -> Any:
    """``script(keys, args)``, then WAIT for ``min_replicas`` on the same connection (a pipeline).

    ``min_replicas`` 0: the plain call. Not on a cluster (``check_min_replicas``).
    """
    if min_replicas <= 0:
        return await script(keys=keys, args=args)
    async with redis.pipeline(transaction=False) as pipe:
        await script(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", min_replicas, WAIT_TIMEOUT_MS)
        reply, num_replicas = await pipe.execute()
    check_replicas(int(num_replicas), min_replicas, reply)
    return reply


def check_min_replicas(redis: Any, min_replicas: int) -> None:
    """A cluster pipeline spreads commands over connections, so a WAIT could not name our writes."""
    if min_replicas > 0 and is_cluster(redis):
        raise ValueError("ALIGNQ_REDIS_MIN_REPLICAS needs one primary or Sentinel; on a Redis Cluster set "
                         "min-replicas-to-write on the servers instead")


def check_replicas(num_replicas: int, min_replicas: int, reply: Any = None) -> None:
    if num_replicas < min_replicas:
        error = NotReplicated(f"write reached {num_replicas} of {min_replicas} replicas within {WAIT_TIMEOUT_MS} ms "
                              "(ALIGNQ_REDIS_MIN_REPLICAS); retrying")
        error.reply = reply  # type: ignore[attr-defined]
        raise error
