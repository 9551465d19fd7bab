"""A private containerd daemon, and pulling into it with ``ctr``.

The daemon gets its own root, state directory, sockets and configuration,
and every ``ctr`` call names its socket, so a test never touches or talks to
a containerd of the machine. Pulls unpack with the native snapshotter: it
needs nothing from the kernel beyond bind mounts, while overlayfs cannot
mount in many containers (an overlay on an overlay).

``ctr`` runs the registry client itself (the daemon only stores what it
fetched), so ``hosts.toml`` mirrors are read from the directory passed to
each pull, exactly as ``/etc/containerd/certs.d`` would be read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from testbed.processes import Process, require_binary, wait_until

SNAPSHOTTER = "native"
NAMESPACE = "shoaltest"

# What the pulls never need. The CRI plugin would look for CNI and a pause
# image; the other snapshotters probe the kernel and file system at start.
_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.snapshotter.v1.zfs",
)

# ``ctr --http-dump`` logs each request as it goes out, a line of the log per
# line of HTTP, the request line first and its Host header next:
#   time="..." level=info msg="HEAD /v2/library/alpine/manifests/3.19?ns=docker.io HTTP/1.1"
#   time="..." level=info msg="Host: 127.0.0.1:5000"
# A body that does not end in a newline (a JSON manifest, a layer) runs on
# into the request line that follows it, so the request line is matched at
# the end of its log line rather than at the start.
_DUMPED_REQUEST = re.compile(
    r'(?P<method>GET|HEAD) (?P<target>/v2/\S*) HTTP/1\.1"\n[^\n]*\bmsg="Host: (?P<host>[^"]+)"'
)


class CtrError(RuntimeError):
    """``ctr`` exited with an error; the message carries its command line and the end of its stderr."""

    def __init__(self, args: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"ctr failed with exit code {returncode}: {' '.join(args)}\n{stderr[-4000:]}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Request:
    """One HTTP request that ctr sent to a registry or mirror."""

    method: str
    host: str
    # The request target as sent: path and query string.
    target: str


@dataclass(frozen=True)
class Pull:
    """The outcome of one ``ctr images pull``."""

    returncode: int
    stdout: str
    stderr: str
    requests: list[Request]


def write_hosts(
    hosts_dir: Path, registry: str, server: str, mirrors: list[str], headers: dict[str, str] | None = None
) -> Path:
    """Write ``hosts_dir/<registry>/hosts.toml``: ``server`` as the registry, ``mirrors`` tried before it.

    ``headers`` are sent to every mirror (an ``Authorization`` header, as a
    Kubernetes node passes credentials to a mirror).
    """
    folder = hosts_dir / registry
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f'server = "{server}"', ""]
    for mirror in mirrors:
        lines += [f'[host."{mirror}"]', '  capabilities = ["pull", "resolve"]', ""]
        if headers:
            lines += [f'[host."{mirror}".header]']
            lines += [f"  {name} = {json.dumps(value)}" for name, value in headers.items()]
            lines += [""]
    path = folder / "hosts.toml"
    path.write_text("\n".join(lines))
    return path


def chain_ids(config: bytes) -> list[str]:
    """The chain IDs of an image's layers, from its config: the names of the snapshots an unpack commits."""
    diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    chain = [diff_ids[0]]
    for diff_id in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


class Containerd:
    """``containerd`` on private sockets, with its root and state under ``workdir``.

    The sockets live in a short directory of their own: a Unix socket path
    may not exceed 107 bytes, and pytest's temporary directories can.
    """

    def __init__(self, workdir: Path) -> None:
        self._binary = require_binary("containerd", "containerd")
        self._ctr = require_binary("ctr", "containerd")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockets = Path(tempfile.mkdtemp(prefix="shoal-ctr-", dir="/tmp"))
        self.address = str(self._sockets / "containerd.sock")
        self.config_path = self.workdir / "config.toml"
        self.config_path.write_text(self._config())
        self.log_path = self.workdir / "containerd.log"
        self._process: Process | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _config(self) -> str:
        disabled = ", ".join(f'"{plugin}"' for plugin in _DISABLED_PLUGINS)
        return "\n".join(
            [
                "version = 2",
                f'root = "{self.workdir / "root"}"',
                f'state = "{self.workdir / "state"}"',
                f'temp = "{self.workdir / "tmp"}"',
                f"disabled_plugins = [{disabled}]",
                "",
                "[grpc]",
                f'  address = "{self.address}"',
                "",
                "[ttrpc]",
                f'  address = "{self.address}.ttrpc"',
                "",
                "[debug]",
                '  level = "debug"',
                "",
                '[plugins."io.containerd.internal.v1.opt"]',
                f'  path = "{self.workdir / "opt"}"',
                "",
            ]
        )

    def _start(self) -> None:
        (self.workdir / "tmp").mkdir(exist_ok=True)
        self._process = Process(
            [self._binary, "--config", self.config_path], self.log_path, env=_environment(), cwd=self.workdir
        )
        process = self._process

        def answers() -> bool:
            if not process.alive():
                raise RuntimeError(f"containerd exited:\n{process.describe()}")
            if not _accepts(self.address):
                return False
            return self.ctr("version", check=False).returncode == 0

        try:
            wait_until(
                answers, timeout=20, interval=0.05, message=lambda: f"containerd never answered\n{self.log_text()}"
            )
        except BaseException:
            process.stop()
            raise

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this daemon, in the test namespace; raise ``CtrError`` on failure with ``check``."""
        result = self._run(args, check=check, timeout=timeout)
        stdout, stderr = (stream.decode(errors="replace") for stream in (result.stdout, result.stderr))
        return subprocess.CompletedProcess(result.args, result.returncode, stdout, stderr)

    def _run(self, args: tuple[str, ...], *, check: bool, timeout: float) -> subprocess.CompletedProcess[bytes]:
        command = [self._ctr, "--address", self.address, "--namespace", NAMESPACE, *args]
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, env=_environment(), timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise CtrError(command, result.returncode, result.stderr.decode(errors="replace"))
        return result

    def pull(self, ref: str, hosts_dir: Path, *, platform: str | None = None, timeout: float = 60) -> Pull:
        """``ctr images pull`` with the mirrors of ``hosts_dir``, unpacking with the native snapshotter.

        Returns the outcome whether or not the pull succeeded, with every
        request ctr sent (from its ``--http-dump``), so that a test can see
        where a pull went. The dump holds every response body too, in
        memory and in ``stderr``: pull small images.
        """
        options = ["--hosts-dir", str(hosts_dir), "--snapshotter", SNAPSHOTTER, "--http-dump"]
        if platform is not None:
            options += ["--platform", platform]
        result = self.ctr("images", "pull", *options, ref, check=False, timeout=timeout)
        requests = [Request(m["method"], m["host"], m["target"]) for m in _DUMPED_REQUEST.finditer(result.stderr)]
        return Pull(result.returncode, result.stdout, result.stderr, requests)

    def image_digests(self) -> dict[str, str]:
        """The digest of the manifest (or index) behind each image name."""
        lines = self.ctr("images", "ls").stdout.splitlines()[1:]
        return {fields[0]: fields[2] for fields in (line.split() for line in lines) if len(fields) >= 3}

    def content_digests(self) -> set[str]:
        """The digests of everything in the content store."""
        return set(self.ctr("content", "ls", "--quiet").stdout.split())

    def content(self, digest: str) -> bytes:
        """The bytes the content store holds under ``digest``."""
        return self._run(("content", "get", digest), check=True, timeout=60).stdout

    def snapshots(self) -> set[str]:
        """The names of the native snapshotter's snapshots: the chain IDs of unpacked layers."""
        lines = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.splitlines()[1:]
        return {line.split()[0] for line in lines if line.strip()}

    def log_text(self) -> str:
        return self._process.log_text() if self._process is not None else ""

    def close(self) -> None:
        """Stop the daemon and remove its sockets' directory; idempotent. Its root stays for reading after a failure."""
        if self._process is not None:
            self._process.stop()
        shutil.rmtree(self._sockets, ignore_errors=True)

    def __enter__(self) -> Containerd:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _environment() -> dict[str, str]:
    """The caller's environment without proxy settings, which would send registry traffic elsewhere."""
    return {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}


def _accepts(address: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
    return True
