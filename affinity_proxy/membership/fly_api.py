"""FlyMachinesApiSource: the app's Machines and their states from the Fly Machines API.

``GET {api_url}/v1/apps/{app}/machines`` with ``Authorization: Bearer <token>`` (a token that
already names its scheme, like the ``FlyV1 fm2_...`` tokens of ``fly tokens create deploy``, is sent
as it is). From inside a Machine the API is at ``http://_api.internal:4280``; from outside at
``https://api.machines.dev``. It says more than DNS (``failed``, ``replacing``...) at the price of a
token and an API rate limit, so poll it no more than every few seconds.

States (docs/fly-protocol.md section 4, DOCS machines/machine-states) map to ``InstanceState`` as follows:

======================================================  ==========  ==================================
Machine state                                           Instance    why
======================================================  ==========  ==================================
started                                                 UP          running
updating, replacing, restarting                         UP          comes straight back, same id
                                                                    (rolling deploys update in place)
created, creating, starting, stopping, stopped,         STOPPED     deployed but not running: pins
suspending, suspended                                               kept, a replay wakes it
failed, launch_failed                                   DOWN        cannot serve; pins reaped after
                                                                    the reaper's grace period
destroying, destroyed, replaced, migrated               (omitted)   never comes back: ``gone``
any other state                                         STOPPED     kept, not chosen for new users
                                                                    (warned once per state name)
======================================================  ==========  ==================================

The token is never logged, never put in an error message (it is scrubbed from response bodies
quoted there) and not shown by ``repr``. Imports aiohttp, ``routing.model`` and
``membership.sources``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import aiohttp

from affinity_proxy.membership.sources import DiscoveryError, MachineAddressing
from affinity_proxy.routing.model import Instance, InstanceState, is_valid_instance_id

log = logging.getLogger("affinity_proxy.discovery.api")

DEFAULT_API_URL = "http://_api.internal:4280"
GONE_STATES = frozenset({"destroying", "destroyed", "replaced", "migrated"})
STATE_MAP: Mapping[str, InstanceState] = MappingProxyType({
    "started": InstanceState.UP,
    "updating": InstanceState.UP,
    "replacing": InstanceState.UP,
    "restarting": InstanceState.UP,
    "created": InstanceState.STOPPED,
    "creating": InstanceState.STOPPED,
    "starting": InstanceState.STOPPED,
    "stopping": InstanceState.STOPPED,
    "stopped": InstanceState.STOPPED,
    "suspending": InstanceState.STOPPED,
    "suspended": InstanceState.STOPPED,
    "failed": InstanceState.DOWN,
    "launch_failed": InstanceState.DOWN,
})
_BODY_QUOTE_LIMIT = 200


def machine_state(state: str) -> InstanceState | None:
    """The ``InstanceState`` of a Machine state per the module table; None when it is gone for good.
    Unknown states are STOPPED. Pure."""
    if state in GONE_STATES:
        return None
    return STATE_MAP.get(state, InstanceState.STOPPED)


def machines_url(api_url: str, app: str) -> str:
    """The list URL. ``api_url`` may be the bare host (``http://_api.internal:4280``) or already end
    in ``/v1`` (``https://api.machines.dev/v1``)."""
    base = api_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return f"{base}/apps/{app}/machines"


class FlyMachinesApiSource:
    """``MembershipSource`` over the Machines API; see the module docstring for the state table.

    ``fetch`` makes one GET bounded by ``timeout`` seconds through ``session`` (owned by the
    caller, who closes it). With ``process_group`` only that group's Machines are listed (the
    API's ``metadata.fly_process_group`` filter). Raises ``DiscoveryError`` on a connection error, a
    timeout, a non-2xx answer, or a body that is not a JSON array; entries without a valid ``id`` are
    skipped (debug log). Call from one task at a time.
    """

    def __init__(
        self,
        app: str,
        *,
        api_url: str = DEFAULT_API_URL,
        token: str,
        local_machine_id: str,
        private_url: str,
        private_port: int,
        local_upstream: str,
        session: aiohttp.ClientSession,
        timeout: float = 5.0,
        process_group: str | None = None,
    ) -> None:
        if not token or not token.strip():
            raise ValueError("the Machines API needs a token (FLY_API_TOKEN)")
        self.app = app
        self.url = machines_url(api_url, app)
        self.timeout = timeout
        self.process_group = process_group
        self.addressing = MachineAddressing(app, local_machine_id, local_upstream, private_url, private_port)
        self._session = session
        self._token = token.strip()
        scheme_given = self._token.startswith(("FlyV1 ", "Bearer "))
        self._authorization = self._token if scheme_given else f"Bearer {self._token}"
        self._warned_states: set[str] = set()

    def __repr__(self) -> str:
        return f"FlyMachinesApiSource(app={self.app!r}, url={self.url!r}, token=<redacted>)"

    async def fetch(self) -> list[Instance]:
        params = {"metadata.fly_process_group": self.process_group} if self.process_group else None
        try:
            async with self._session.get(
                self.url,
                params=params,
                headers={"Authorization": self._authorization, "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                status = resp.status
        except TimeoutError:  # aiohttp's timeouts are TimeoutError subclasses
            raise DiscoveryError(f"Machines API GET {self.url}: no answer within {self.timeout}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DiscoveryError(f"Machines API GET {self.url} failed: {self._scrub(repr(exc))}") from None
        if not 200 <= status < 300:
            hint = " (check FLY_API_TOKEN)" if status in (401, 403) else ""
            raise DiscoveryError(f"Machines API GET {self.url} answered HTTP {status}{hint}: {self._quote(body)}")
        try:
            machines = json.loads(body)
        except ValueError:
            raise DiscoveryError(f"Machines API GET {self.url}: the answer is not JSON: {self._quote(body)}") from None
        if not isinstance(machines, list):
            raise DiscoveryError(
                f"Machines API GET {self.url}: expected a JSON array of machines, got {type(machines).__name__}"
            )
        return self._instances(machines)

    def _instances(self, machines: list[Any]) -> list[Instance]:
        out: list[Instance] = []
        seen: set[str] = set()
        for machine in machines:
            machine_id = machine.get("id") if isinstance(machine, dict) else None
            if not isinstance(machine_id, str) or not is_valid_instance_id(machine_id) or machine_id in seen:
                log.debug("skipping a Machines API entry without a valid, new id: %.100r", machine)
                continue
            raw_state = machine.get("state")
            state_name = raw_state if isinstance(raw_state, str) else ""
            state = machine_state(state_name)
            if state is None:
                continue
            if state_name not in STATE_MAP and state_name not in self._warned_states:
                self._warned_states.add(state_name)
                log.warning("unknown Machine state %r (machine %s); treating it as stopped", state_name, machine_id)
            region = machine.get("region")
            seen.add(machine_id)
            out.append(self.addressing.instance(machine_id, region if isinstance(region, str) else "", state))
        return out

    def _scrub(self, text: str) -> str:
        bare = self._token.split(" ", 1)[-1] if " " in self._token else self._token
        for secret in (self._token, bare):
            if secret:
                text = text.replace(secret, "<redacted>")
        return text

    def _quote(self, body: bytes) -> str:
        text = self._scrub(body.decode("utf-8", "replace")).strip()
        if len(text) > _BODY_QUOTE_LIMIT:
            text = text[:_BODY_QUOTE_LIMIT] + "..."
        return repr(text) if text else "(empty body)"

