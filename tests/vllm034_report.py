"""Runs tests/vllm034_checks.py inside ``.venv-vllm034`` once per pytest process and hands its JSON report to the
test modules that assert on it (tests/test_vllm034.py, tests/test_vllm034_paths.py): one subprocess of about two
minutes instead of one per module."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv-vllm034" / "bin" / "python"
SKIP = "no .venv-vllm034: run tools/bootstrap.sh, which creates it"


@functools.cache
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    done = subprocess.run(
        [str(PY), str(ROOT / "tests" / "vllm034_checks.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(out["env"]))
    return out


def facts(out: dict, name: str) -> dict:
    result = out["checks"][name]
    assert result["ok"], f"{name} raised inside .venv-vllm034:\n{result['error']}"
    return result["facts"]
