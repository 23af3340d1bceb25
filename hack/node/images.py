"""Assemble a container image as a `docker save`-format tar, with no engine and no registry.

The test node's images (the pause sandbox, CoreDNS, local-path-provisioner, a busybox toolbox)
are a few static binaries each. This writes one layer tar holding them, an image config and a
``manifest.json`` naming the image, which ``ctr -n k8s.io images import`` loads into containerd.
The output is reproducible: fixed times and owners, sorted entries. Standard library only; run by
hack/k8s-tools.sh:

    python3 images.py OUT.tar --tag NAME:TAG --entrypoint /pause --file /src/pause:/pause
    python3 images.py OUT.tar --tag NAME:TAG --busybox /bin/busybox --entrypoint /bin/sh
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import PurePosixPath


def _info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name.lstrip("/"))
    info.type, info.mode, info.size, info.linkname = kind, mode, size, link
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def layer(files: dict[str, bytes], links: dict[str, str], dirs: set[str]) -> bytes:
    """One layer: ``files`` (path -> content, all executable), symlinks, and their parents."""
    for path in [*files, *links, *dirs]:
        dirs.update(str(parent) for parent in PurePosixPath(path).parents if str(parent) != "/")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(dirs):
            mode = 0o1777 if name == "/tmp" else 0o755  # noqa: S108 - the image's own /tmp
            tar.addfile(_info(name, tarfile.DIRTYPE, mode))
        for name in sorted(files):
            content = files[name]
            tar.addfile(_info(name, tarfile.REGTYPE, 0o755, len(content)), io.BytesIO(content))
        for name in sorted(links):
            tar.addfile(_info(name, tarfile.SYMTYPE, 0o777, link=links[name]))
    return buffer.getvalue()


def image(tag: str, layer_tar: bytes, entrypoint: list[str], cmd: list[str], user: str) -> bytes:
    """The `docker save` tar of an image of one layer."""
    diff_id = hashlib.sha256(layer_tar).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Entrypoint": entrypoint,
                "Cmd": cmd,
                "User": user,
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "hack/node/images.py"}],
        },
        sort_keys=True,
    ).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [tag], "Layers": [f"{diff_id}/layer.tar"]}]
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(_info(diff_id, tarfile.DIRTYPE, 0o755))
        for name, content in (
            (f"{diff_id}/layer.tar", layer_tar),
            (config_name, config),
            ("manifest.json", manifest),
        ):
            info = _info(name, tarfile.REGTYPE, 0o644, len(content))
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the tar to write")
    parser.add_argument("--tag", required=True, help="the image's name, e.g. memspace.test/pause:1")
    parser.add_argument("--file", action="append", default=[], help="SRC:DEST, an executable")
    parser.add_argument("--dir", action="append", default=[], help="an empty directory")
    parser.add_argument("--busybox", help="a static busybox: /bin/busybox and a link per applet")
    parser.add_argument("--entrypoint", action="append", default=[])
    parser.add_argument("--cmd", action="append", default=[])
    parser.add_argument("--user", default="", help="the default user (uid[:gid])")
    args = parser.parse_args(argv)

    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    for spec in args.file:
        src, _, dest = spec.partition(":")
        with open(src, "rb") as binary:
            files[dest] = binary.read()
    if args.busybox:
        with open(args.busybox, "rb") as binary:
            files["/bin/busybox"] = binary.read()
        listing = subprocess.run(  # noqa: S603 - the busybox binary named on our command line
            [args.busybox, "--list-full"], capture_output=True, text=True, check=True
        ).stdout
        for applet in listing.split():
            path = f"/{applet}"
            if path != "/bin/busybox":
                links[path] = "/bin/busybox"
    dirs = {"/tmp", "/etc", *args.dir}  # noqa: S108 - the image's own /tmp
    tar = image(args.tag, layer(files, links, dirs), args.entrypoint, args.cmd, args.user)
    with open(args.out, "wb") as out:
        out.write(tar)
    return 0


if __name__ == "__main__":
    sys.exit(main())
