"""Screenshots of the web playground for docs/playground.md, written to docs/images/playground_*.png.

The browser tests of tests/test_serve_playground.py drive the page (Debian's headless Chromium,
through Selenium) against a live `genforge serve` on a tiny random Llama and a small RAG index;
with GENFORGE_PLAYGROUND_SCREENSHOTS set they keep their screenshots there. This script runs
those tests with it set, so the pictures in the docs are the page the tests check. The chat
replies are a random model's, so they read as noise: the page around them is what is shown.

    python benchmarks/playground_screenshots.py                # into docs/images
    python benchmarks/playground_screenshots.py --out /tmp/x   # elsewhere
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ("chat", "tools", "rag", "tokens", "concepts")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="directory for playground_*.png")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GENFORGE_PLAYGROUND_SCREENSHOTS=str(out))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "slow", "tests/test_serve_playground.py"]
    status = subprocess.run(command, cwd=ROOT, env=env).returncode
    missing = [name for name in SHOTS if not (out / f"playground_{name}.png").is_file()]
    if status or missing:
        print(f"the browser tests failed or were skipped; missing: {', '.join(missing) or 'none'}", file=sys.stderr)
        return status or 1
    print("\n".join(str(out / f"playground_{name}.png") for name in SHOTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
