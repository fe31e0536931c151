"""The lock (requirements/lock.txt) against pyproject.toml and against an installed venv.

    python scripts/lockfile.py stamp        # print the hash of pyproject's dependency lists (written into the lock)
    python scripts/lockfile.py check        # the lock's recorded hash equals pyproject's: a refresh would not change it
    python scripts/lockfile.py drift        # this interpreter's packages equal the lock (one line and exit 1 if not)
    python scripts/lockfile.py strays       # installed packages the lock does not hold, one per line, then
                                            # `reinstall NAME` for locked ones that share files with them
    python scripts/lockfile.py subset NAME  # the lock's entries (with hashes) for these names, to install alone

Only the standard library: `check` runs before any venv exists and needs no network."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
PROJECT = "apple-video"
STAMP = "# pyproject-inputs-sha256: "
# pip's own tools: not part of what the project runs on (pip is upgraded by setup.sh, as any venv's pip is)
TOOLS = {"pip"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def inputs_hash(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """What pip-compile resolves from: the dependencies, the test extra (the lock installs it) and the Python range."""
    project = tomllib.loads(pyproject.read_text())["project"]
    inputs = {"requires-python": project.get("requires-python"), "dependencies": project["dependencies"],
              "test": project.get("optional-dependencies", {}).get("test", [])}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def locked(lock: Path = LOCK) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", lock.read_text(), flags=re.M)
    return {canonical(name): version for name, version in pins}


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def check() -> int:
    recorded = next((line.removeprefix(STAMP).strip() for line in LOCK.read_text().splitlines()
                     if line.startswith(STAMP)), None)
    if recorded != inputs_hash():
        print(f"lock: {LOCK.relative_to(ROOT)} is stale: pyproject.toml's dependencies changed since it was compiled; "
              "refresh it with `bash scripts/lock.sh`", file=sys.stderr)
        return 1
    return 0


def drift() -> int:
    want, have = locked(), installed()
    have.pop(canonical(PROJECT), None)
    differ = sorted(f"{n} {have.get(n, 'missing')} (lock {want[n]})" for n in want
                    if n not in TOOLS and have.get(n) != want[n])
    extra = sorted(f"{n} {v} (not in the lock)" for n, v in have.items() if n not in want and n not in TOOLS)
    if differ or extra:
        print(f"lock: the venv drifted from {LOCK.relative_to(ROOT)}: {', '.join(differ + extra)}; "
              "bring it back with `rm .venv/.apple-video-installed && bash scripts/setup.sh`", file=sys.stderr)
        return 1
    return 0


def strays() -> int:
    """Packages to remove, then `reinstall <name>` lines: locked packages that wrote some of the same files (two
    OpenCV wheels share cv2/: removing one deletes the other's files)."""
    want = locked()
    dists = {canonical(d.metadata["Name"]): d for d in metadata.distributions() if d.metadata["Name"]}
    extra = [n for n in dists if n not in want and n not in TOOLS and n != canonical(PROJECT)]
    files = {n: {str(f) for f in (dists[n].files or []) if not str(f).startswith(("..", "/"))} for n in dists}
    shared = {n for n in dists if n in want for x in extra if files[n] & {f for f in files[x]
                                                                       if ".dist-info" not in f}}
    for name in extra:
        print(name)
    for name in sorted(shared):
        print(f"reinstall {name}")
    return 0


def subset(names: list[str]) -> int:
    wanted, keep, out = {canonical(n) for n in names}, False, []
    for line in LOCK.read_text().splitlines():
        start = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if start:
            keep = canonical(start.group(1)) in wanted
        elif not line.startswith(" "):
            keep = False
        if keep and not line.lstrip().startswith("#"):
            out.append(line)
    print("\n".join(out))
    return 0


def main(argv: list[str]) -> int:
    commands = {"stamp": lambda: print(inputs_hash()) or 0, "check": check, "drift": drift, "strays": strays}
    if argv[:1] == ["subset"]:
        return subset(argv[1:])
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: lockfile.py {'|'.join(commands)}|subset NAME...", file=sys.stderr)
        return 2
    return commands[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
