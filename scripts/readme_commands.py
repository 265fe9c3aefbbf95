#!/usr/bin/env python3
"""Print the commands of README.md's first code block, one a line, comments and blank lines left out:
the two that README promises work on a fresh clone (one trains, scores and translates; one passes the
tests). ``.ci/run`` runs exactly these, so CI proves README's commands rather than a copy of them.

usage: python3 scripts/readme_commands.py [README]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def readme_commands(readme: Path) -> list[str]:
    """The non-comment lines of the first ```bash block of ``readme``."""
    block = re.search(r"^```bash\n(.*?)^```", readme.read_text(encoding="utf-8"), re.S | re.M)
    if block is None:
        raise SystemExit(f"error: {readme} has no ```bash code block")
    return [line.split(" #")[0].strip() for line in block.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "README.md"
    print("\n".join(readme_commands(path)))
