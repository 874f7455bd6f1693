"""nginx configurations for the benchmark: fast ``return 200`` backends and the reference proxy.

Pure text generation (tested in tests/benchmarks/test_benchmarks_harness.py); ``targets.py`` starts the
processes. Every file nginx writes (pid, logs, temp bodies) stays in the run's temp directory, and
every configuration runs in the foreground (``daemon off``) with one worker, so the harness owns
the master's PID.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

#: Requests per client (and upstream) keep-alive connection before nginx closes it. nginx's default
#: of 1000 makes wrk reconnect every 1000 requests, which aiohttp never does: lift it so every
#: target is measured on persistent connections.
KEEPALIVE_REQUESTS = 1_000_000

_COOKIE_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _main_block(workdir: Path, name: str) -> str:
    """Top-level and ``events`` settings shared by every configuration, all paths in ``workdir``."""
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {workdir / (name + ".pid")};
error_log {workdir / (name + "-error.log")} warn;

events {{
    worker_connections 4096;
    multi_accept on;
}}
"""


def _http_common(workdir: Path, name: str) -> str:
    temp = workdir / f"{name}-temp"
    return f"""    access_log off;
    default_type text/plain;
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 65s;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
"""


def backend_conf(workdir: Path, backends: Sequence[tuple[str, int]], *, name: str = "backends") -> str:
    """One server block per ``(instance id, port)``: every path answers ``200 <id>`` (also
    ``/healthz``, so the proxies' health checks pass)."""
    if not backends:
        raise ValueError("at least one backend is needed")
    servers = []
    for instance_id, port in backends:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", instance_id):
            raise ValueError(f"invalid instance id: {instance_id!r}")
        servers.append(f"""    server {{
        listen 127.0.0.1:{int(port)};
        location / {{
            return 200 "{instance_id}";
        }}
    }}
""")
    return _main_block(workdir, name) + "\nhttp {\n" + _http_common(workdir, name) + "\n" + "\n".join(servers) + "}\n"


def cookie_map(cookie_name: str, variable: str = "affinity_cookie") -> str:
    """A ``map`` extracting the cookie's value into ``$variable``: nginx's ``$cookie_NAME`` cannot
    name a cookie containing ``-`` (such as ``fly-instance-id``), so the Cookie header is matched
    with a regex instead."""
    if not _COOKIE_NAME.fullmatch(cookie_name):
        raise ValueError(f"invalid cookie name: {cookie_name!r}")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", variable):
        raise ValueError(f"invalid nginx variable name: {variable!r}")
    return f"""    map $http_cookie ${variable} {{
        default "";
        "~(?:^|;)\\s*{re.escape(cookie_name)}=([^;]*)" $1;
    }}
"""


def proxy_conf(
    workdir: Path, listen_port: int, upstream_ports: Sequence[int], *, cookie_name: str = "fly-instance-id",
    keepalive: int = 64, name: str = "nginx-proxy",
) -> str:
    """nginx as the reference cookie-affinity proxy: ``hash <cookie> consistent`` over the
    upstreams, keep-alive upstream connections (HTTP/1.1, ``Connection ""``), one worker, and the
    usual forwarding headers (Host passed through, X-Forwarded-For/-Proto)."""
    if not upstream_ports:
        raise ValueError("at least one upstream is needed")
    upstreams = "".join(f"        server 127.0.0.1:{int(p)};\n" for p in upstream_ports)
    return (
        _main_block(workdir, name)
        + "\nhttp {\n"
        + _http_common(workdir, name)
        + "\n"
        + cookie_map(cookie_name)
        + f"""
    upstream affinity_apps {{
        hash $affinity_cookie consistent;
{upstreams}        keepalive {int(keepalive)};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}

    server {{
        listen 127.0.0.1:{int(listen_port)} backlog=1024;
        location / {{
            proxy_pass http://affinity_apps;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""
    )


def ws_proxy_conf(workdir: Path, listen_port: int, upstream_port: int, *, name: str = "nginx-ws") -> str:
    """nginx as the reference WebSocket proxy (issue #16): one worker passing the upgrade through
    (``Upgrade``/``Connection`` set from the client's, HTTP/1.1 upstream), then moving bytes."""
    return (
        _main_block(workdir, name)
        + "\nhttp {\n"
        + _http_common(workdir, name)
        + f"""
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        "" close;
    }}

    server {{
        listen 127.0.0.1:{int(listen_port)} backlog=1024;
        location / {{
            proxy_pass http://127.0.0.1:{int(upstream_port)};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""
    )


def nginx_argv(nginx: str, workdir: Path, conf_path: Path, name: str) -> list[str]:
    """The command line: prefix and early error log in ``workdir`` (nginx opens its compiled-in
    error log before reading the configuration unless ``-e`` says otherwise)."""
    return [nginx, "-p", str(workdir), "-e", str(workdir / f"{name}-error.log"), "-c", str(conf_path)]
