"""The consumer-group helper against a real Redis: own pending first, ack, XAUTOCLAIM, lease, dead letters."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis

from schemas import PAYLOAD_FIELD, DeadLetter, Keys, decode
from schemas.transport import StreamConsumer, dead_letter

pytestmark = pytest.mark.anyio
KEYS = Keys("t")
GROUP = "g"


@pytest.fixture
async def redis(redis_url: str):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def add(redis: aioredis.Redis, *payloads: bytes) -> list[str]:
    return [(await redis.xadd(KEYS.requests, {PAYLOAD_FIELD: p})).decode() for p in payloads]


async def test_ensure_group_is_idempotent_and_creates_the_stream(redis: aioredis.Redis) -> None:
    consumer = StreamConsumer(redis, KEYS.requests, GROUP, "c1")
    await consumer.ensure_group()
    await consumer.ensure_group()
    groups = await redis.xinfo_groups(KEYS.requests)
    assert [g["name"] for g in groups] == [GROUP.encode()]


async def test_read_returns_own_pending_first_after_a_restart(redis: aioredis.Redis) -> None:
    first = StreamConsumer(redis, KEYS.requests, GROUP, "c1")
    await first.ensure_group()
    ids = await add(redis, b"a", b"b", b"c")
    got = await first.read(count=2, block_ms=10)
    assert [e.entry_id for e in got] == ids[:2] and got[0].payload == b"a"
    await first.ack(ids[0])
    restarted = StreamConsumer(redis, KEYS.requests, GROUP, "c1")  # same name: picks up what it held
    assert [e.entry_id for e in await restarted.read(count=10, block_ms=10)] == [ids[1]]
    assert [e.entry_id for e in await restarted.read(count=10, block_ms=10)] == [ids[2]]
    assert await restarted.read(count=10, block_ms=10) == []


async def test_read_blocks_for_a_bounded_time(redis: aioredis.Redis) -> None:
    consumer = StreamConsumer(redis, KEYS.requests, GROUP, "c1")
    await consumer.ensure_group()
    with anyio.fail_after(2):
        assert await consumer.read(count=1, block_ms=50) == []


async def test_read_recreates_a_lost_group(redis: aioredis.Redis) -> None:
    consumer = StreamConsumer(redis, KEYS.requests, GROUP, "c1")
    await consumer.ensure_group()
    await redis.delete(KEYS.requests)  # what a Redis restart without persistence looks like
    assert await consumer.read(count=1, block_ms=10) == []
    ids = await add(redis, b"x")
    assert [e.entry_id for e in await consumer.read(count=1, block_ms=10)] == ids


async def test_claim_stale_takes_entries_of_a_dead_consumer_and_renew_keeps_a_lease(redis: aioredis.Redis) -> None:
    dead = StreamConsumer(redis, KEYS.requests, GROUP, "dead")
    alive = StreamConsumer(redis, KEYS.requests, GROUP, "alive")
    thief = StreamConsumer(redis, KEYS.requests, GROUP, "thief")
    await dead.ensure_group()
    ids = await add(redis, b"1", b"2")
    await dead.read(count=1, block_ms=10)
    await alive.read(count=1, block_ms=10)
    await anyio.sleep(0.12)
    assert await alive.renew([ids[1]]) == {ids[1]}  # alive keeps its lease; dead does not
    claimed = await thief.claim_stale(min_idle_ms=100)
    assert [e.entry_id for e in claimed] == [ids[0]] and claimed[0].payload == b"1"
    counts = await thief.delivery_counts(ids)
    assert counts == {ids[0]: 2, ids[1]: 1}  # renew (JUSTID) does not count as a delivery
    await thief.ack(ids[0])
    assert await thief.delivery_counts([ids[0]]) == {}


async def test_dead_letter_records_the_reason_and_acks(redis: aioredis.Redis) -> None:
    consumer = StreamConsumer(redis, KEYS.requests, GROUP, "c1")
    await consumer.ensure_group()
    ids = await add(redis, b"\xc1garbage")
    await consumer.read(count=1, block_ms=10)
    await dead_letter(redis, KEYS, source_stream=KEYS.requests, group=GROUP, entry_id=ids[0],
                      reason="not valid msgpack", payload=b"\xc1garbage")
    entries = await redis.xrange(KEYS.dead_letters)
    letter = decode(DeadLetter, entries[0][1][PAYLOAD_FIELD])
    assert (letter.entry_id, letter.reason, letter.payload) == (ids[0], "not valid msgpack", b"\xc1garbage")
    assert (await redis.xpending(KEYS.requests, GROUP))["pending"] == 0


async def test_renew_never_takes_back_an_entry_another_consumer_claimed(redis: aioredis.Redis) -> None:
    slow = StreamConsumer(redis, KEYS.requests, GROUP, "slow")
    other = StreamConsumer(redis, KEYS.requests, GROUP, "other")
    await slow.ensure_group()
    ids = await add(redis, b"1", b"2")
    await slow.read(count=2, block_ms=10)
    await redis.xclaim(KEYS.requests, GROUP, "other", min_idle_time=0, message_ids=[ids[0]])
    assert await slow.renew(ids) == {ids[1]}
    assert await other.renew(ids) == {ids[0]}
    await slow.ack(ids[1])
    assert await slow.renew(ids) == set()
