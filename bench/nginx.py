"""nginx serving a node's blob files as static files with sendfile: the limit for bytes from disk."""

from __future__ import annotations

import os
from pathlib import Path

from testbed.processes import Process, free_port, require_binary, wait_for_http

_CONFIG = """\
{user}worker_processes 2;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 75s;
    client_body_temp_path {workdir}/tmp/body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location /files/ {{ alias {root}/; }}
    }}
}}
"""


class Nginx:
    """Serves the files under ``root`` at ``/files/``."""

    def __init__(self, workdir: Path, root: Path) -> None:
        binary = require_binary("nginx", "nginx")
        self.root = root
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = workdir / "nginx.conf"
        # As root, nginx's workers would drop to nobody, who may not enter
        # the benchmark's private directory.
        user = "user root;\n" if os.geteuid() == 0 else ""
        config.write_text(_CONFIG.format(user=user, workdir=workdir, port=self.port, root=root))
        self.process = Process(
            [binary, "-p", workdir, "-c", config, "-e", workdir / "error.log", "-g", "daemon off;"],
            workdir / "nginx.log",
        )
        try:
            wait_for_http(f"{self.url_base}/", alive=self.process.alive)
        except BaseException:
            self.process.stop()
            raise

    @property
    def url_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: Path) -> str:
        """The URL of a file under the root."""
        return f"{self.url_base}/files/{path.relative_to(self.root)}"

    def close(self) -> None:
        self.process.stop()
