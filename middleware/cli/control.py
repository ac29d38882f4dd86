"""``alignq cancel ID``: control of requests already submitted to a running deployment.

Prints one JSON line ``{"request_id", "cancelled", "status"}``. Exit 0 when the request is cancelled
now or was answered before (a no-op that says so: ``"cancelled": false`` and its status); exit 1 with
one line when the id is unknown in the tenant (never submitted, expired or lost).
"""

from __future__ import annotations

import argparse
import json
import sys

from middleware.errors import UsageError
from middleware.settings import SchedulerSettings

__all__ = ["cmd_cancel", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    cancel = subparsers.add_parser(
        "cancel", help="cancel a submitted request (a no-op for answered ones)",
        description="Answer a pending request 'cancelled' now; its window and workers drop its work.")
    cancel.add_argument("request_id", help="the request's id, as submitted")
    cancel.add_argument("--tenant", default=None, help="the tenant that submitted it (default: the shared tenant)")
    cancel.add_argument("--redis-url", default=None, help="Redis URL (default: ALIGNQ_REDIS_URL)")
    cancel.add_argument("--namespace", default=None, help="prefix of every Redis key (default alignq)")
    cancel.set_defaults(func=cmd_cancel)


def cmd_cancel(args: argparse.Namespace) -> int:
    import anyio

    from middleware.client import CancelOutcome, Client, ClientError

    overrides = {k: v for k, v in (("redis_url", args.redis_url), ("namespace", args.namespace)) if v}
    settings = SchedulerSettings(**overrides)
    if not settings.redis_url:
        raise UsageError("no Redis to talk to: set ALIGNQ_REDIS_URL or --redis-url")

    async def cancel() -> tuple[CancelOutcome, str]:
        async with Client(settings.redis_url or "", tenant=args.tenant, namespace=settings.namespace,
                          num_shards=settings.shards) as client:
            outcome = await client.cancel(args.request_id, reason="cancelled with `alignq cancel`")
            result = await client.get_result(args.request_id)
            return outcome, result.status.value if result is not None else "cancelled"

    try:
        outcome, status = anyio.run(cancel)
    except ClientError as e:  # BadRequest (a bad tenant name), ConnectionLost
        print(f"alignq cancel: {e}", file=sys.stderr)
        return 1
    if outcome == CancelOutcome.UNKNOWN:
        print(f"alignq cancel: no request {args.request_id} (unknown, expired or lost)", file=sys.stderr)
        return 1
    print(json.dumps({"request_id": args.request_id, "cancelled": outcome == CancelOutcome.CANCELLED,
                      "status": status}))
    return 0
