"""What the image build takes from the building machine, read at run time so that no package
source is ever written into the repository (used by hack/image.sh):

    python3 hack/image/host.py apt-mirror SUITE     the Debian mirror apt uses for SUITE
    python3 hack/image/host.py pip-config DIR       this machine's pip settings as DIR/pip.conf,
                                                    certificate files copied beside it

Standard library only: it runs with the machine's python3, before any venv exists.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

APT = Path("/etc/apt")
FILE_KEYS = ("cert", "client-cert")
"""pip settings naming a file: the file is copied into the build context and the key rewritten."""
HOST_ONLY_KEYS = ("find-links", "log", "cache-dir", "src", "target", "prefix", "root")
"""pip settings naming a place on this machine, meaningless inside the build."""
IN_IMAGE_DIR = "/etc/memspace-build/pip"
"""Where the Dockerfile's build stage copies hack/image/pip/ (its PIP_CONFIG_FILE lives there)."""


def deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    """The stanzas of a deb822 .sources file, keys lower-cased, comments dropped."""
    stanza: dict[str, str] = {}
    key = ""
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if stanza:
                yield stanza
            stanza, key = {}, ""
        elif raw[0] in " \t" and key:
            stanza[key] += " " + raw.strip()
        else:
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            stanza[key] = value.strip()


def apt_mirrors(suite: str) -> Iterator[str]:
    """The URIs apt fetches `suite` from, in the order apt reads its sources."""
    for path in sorted((APT / "sources.list.d").glob("*.sources")):
        for stanza in deb822_stanzas(path.read_text()):
            if stanza.get("enabled", "yes").lower() == "no":
                continue
            if (
                "deb" in stanza.get("types", "").split()
                and suite in stanza.get("suites", "").split()
            ):
                yield from stanza.get("uris", "").split()
    lists = [APT / "sources.list", *sorted((APT / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for raw in path.read_text().splitlines():
            words = raw.split("#", 1)[0].split()
            if words[:1] != ["deb"]:
                continue
            words = words[1:]
            if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
                while words and not words[0].endswith("]"):
                    words = words[1:]
                words = words[1:]
            if len(words) >= 2 and words[1] == suite:
                yield words[0]


def pip_settings() -> dict[str, str]:
    """pip's effective settings on this machine (its config files and PIP_* variables), as
    `pip config list` reports them: {"section.key": value}, later sources winning."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found: dict[str, str] = {}
    for line in listed.splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, key = name.partition(".")
        # pip prints values as Python literals ('...'); multi-line values keep their newlines.
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1].encode().decode("unicode_escape")
        found[f"{'global' if section == ':env:' else section}.{key}"] = value
    return found


def write_pip_config(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = configparser.ConfigParser(interpolation=None)
    for name, value in pip_settings().items():
        section, _, key = name.partition(".")
        if key in HOST_ONLY_KEYS:
            continue
        if key in FILE_KEYS:
            source = Path(value)
            if not source.is_file():
                continue
            copied = f"{key}.pem"
            shutil.copyfile(source, directory / copied)
            setting = f"{IN_IMAGE_DIR}/{copied}"
        else:
            setting = value
        if not config.has_section(section):
            config.add_section(section)
        config.set(section, key, setting)
    with (directory / "pip.conf").open("w") as out:
        out.write("# This machine's pip settings, for the image's build stage only.\n")
        config.write(out)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "apt-mirror":
        for uri in apt_mirrors(argv[1]):
            print(uri)
            return 0
        print(f"no apt source for suite {argv[1]!r} in {APT}", file=sys.stderr)
        return 1
    if len(argv) == 2 and argv[0] == "pip-config":
        write_pip_config(Path(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
