"""Plugin registration: entry point, idempotence, lazy import, CLI acceptance, pickling."""

from __future__ import annotations

import pickle
import subprocess
import sys
from importlib.metadata import entry_points

import vllm_lmhead_quant
from vllm_lmhead_quant import METHOD_NAMES, register


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("lmhead_quant") == "vllm_lmhead_quant:register"


def test_importing_the_package_does_not_import_vllm():
    code = "import sys, vllm_lmhead_quant, vllm_lmhead_quant.quant, vllm_lmhead_quant.ops; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_register_is_idempotent_and_registers_every_name():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    register()
    register()
    vllm_lmhead_quant._registered = False  # a second import path (e.g. another process) registering again
    register()
    for name in METHOD_NAMES:
        assert QUANTIZATION_METHODS.count(name) == 1
        cls = get_quantization_config(name)
        assert cls.__module__ == "vllm_lmhead_quant.config"
        assert cls().get_name() == name


def test_vllm_plugin_loader_registers_us():
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins();"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS as Q;"
        "print(all(n in Q for n in ('bf16_last_layer_fp32', 'fp8_lm_head', 'int8_lm_head')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_cli_accepts_every_name():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    for name in METHOD_NAMES:
        args = parser.parse_args(["--model", "x", "--quantization", name])
        assert args.quantization == name


def test_config_pickles_without_runtime_state():
    from vllm.model_executor.layers.quantization import get_quantization_config

    register()
    for name in METHOD_NAMES:
        cfg = get_quantization_config(name)()
        cfg._head_bound = True
        cfg._offered = True
        clone = pickle.loads(pickle.dumps(cfg))
        assert type(clone) is type(cfg)
        assert clone._head_bound is False and clone._offered is False and clone._candidates == []
        assert clone.get_config_filenames() == []
        assert clone.get_supported_act_dtypes() == cfg.get_supported_act_dtypes()
