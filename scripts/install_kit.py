"""Install the wheels of a folder that are not installed already, into a target folder.

    python scripts/install_kit.py KIT/wheels SITE

For an offline node: pip installs from the folder alone (no index, no dependency
resolution), and a package the node already has (at any version) is left to the node.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def distribution(wheel: Path) -> str:
    """The normalised distribution name of a wheel file (PEP 427 / PEP 503)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def installed() -> set[str]:
    return {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in metadata.distributions()}


def main(folder: str, target: str) -> int:
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        print(f"no wheels in {folder}", file=sys.stderr)
        return 2
    have = installed()
    missing = [w for w in wheels if distribution(w) not in have]
    print(
        f"{len(wheels) - len(missing)} of {len(wheels)} packages already installed; "
        f"installing {len(missing)} into {target}"
    )
    if not missing:
        return 0
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        target,
    ]
    return subprocess.call(cmd + [str(w) for w in missing])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
