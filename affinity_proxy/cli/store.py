"""The ``pins``, ``instances`` and ``reap`` commands: operator access to pins and membership through
a ``PinBackend``: the Redis named by the config's ``store.url`` directly (``cli_redis``, no node
needed), or a running node's admin API (``memory://``, or ``--admin URL``).

Thin: each command makes one or two backend calls and hands the documents to ``cli_output``.
"""

from __future__ import annotations

from typing import Any

import click

from affinity_proxy.cli.base import admin_options, emit, json_option, run_backend
from affinity_proxy.cli.output import (
    duration,
    instances_table,
    pin_stats,
    pins_table,
    reap_text,
    rebalance_text,
    stats_text,
)


@click.group()
def pins() -> None:
    """Inspect and change pins (user key -> instance) in the pin store."""


@pins.command("list")
@click.option("--instance", default=None, metavar="ID", help="Only pins to this instance.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="At most this many pins.")
@json_option
@admin_options
def pins_list(instance: str | None, limit: int, as_json: bool, config_path: str | None, admin: str | None,
              token: str | None) -> None:
    """List pins: user, instance and time left."""
    doc = run_backend(config_path, admin, token, lambda b: b.list_pins(instance, limit))
    items = doc.get("pins", [])
    if as_json:
        emit(doc, True, str)
        return
    click.echo(pins_table(items) if items else "no pins")
    if len(items) >= limit:
        click.echo(f"(showing the first {limit}; raise --limit for more)", err=True)


@pins.command("show")
@click.argument("user")
@json_option
@admin_options
def pins_show(user: str, as_json: bool, config_path: str | None, admin: str | None, token: str | None) -> None:
    """Show USER's pin (exit 1 when there is none)."""
    doc = run_backend(config_path, admin, token, lambda b: b.show_pin(user),
                      {404: f"no pin for user {user}", 400: "{message}"})
    emit(doc, as_json, lambda: (
        f"user      {doc['user']}\n"
        f"instance  {doc['instance']} ({doc.get('state', '?')})\n"
        f"expires   in {duration(doc.get('expires_in'))}"
    ))


@pins.command("set")
@click.argument("user")
@click.argument("instance")
@json_option
@admin_options
def pins_set(user: str, instance: str, as_json: bool, config_path: str | None, admin: str | None,
             token: str | None) -> None:
    """Pin USER to INSTANCE (overwrites an existing pin). An operator re-pin: counted in
    affinity_repins_total{repin_reason="operator"} when made through a node's admin API; the
    Redis-direct CLI has no metrics. INSTANCE must be configured, reported by a node or pinned."""
    doc = run_backend(config_path, admin, token, lambda b: b.set_pin(user, instance),
                      {400: f"cannot pin {user} to {instance}: {{message}}"})
    emit(doc, as_json, lambda: f"pinned {doc['user']} to {doc['instance']} "
                               f"(expires in {duration(doc.get('expires_in'))})")


@pins.command("drop")
@click.argument("user")
@json_option
@admin_options
def pins_drop(user: str, as_json: bool, config_path: str | None, admin: str | None, token: str | None) -> None:
    """Delete USER's pin (exit 1 when there is none); the next request is routed afresh."""
    doc = run_backend(config_path, admin, token, lambda b: b.drop_pin(user),
                      {404: f"no pin for user {user}", 400: "{message}"})
    emit(doc, as_json, lambda: f"dropped the pin of {user}")


@pins.command("stats")
@json_option
@admin_options
def pins_stats(as_json: bool, config_path: str | None, admin: str | None, token: str | None) -> None:
    """Pins per instance, total, mean and balance (max/mean; 1.00 is perfectly even)."""
    doc = run_backend(config_path, admin, token, lambda b: b.instances())
    stats = pin_stats(doc.get("instances", []))
    emit(stats, as_json, lambda: stats_text(stats))


@click.group()
def instances() -> None:
    """Inspect membership and drain or undrain instances (shared drain marks on Redis)."""


@instances.command("list")
@json_option
@admin_options
def instances_list(as_json: bool, config_path: str | None, admin: str | None, token: str | None) -> None:
    """List instances: id, state, weight, pins and URL."""
    doc = run_backend(config_path, admin, token, lambda b: b.instances())
    emit(doc, as_json, lambda: instances_table(doc.get("instances", [])))


def _drain_command(name: str, drain: bool, help_text: str) -> click.Command:
    @click.argument("instance_id", metavar="ID")
    @json_option
    @admin_options
    def command(instance_id: str, as_json: bool, config_path: str | None, admin: str | None,
                token: str | None) -> None:
        def call(b: Any) -> Any:
            return b.drain(instance_id) if drain else b.undrain(instance_id)

        doc = run_backend(config_path, admin, token, call, {404: f"unknown instance {instance_id}"})
        emit(doc, as_json, lambda: f"{doc['id']}: {doc['state']}")

    return click.command(name, help=help_text)(command)


instances.add_command(_drain_command(
    "drain", True, "Mark instance ID draining: it keeps its pinned users and gets no new ones."))
instances.add_command(_drain_command("undrain", False, "Let instance ID take new users again."))


@click.command()
@click.option("--dry-run", is_flag=True, help="Only report the pins that would be dropped.")
@json_option
@admin_options
def reap(dry_run: bool, as_json: bool, config_path: str | None, admin: str | None, token: str | None) -> None:
    """Drop pins to instances that have been down or gone longer than reaper.grace.

    Directly on Redis: pins of instances nobody knows (not configured, no heartbeat, no drain
    mark), and of instances reported down when reaper.grace is 0 (longer graces are timed by the
    nodes' reapers); holds the nodes' reaper lock, exit 1 when another reaper holds it."""
    doc = run_backend(config_path, admin, token, lambda b: b.reap(dry_run=dry_run))
    emit(doc, as_json, lambda: reap_text(doc))


@click.command()
@click.option("--dry-run", is_flag=True, help="Only show the plan: which idle pins would move where.")
@json_option
@admin_options
def rebalance(dry_run: bool, as_json: bool, config_path: str | None, admin: str | None, token: str | None) -> None:
    """Move idle pins off instances over their share (one pass of placement.rebalance, at most one
    pass's budget; the same plan the nodes' leader-only loop makes). A user active within
    placement.rebalance.idle_after is never moved; the moved user's next request gets a fresh cookie.

    Directly on Redis: membership from the config, heartbeats and drain marks, and the nodes'
    rebalance lock (a pass is skipped while a node holds it)."""
    doc = run_backend(config_path, admin, token, lambda b: b.rebalance(dry_run=dry_run))
    emit(doc, as_json, lambda: rebalance_text(doc))


COMMANDS = (pins, instances, reap, rebalance)
