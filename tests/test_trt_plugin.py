"""The TensorRT plugin layer: everything it computes is tested here; calls into TensorRT skip without it."""

from __future__ import annotations

import math
import subprocess
import sys

import onnx
import pytest
import sympy
import torch
from onnx import TensorProto, helper

from unidg.export.plugins.attention_kernel import AUTOTUNE_CONFIGS, interpreter_available, reference_biased_attention
from unidg.export.plugins.trt_plugin import (
    PLUGIN_ID,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    config_for_tactic,
    plan_launch,
    register_plugin,
    resolve_scale,
    static_head_dim,
    tactic_configs,
    tactics_within_shared_limit,
    triton_dtype_for,
)

needs_compiler = pytest.mark.skipif(
    interpreter_available(), reason="this process imported Triton in interpreter mode (TRITON_INTERPRET=1)"
)


def _tensorrt_installed() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def test_module_imports_without_tensorrt_or_triton() -> None:
    code = (
        "import sys; import unidg.export.plugins.trt_plugin as m; "
        "print(m.PLUGIN_ID, 'tensorrt' in sys.modules, 'triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["unidg::biased_attention", "False", "False"]


def test_plugin_identity() -> None:
    assert PLUGIN_ID == f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}" == "unidg::biased_attention"


def test_dtype_mapping() -> None:
    assert [triton_dtype_for(n) for n in ("BF16", "HALF", "FLOAT")] == ["bf16", "fp16", "fp32"]
    with pytest.raises(ValueError, match="INT8"):
        triton_dtype_for("INT8")


def test_scale_attribute() -> None:
    assert resolve_scale(0.0, 128) == pytest.approx(1 / math.sqrt(128))
    assert resolve_scale(0.125, 128) == 0.125
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="scale"):
            resolve_scale(bad, 128)


def test_head_dim_must_be_static() -> None:
    assert static_head_dim((1, 24, -1, 128)) == 128
    with pytest.raises(ValueError, match="static"):
        static_head_dim((1, 24, -1, -1))
    with pytest.raises(ValueError, match="4-D"):
        static_head_dim((24, 128))


def test_tactics() -> None:
    table = tactic_configs()
    assert sorted(table) == list(range(1, len(AUTOTUNE_CONFIGS) + 1))
    assert config_for_tactic(0) == config_for_tactic(1) == AUTOTUNE_CONFIGS[0]
    assert config_for_tactic(len(AUTOTUNE_CONFIGS)) == AUTOTUNE_CONFIGS[-1]
    with pytest.raises(ValueError, match="tactic"):
        config_for_tactic(99)


@needs_compiler
@pytest.mark.parametrize("arch", [80, 90])
def test_launch_plan_on_concrete_shapes(arch: int) -> None:
    from unidg.export.plugins.trt_plugin import compile_for_plugin

    config = AUTOTUNE_CONFIGS[0]
    compiled = compile_for_plugin("bf16", 128, resolve_scale(0.0, 128), config, arch)
    plan = plan_launch(compiled, (1, 24, 5338, 128), (1, 24, 5338, 128))
    assert plan.grid == (math.ceil(5338 / config.block_m), 24, 1)
    assert plan.block == (config.num_warps * 32, 1, 1)
    assert plan.shared_mem == compiled.shared_mem > 0
    # the int32 arguments TensorRT passes between the input pointers and the output pointer, in kernel order
    assert plan.extra_args == (5338, 5338, 24)
    cross = plan_launch(compiled, (2, 3, 7, 128), (2, 3, 300, 128))
    assert cross.grid == (1, 6, 1) and cross.extra_args == (7, 300, 3)


@needs_compiler
def test_launch_plan_is_symbolic_in_the_shapes() -> None:
    from unidg.export.plugins.trt_plugin import compile_for_plugin

    compiled = compile_for_plugin("fp16", 64, 0.125, AUTOTUNE_CONFIGS[0], 89)
    batch, heads, seq_q, seq_k = sympy.symbols("B H S_q S_k", positive=True, integer=True)
    plan = plan_launch(
        compiled, (batch, heads, seq_q, 64), (batch, heads, seq_k, 64), cdiv=lambda a, b: sympy.ceiling(a / b)
    )
    block_m = AUTOTUNE_CONFIGS[0].block_m
    assert plan.grid == (sympy.ceiling(seq_q / block_m), batch * heads, 1)
    assert plan.extra_args == (seq_q, seq_k, heads)
    assert plan.grid[0].subs(seq_q, 5849) == math.ceil(5849 / block_m)


@needs_compiler
def test_shared_memory_limit_filters_tactics() -> None:
    scale = resolve_scale(0.0, 128)
    all_tactics = tactics_within_shared_limit("bf16", 128, scale, None, None, arch=90)
    assert all_tactics == sorted(tactic_configs())
    small = tactics_within_shared_limit("bf16", 128, scale, None, 49152, arch=90)
    assert small and set(small) < set(all_tactics)
    assert len(AUTOTUNE_CONFIGS) in small
    # TensorRT's default tactic 0 must not fall back to a config above the limit
    default = config_for_tactic(0, None, 49152, "bf16", 128, scale, arch=90)
    assert default == tactic_configs()[small[0]] and default != AUTOTUNE_CONFIGS[0]


def test_plugin_tactics_default_to_48_kib() -> None:
    """Without an explicit opt-in only tactics within the 48 KiB every launch gets are offered."""
    import inspect

    from unidg.export.engine import PLUGIN_DEFAULT_MAX_SHARED_BYTES
    from unidg.export.plugins.trt_plugin import DEFAULT_MAX_SHARED_BYTES

    assert DEFAULT_MAX_SHARED_BYTES == PLUGIN_DEFAULT_MAX_SHARED_BYTES == 48 * 1024
    assert inspect.signature(register_plugin).parameters["max_shared_bytes"].default == DEFAULT_MAX_SHARED_BYTES


@pytest.mark.skipif(_tensorrt_installed(), reason="tensorrt is installed")
def test_register_without_tensorrt_says_what_to_install() -> None:
    with pytest.raises(ImportError, match="TensorRT >= 10.15"):
        register_plugin()


def _plugin_model(batch: int, heads: int, seq: int, head_dim: int) -> onnx.ModelProto:
    shape = [batch, heads, seq, head_dim]
    node = helper.make_node(
        PLUGIN_NAME,
        ["q", "k", "v", "key_bias"],
        ["out"],
        domain=PLUGIN_NAMESPACE,
        plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version="1",
        aot=1,
        scale=1 / math.sqrt(head_dim),
    )
    graph = helper.make_graph(
        [node],
        "plugin",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT16, shape) for n in ("q", "k", "v")]
        + [helper.make_tensor_value_info("key_bias", TensorProto.FLOAT, [batch, seq])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, shape)],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(PLUGIN_NAMESPACE, 1)]
    )


def test_engine_with_plugin_matches_reference() -> None:
    trt = pytest.importorskip("tensorrt", reason="tensorrt not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    register_plugin()
    batch, heads, seq, head_dim = 1, 4, 300, 128
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(_plugin_model(batch, heads, seq, head_dim).SerializeToString()):
        pytest.fail("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    serialized = builder.build_serialized_network(network, builder.create_builder_config())
    assert serialized is not None
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=gen).half().cuda() for _ in range(3))
    bias = torch.randn(batch, seq, generator=gen).cuda()
    bias[:, -20:] = -math.inf
    out = torch.empty_like(q)
    for name, tensor in {"q": q, "k": k, "v": v, "key_bias": bias, "out": out}.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    ref = reference_biased_attention(q.float(), k.float(), v.float(), bias)
    assert (out.float() - ref).abs().max().item() / ref.abs().max().item() <= 2e-2


@needs_compiler
def test_each_kernel_compiles_once_across_autotune_and_aot_impl(monkeypatch) -> None:
    """autotune (tactics_within_shared_limit) and aot_impl (config_for_tactic + compile_for_plugin) ask for the same
    kernels: each distinct kernel is compiled once per process, however the arguments are spelled."""
    from unidg.export.plugins import aot, trt_plugin

    compiled: list[tuple] = []
    real = aot.compile_biased_attention

    def counting(dtype, head_dim, scale, config, arch=None, ptx_version=aot.DEFAULT_PTX_VERSION, **kwargs):
        compiled.append((dtype, head_dim, scale, config.name, arch, ptx_version))
        return real(dtype, head_dim, scale, config, arch=arch, ptx_version=ptx_version, **kwargs)

    monkeypatch.setattr(aot, "compile_biased_attention", counting)
    trt_plugin._compile_once.cache_clear()  # a fresh process's cache
    scale = resolve_scale(0.0, 64)
    configs = AUTOTUNE_CONFIGS[-2:]  # two configs keep the compile short
    # The calls the registered plugin makes on sm_90 (arch given here: no GPU), with the default PTX ISA 8.0.
    tactics = tactics_within_shared_limit("fp16", 64, scale, configs, 49152, arch=90)
    assert tactics and len(compiled) == len(configs)
    for tactic in (0, *tactics):
        config = config_for_tactic(tactic, configs, 49152, "fp16", 64, scale, arch=90)
        trt_plugin.compile_for_plugin("fp16", 64, scale, config, 90, 80)
    assert len(compiled) == len(set(compiled)) == len(configs), compiled
