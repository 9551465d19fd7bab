"""Pulling with skopeo, the real client the integration tests trust.

skopeo reads registries.conf (which may rewrite or mirror a reference), a
trust policy, lookaside configuration and stored credentials from the system
and the user's home. Each run here gets a fresh home with an empty
registries.conf, a permissive policy and no credentials, so a pull goes to
exactly the address the test named and nothing on the machine can change that.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from testbed.processes import require_binary

_POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}\n'


class SkopeoError(RuntimeError):
    """skopeo exited with an error; the message carries its command line and stderr."""

    def __init__(self, args: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"skopeo failed with exit code {returncode}: {' '.join(args)}\n{stderr}")
        self.returncode = returncode
        self.stderr = stderr


def _docker_ref(ref: str) -> str:
    return ref if ref.startswith("docker://") else f"docker://{ref}"


def _run(args: list[str], timeout: float) -> bytes:
    skopeo = require_binary("skopeo", "skopeo")
    with tempfile.TemporaryDirectory(prefix="shoal-skopeo-") as scratch:
        home = Path(scratch) / "home"
        config_home = home / ".config"
        (config_home / "containers").mkdir(parents=True)
        # A per-user registries.conf, even empty, replaces the system file and
        # its drop-in directory; the hidden --registries-conf flag would not
        # stop the system drop-ins from being read.
        (config_home / "containers" / "registries.conf").write_text("")
        policy = Path(scratch) / "policy.json"
        policy.write_text(_POLICY)
        lookaside = Path(scratch) / "registries.d"
        lookaside.mkdir()
        runtime = Path(scratch) / "run"
        runtime.mkdir(mode=0o700)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(config_home),
            "XDG_RUNTIME_DIR": str(runtime),
        }
        command = [
            skopeo,
            "--policy",
            str(policy),
            "--registries.d",
            str(lookaside),
            "--tmpdir",
            scratch,
            *args,
        ]
        try:
            result = subprocess.run(
                command, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            stderr = (exc.stderr or b"").decode(errors="replace")
            raise SkopeoError(command, -1, f"timed out after {timeout}s\n{stderr}") from exc
        if result.returncode != 0:
            raise SkopeoError(command, result.returncode, result.stderr.decode(errors="replace"))
        return result.stdout


def skopeo_copy(
    src_ref: str,
    dest_dir: str | os.PathLike[str],
    *,
    tls_verify: bool = False,
    timeout: float = 120,
    override_arch: str | None = None,
    override_os: str | None = None,
    all_images: bool = False,
    creds: str | None = None,
) -> Path:
    """Copy ``src_ref`` (``host:port/name:tag`` or ``docker://...``) into ``dest_dir`` with the dir: transport.

    The directory then holds ``manifest.json`` and one file per blob named by
    the hex part of its digest. For an index, skopeo picks the child for this
    machine unless ``override_arch``/``override_os`` say otherwise, or copies
    every child with ``all_images``. ``creds`` (``user:password``) are given
    to the registry, or to its token server; without them skopeo sends none.
    Returns ``dest_dir`` as a Path.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    global_options = []
    if override_arch is not None:
        global_options += ["--override-arch", override_arch]
    if override_os is not None:
        global_options += ["--override-os", override_os]
    credentials = ["--src-creds", creds] if creds is not None else ["--src-no-creds"]
    copy_options = [f"--src-tls-verify={str(tls_verify).lower()}", *credentials]
    if all_images:
        copy_options.append("--all")
    _run([*global_options, "copy", *copy_options, _docker_ref(src_ref), f"dir:{dest}"], timeout)
    return dest


def skopeo_inspect_raw(ref: str, *, tls_verify: bool = False, timeout: float = 60, config: bool = False) -> bytes:
    """Return the manifest (or with ``config``, the image config) exactly as skopeo fetched it."""
    options = [f"--tls-verify={str(tls_verify).lower()}", "--no-creds", "--raw"]
    if config:
        options.append("--config")
    return _run(["inspect", *options, _docker_ref(ref)], timeout)
