"""Two `serve --workers 2` processes (2 nodes x 2 workers) sharing one real Redis: the first-pin race
ends with exactly one pin, and a pin set with the CLI (directly on Redis) is obeyed by both nodes."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from click.testing import CliRunner

from affinity_proxy.cli.main import main as cli_main
from affinity_proxy.pins.redis import pin_key
from tests.functional.test_workers import get_instance
from tests.support.waiting import wait_until


async def test_race_for_first_pin_over_two_nodes_and_four_workers(start_serve, fresh_connections,
                                                                   redis_url) -> None:
    node1 = await start_serve(2)
    node2 = await start_serve(2)
    answers = await asyncio.gather(*(
        get_instance(fresh_connections, node1 if i % 2 else node2, "race-4-workers") for i in range(100)
    ))
    client = aioredis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter("affinity:pin:*")]
        stored = (await client.get(pin_key("affinity:", "race-4-workers"))).decode()
    finally:
        await client.aclose()
    assert keys == [pin_key("affinity:", "race-4-workers").encode()]
    assert set(answers) == {stored}


async def test_cli_pin_is_obeyed_by_both_nodes(start_serve, fresh_connections, tmp_path) -> None:
    node1 = await start_serve(2)
    node2 = await start_serve(2)
    before = await get_instance(fresh_connections, node1, "cli-user")
    target = next(i for i in ("a", "b", "c") if i != before)
    config = tmp_path / "proxy-0.yaml"  # the first node's config: same Redis, same key prefix
    result = await asyncio.to_thread(
        CliRunner().invoke, cli_main, ["pins", "set", "cli-user", target, "--config", str(config)]
    )
    assert result.exit_code == 0, result.output

    async def both_obey() -> bool:
        got = [await get_instance(fresh_connections, node, "cli-user") for node in (node1, node2, node1, node2)]
        return set(got) == {target}

    await wait_until(both_obey, timeout=10, interval=0.2)
