"""Lets ``python examples/X.py`` run as written: the examples need vLLM and this package, which live in the checkout's
``.venv`` (``bash tools/bootstrap.sh``, the README's first command). If the running Python lacks vLLM and that venv
exists, the example restarts itself with it; without the venv it says what to run, instead of a ModuleNotFoundError.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"


def use_venv() -> None:
    if importlib.util.find_spec("vllm") and importlib.util.find_spec("vllm_lmhead_quant"):
        return
    if VENV_PYTHON.exists() and Path(sys.executable).absolute() != VENV_PYTHON.absolute():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])
    sys.exit(f"{sys.argv[0]} needs vLLM and vllm_lmhead_quant: run `bash tools/bootstrap.sh` (README.md) first.")
