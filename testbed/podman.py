"""Pulling with podman, as root, into a storage root of its own.

podman reads containers.conf, storage.conf, registries.conf (with its
drop-in directory), a trust policy and stored credentials (its auth file,
``~/.docker/config.json``) from the system and the user's home. A ``Podman``
here gets its own home, runtime directory, storage (the vfs driver, which
needs nothing from the kernel, unlike overlayfs in a container) and
configuration files under ``workdir``, so a pull goes to exactly the
registries and mirrors the test wrote, with exactly the credentials it
gave, and leaves nothing on the machine.

``podman pull`` needs no daemon and starts no container, so there is
nothing to stop: the storage stays under ``workdir`` for reading after a
failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from testbed.processes import require_binary

_POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}\n'


class PodmanError(RuntimeError):
    """podman exited with an error; the message carries its command line and stderr."""

    def __init__(self, args: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"podman failed with exit code {returncode}: {' '.join(args)}\n{stderr}")
        self.returncode = returncode
        self.stderr = stderr


def write_registries_conf(path: Path, registry: str, location: str, mirrors: list[str]) -> Path:
    """Write a registries.conf: images named under ``registry`` come from ``location``, ``mirrors`` tried first.

    Every endpoint is plain HTTP (``insecure = true``). A mirror may carry a
    path (``127.0.0.1:5000/docker.io``), which podman puts in front of the
    repository in every request to it, as Shoal's path prefix expects.
    """
    lines = [
        "[[registry]]",
        f"prefix = {json.dumps(registry)}",
        f"location = {json.dumps(location)}",
        "insecure = true",
        "",
    ]
    for mirror in mirrors:
        lines += ["[[registry.mirror]]", f"location = {json.dumps(mirror)}", "insecure = true", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


class Podman:
    """``podman`` with its storage, configuration and home under ``workdir``.

    Each pull names its registries.conf (see ``write_registries_conf``) and
    its auth file, or goes without: then podman sees no registries
    configuration and pulls from the registry the reference names, and
    finds no credentials.
    """

    def __init__(self, workdir: Path) -> None:
        self._binary = require_binary("podman", "podman")
        self.workdir = workdir
        home = workdir / "home"
        config = home / ".config" / "containers"
        # A registries.conf and a drop-in directory in the home, even empty,
        # replace the system's file and drop-ins; the policy there replaces
        # /etc/containers/policy.json.
        (config / "registries.conf.d").mkdir(parents=True, exist_ok=True)
        (config / "registries.conf").write_text("")
        (config / "policy.json").write_text(_POLICY)
        runtime = workdir / "run"
        runtime.mkdir(mode=0o700, exist_ok=True)
        tmp = workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        storage = workdir / "storage.conf"
        storage.write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f"graphroot = {json.dumps(str(workdir / 'root'))}\n"
            f"runroot = {json.dumps(str(workdir / 'runroot'))}\n"
        )
        # podman as root would keep events in the journal and per-boot state
        # in /run/libpod; a pull needs neither.
        engine = workdir / "containers.conf"
        engine.write_text(
            "[engine]\n"
            'events_logger = "none"\n'
            'cgroup_manager = "cgroupfs"\n'
            f"tmp_dir = {json.dumps(str(tmp / 'libpod'))}\n"
            f"image_copy_tmp_dir = {json.dumps(str(tmp))}\n"
        )
        self._env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            # Also where podman looks for its default auth file
            # (containers/auth.json), which does not exist here.
            "XDG_RUNTIME_DIR": str(runtime),
            "TMPDIR": str(tmp),
            "CONTAINERS_CONF": str(engine),
            "CONTAINERS_STORAGE_CONF": str(storage),
        }

    def run(
        self, *args: str, input_text: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
    ) -> str:
        """Run ``podman ARGS`` (``env`` added to its environment); return stdout, raise ``PodmanError`` on failure."""
        command = [self._binary, *args]
        try:
            result = subprocess.run(
                command,
                input=input_text if input_text is not None else "",
                capture_output=True,
                text=True,
                env={**self._env, **(env or {})},
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            raise PodmanError(command, -1, f"timed out after {timeout}s\n{stderr}") from exc
        if result.returncode != 0:
            raise PodmanError(command, result.returncode, result.stderr)
        return result.stdout

    def login(self, registry: str, user: str, password: str, authfile: Path, *, tls_verify: bool = False) -> Path:
        """``podman login`` to ``registry`` (``host:port``), writing the credentials into ``authfile``.

        podman checks them against the registry's ``/v2/`` first and writes
        nothing when they are refused. The password goes through stdin,
        never onto a command line. Returns ``authfile``.
        """
        self.run(
            "login",
            f"--tls-verify={str(tls_verify).lower()}",
            "--authfile",
            str(authfile),
            "--username",
            user,
            "--password-stdin",
            registry,
            input_text=password,
        )
        return authfile

    def pull(
        self,
        ref: str,
        *,
        registries: Path | None = None,
        authfile: Path | None = None,
        tls_verify: bool = False,
        timeout: float = 120,
    ) -> str:
        """``podman pull ref``, through the mirrors of ``registries``; returns the image ID podman prints.

        With ``authfile`` (the containers-auth.json format, as ``login``
        writes it) podman sends each endpoint it tries the credentials the
        file holds for that endpoint's address; without one it sends none.
        """
        options = [f"--tls-verify={str(tls_verify).lower()}", "--quiet"]
        if authfile is not None:
            options += ["--authfile", str(authfile)]
        env = {"CONTAINERS_REGISTRIES_CONF": str(registries)} if registries is not None else {}
        return self.run("pull", *options, ref, env=env, timeout=timeout).strip()

    def image_digest(self, ref: str) -> str:
        """The digest of the manifest podman pulled for ``ref``."""
        return self.run("image", "inspect", "--format", "{{.Digest}}", ref).strip()
