"""Hot reload: re-read the config file and apply what can change without a restart.

Applied in place (open connections, WebSockets and pins are untouched): ``instances`` (ids, URLs,
weights — the membership swaps a new snapshot and keeps drain and health marks of kept ids),
``cookie.*`` (a new codec; cookies signed with a secret that moved to ``previous_secrets`` stay
valid), ``user_key``, ``health.*``, ``reaper.*``, ``limits.*``, ``fly.replay_status``,
``fly.prefer_instance``, ``fly.replay_timeout``, ``fly.replay_fallback``, ``fly.placement``,
``log.level``. Keys that need a restart (listeners, ``mode``, ``store.*``, ``placement.*``,
``fly.machine_id``, ``fly.discovery``, ``fly.process_group``, ``admin.token``) are left as they
were and named in the result. An invalid file changes nothing: the error is returned and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from affinity_proxy.config import Config, ConfigError, load_config
from affinity_proxy.membership.discovery import instances_from_config
from affinity_proxy.proxy.context import ProxyContext, decide_policy
from affinity_proxy.routing.cookie import CookieCodec
from affinity_proxy.routing.userkey import UserKeySource

log = logging.getLogger("affinity_proxy.reload")

#: ``placement``: the live-session window, the move budget and the rebalance loop are built at start.
RESTART_KEYS = ("listen", "admin_listen", "mode", "store", "admin", "engine", "placement")
RESTART_FLY_KEYS = ("machine_id", "app", "discovery", "upstream", "dns_server", "private_url", "private_port",
                    "process_group")


@dataclass
class ReloadResult:
    ok: bool
    error: str | None = None
    changed: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {"ok": self.ok, "error": self.error, "changed": self.changed, "needs_restart": self.needs_restart}


def _merge(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """The config to run with: ``new`` except for restart-only keys, plus what changed / was kept."""
    changed = [name for name in Config.__dataclass_fields__ if getattr(old, name) != getattr(new, name)]
    restart = [k for k in changed if k in RESTART_KEYS]
    fly_restart = [f"fly.{k}" for k in RESTART_FLY_KEYS if getattr(old.fly, k) != getattr(new.fly, k)]
    kept_fly = replace(new.fly, **{k: getattr(old.fly, k) for k in RESTART_FLY_KEYS})
    merged = replace(new, fly=kept_fly, **{k: getattr(old, k) for k in RESTART_KEYS})
    return merged, [k for k in changed if k not in RESTART_KEYS], restart + fly_restart


def apply_config(ctx: ProxyContext, new: Config) -> ReloadResult:
    """Swap ``new`` in (minus restart-only keys). Runs on the event loop; no I/O."""
    old = ctx.config
    merged, changed, needs_restart = _merge(old, new)
    c = merged.cookie
    codec = CookieCodec(c.secret, c.previous_secrets, signed=c.signed, max_age=c.max_age)
    ctx.codec = codec
    ctx.policy = decide_policy(merged)
    ctx.user_key_sources = tuple(UserKeySource(s.kind, s.name) for s in merged.user_key)
    ctx.config = merged
    if merged.instances != old.instances:
        ctx.membership.set_instances(instances_from_config(merged))
    if ctx.health is not None and merged.health != old.health:
        h = merged.health
        ctx.health.reconfigure(path=h.path, interval=h.interval, timeout=h.timeout,
                               unhealthy_after=h.unhealthy_after, healthy_after=h.healthy_after)
    if merged.log.level != old.log.level:
        logging.getLogger().setLevel(merged.log.level)
    ctx.reloads += 1
    if needs_restart:
        log.warning("reload: these keys need a restart and were not applied: %s", ", ".join(needs_restart))
    log.info("config reloaded", extra={"fields": {"changed": changed, "reloads": ctx.reloads}})
    return ReloadResult(True, None, changed, needs_restart)


def reload_from_file(ctx: ProxyContext) -> ReloadResult:
    """Re-read ``ctx.config_path`` and apply it; the old config stays when the file is invalid.
    Reads one small file synchronously (called on SIGHUP or ``POST /reload``, never per request)."""
    if ctx.config_path is None:
        return ReloadResult(False, "this process was not started from a config file")
    try:
        new = load_config(ctx.config_path)
        new.require_cookie_secret()
    except ConfigError as exc:
        log.error("reload rejected; keeping the running config: %s", exc)
        return ReloadResult(False, str(exc))
    return apply_config(ctx, new)
