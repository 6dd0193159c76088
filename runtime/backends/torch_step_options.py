"""Speed options of the torch backend's step program: FP8 linears, the fused biased-attention op, torch.compile and
the whole denoising loop as one CUDA graph; torch is imported only when they run.

The options (``TorchOptions``; ``unidg generate|batch|serve --backend torch --compile --fp8 --fused-attention
--cuda-graph``), applied to the step program, which takes 28 of the ~30 launches of a sample:

- ``fp8``: every ``aten.linear`` of the step graph except the embedders, ``norm_out`` and the final ``proj_out`` (kept
  in high precision, as NVIDIA's FLUX FP8 recipe does) becomes ``fp8_linear``: E4M3 weights with one scale per output
  channel, activations quantized per token on the fly, ``torch._scaled_mm`` with row-wise scales on CUDA. Why
  ``torch._scaled_mm`` and not torchao's float8: torchao's float8 inference computes with the same op underneath,
  but torchao is one more package, released in lockstep with particular torch versions (with compiled extensions),
  to carry to GPU machines that have torch only; the row-wise recipe here is ~40 lines that torch.compile lowers
  directly, and the same code runs on the CPU, where the matmul is emulated in float32 (same FP8 values and
  scales), so the tests check its numerics without FP8 hardware.
- ``fused_attention``: every ``scaled_dot_product_attention`` with a per-key float mask ``[B, 1, 1, N]`` becomes the
  project's Triton biased-attention kernel (``unidg.runtime.attention_kernel``) as the custom op
  ``unidg::biased_attention``, opaque to torch.compile. On CPU it runs under Triton's interpreter (TRITON_INTERPRET=1).
- ``compile``: ``torch.compile`` of the step program (default mode; CUDA graphs are ours, below).
- ``cuda_graph``: the whole denoising loop of one batch is captured once per shape as one CUDA graph and replayed
  (``GraphRunner``); progress is reported when the graph finishes. On CPU there are no graphs: the same wrapper copies
  the inputs into its static buffers and just runs the loop.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from unidg.runtime.backends.base import BackendError, BackendUnavailable


def import_torch():
    try:
        import torch
    except ImportError as error:
        raise BackendUnavailable(
            f"torch not installed: the torch backend needs `pip install 'unidg[train]'`, or use --backend onnxruntime "
            f"({error})"
        ) from error
    return torch


@dataclass(frozen=True)
class TorchOptions:
    """Speed options of the torch backend (module docstring); all off is the plain exported program."""

    compile: bool = False
    fp8: bool = False
    fused_attention: bool = False
    cuda_graph: bool = False


# ------------------------------------------------------------------------------------------------------------ FP8
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_ALIGN = 16  # torch._scaled_mm needs every matmul dimension to be a multiple of 16
# High-precision layers of the FP8 recipe: the embedders, the final norm and the final projection (a block's own
# ``single_transformer_blocks.N.proj_out`` is quantized).
FP8_KEEP = re.compile(r"(^|[._])(x_embedder|context_embedder|time_text_embed|norm_out)[._]|(^|[^0-9][._])proj_out[._]")


def fp8_keeps_precision(name: str) -> bool:
    """Whether the layer whose weight is ``name`` stays in high precision under ``--fp8``."""
    return bool(FP8_KEEP.search(name))


def fp8_quantize(tensor):
    """Row-wise E4M3 quantization of a 2-D tensor: (float8_e4m3fn tensor, float32 scales [rows, 1]) with
    tensor ~= q * scale, one scale per row (per output channel of a weight, per token of an activation)."""
    torch = import_torch()
    amax = tensor.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    quantized = (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized, scale


def scaled_mm_rowwise(x_fp8, x_scale, weight_fp8, weight_scale):
    """x @ weight.T on FP8 tensor cores: ``torch._scaled_mm`` with row-wise scales ([M, 1] and [1, N]), bf16 out.

    torch's CPU build takes the same call, which the tests use to check these arguments against the emulation.
    """
    torch = import_torch()
    return torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=weight_scale.t(), out_dtype=torch.bfloat16)


def fp8_linear(x, weight_fp8, weight_scale, bias=None):
    """``F.linear`` with an E4M3 weight (``fp8_quantize``): activations quantized per token, one scaled matmul.

    Per-token (not per-tensor) activation scales keep each sample's result independent of its batch mates. CUDA:
    ``torch._scaled_mm`` with row-wise scales (FP8 tensor cores, bf16 output). CPU: the same FP8 values and scales,
    the matmul emulated in float32. Rows are zero-padded to a multiple of ``FP8_ALIGN``. Fewer rows than
    ``FP8_ALIGN`` (AdaLN modulation: one row per sample) keep 16-bit activations and dequantize the weight instead:
    those matmuls are bound by reading the weight, which FP8 halves either way.
    """
    torch = import_torch()
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if count < FP8_ALIGN:
        out = torch.nn.functional.linear(rows, (weight_fp8.float() * weight_scale).to(x.dtype))
    else:
        padded = rows if not count % FP8_ALIGN else torch.nn.functional.pad(rows, (0, 0, 0, -count % FP8_ALIGN))
        x_fp8, x_scale = fp8_quantize(padded)
        if rows.device.type == "cuda":
            out = scaled_mm_rowwise(x_fp8, x_scale, weight_fp8, weight_scale).to(x.dtype)
        else:
            out = ((x_fp8.float() @ weight_fp8.float().t()) * (x_scale * weight_scale.t())).to(x.dtype)
        out = out[:count]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def fp8_eligible(name: str, weight) -> bool:
    """A 2-D weight with both dimensions multiples of 16, not in the high-precision layers."""
    return (
        weight.ndim == 2
        and not weight.shape[0] % FP8_ALIGN
        and not weight.shape[1] % FP8_ALIGN
        and not (fp8_keeps_precision(name))
    )


def _module_fp8_linear_class():
    torch = import_torch()

    class FP8Linear(torch.nn.Module):
        """An ``nn.Linear`` whose weight is stored in E4M3 (``fp8_linear``)."""

        def __init__(self, linear) -> None:
            super().__init__()
            # detached: quantizing a parameter that requires grad would record an autograd graph holding the
            # high-precision weight and a float32 copy of it alive (~5 bytes per weight kept beside the FP8 one)
            weight_fp8, weight_scale = fp8_quantize(linear.weight.detach())
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("weight_fp8", weight_fp8)
            self.register_buffer("weight_scale", weight_scale)
            self.bias = linear.bias

        def forward(self, x):
            return fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias)

    return FP8Linear


def quantize_linear_modules(module) -> list[str]:
    """Replace the eligible ``nn.Linear`` submodules of ``module`` by FP8 ones, in place; returns their names."""
    torch = import_torch()
    fp8_class = _module_fp8_linear_class()
    replaced = []
    for name, child in list(module.named_modules()):
        if isinstance(child, torch.nn.Linear) and fp8_eligible(name + ".weight", child.weight):
            parent_name, _, attribute = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attribute, fp8_class(child))
            replaced.append(name)
    return replaced


def _attribute(graph_module, target: str):
    return operator.attrgetter(target)(graph_module)


def quantize_graph_linears(graph_module) -> list[str]:
    """Rewrite the eligible ``aten.linear`` nodes of an exported program's module to ``fp8_linear``, in place.

    Each weight (a ``get_attr`` node) is quantized once and the high-precision copy is dropped. Returns the weight
    names that were quantized.
    """
    torch = import_torch()
    graph = graph_module.graph
    replaced: list[str] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        weight_node = node.args[1]
        if getattr(weight_node, "op", None) != "get_attr":
            continue
        weight = _attribute(graph_module, weight_node.target)
        if not fp8_eligible(weight_node.target, weight):
            continue
        weight_fp8, weight_scale = fp8_quantize(weight.detach())
        stem = "fp8_" + re.sub(r"\W", "_", weight_node.target)
        graph_module.register_buffer(stem + "_weight", weight_fp8)
        graph_module.register_buffer(stem + "_scale", weight_scale)
        with graph.inserting_before(node):
            fp8_weight = graph.get_attr(stem + "_weight")
            fp8_scale = graph.get_attr(stem + "_scale")
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            fused = graph.call_function(fp8_linear, (node.args[0], fp8_weight, fp8_scale, bias))
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        replaced.append(weight_node.target)
    for target in replaced:  # drop the high-precision weights nothing reads any more
        for node in list(graph.nodes):
            if node.op == "get_attr" and node.target == target and not node.users:
                graph.erase_node(node)
        owner_name, _, attribute = target.rpartition(".")
        owner = graph_module.get_submodule(owner_name) if owner_name else graph_module
        if not any(n.op == "get_attr" and n.target == target for n in graph.nodes):
            delattr(owner, attribute)
    graph.lint()
    graph_module.recompile()
    return replaced


# --------------------------------------------------------------------------------------------- fused attention
FUSED_ATTENTION_OP = "unidg::biased_attention"


def biased_attention_op():
    """The project's Triton biased-attention kernel as the torch custom op ``unidg::biased_attention``.

    Registered on first use; its fake (shape) implementation lets torch.compile and CUDA-graph capture treat it as
    one opaque kernel launch.
    """
    torch = import_torch()
    namespace = getattr(torch.ops, "unidg", None)
    if namespace is not None and hasattr(namespace, "biased_attention"):
        return torch.ops.unidg.biased_attention.default

    # The schema is spelled out: this module's annotations are strings (postponed evaluation).
    @torch.library.custom_op(
        FUSED_ATTENTION_OP,
        mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, Tensor key_bias, float scale) -> Tensor",
    )
    def biased_attention(q, k, v, key_bias, scale):
        # The Triton kernel (an optional dependency) loads only with --fused-attention.
        from unidg.runtime.attention_kernel import biased_attention as kernel

        return kernel(q, k, v, key_bias, scale)

    @biased_attention.register_fake
    def _(q, k, v, key_bias, scale):
        return torch.empty_like(q)

    return torch.ops.unidg.biased_attention.default


def check_fused_attention_available(device) -> None:
    """Refuse ``--fused-attention`` where the Triton kernel cannot run, with what to do instead."""
    try:
        from unidg.runtime.attention_kernel import interpreter_available
    except ImportError as error:
        raise BackendUnavailable(
            f"--fused-attention needs triton (`pip install triton`), or leave the option out ({error})"
        ) from error
    if device.type == "cpu" and not interpreter_available():
        raise BackendUnavailable(
            "--fused-attention on the CPU runs the Triton kernel under its interpreter, which needs TRITON_INTERPRET=1 "
            "in the environment before triton is first imported: start the process with TRITON_INTERPRET=1, or run "
            "on --device cuda"
        )
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"--fused-attention runs on cpu or cuda, not {device}")


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``scaled_dot_product_attention`` with a per-key float mask ``[B|1, 1, 1, N]`` on the Triton kernel.

    Any other call (no mask, boolean or full masks, dropout, causal, GQA) goes to torch's SDPA unchanged.
    """
    torch = import_torch()
    per_key = (
        attn_mask is not None
        and attn_mask.is_floating_point()
        and attn_mask.ndim == 4
        and attn_mask.shape[1] == 1
        and attn_mask.shape[2] == 1
        and attn_mask.shape[0] in (1, query.shape[0])
        and query.shape[1] == key.shape[1]
    )
    if not per_key or dropout_p or is_causal:
        return torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    key_bias = attn_mask[:, 0, 0, :].float().expand(query.shape[0], key.shape[2]).contiguous()
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return biased_attention_op()(query.contiguous(), key.contiguous(), value.contiguous(), key_bias, scale)


def fuse_graph_attention(graph_module) -> int:
    """Point every ``scaled_dot_product_attention`` node of an exported program's module at ``fused_sdpa``."""
    torch = import_torch()
    targets = (torch.ops.aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention)
    count = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in targets:
            node.target = fused_sdpa
            count += 1
    graph_module.recompile()
    return count


# ---------------------------------------------------------------------------------------------- CUDA graphs
class GraphRunner:
    """Runs ``function(*tensors)`` on static copies of its inputs: captured once per input shape as one CUDA graph and
    replayed on CUDA; on the CPU (no graphs) the same wrapper just runs the function on its static buffers.

    The result is the graph's own output buffer, overwritten by the next call: copy what you keep.
    """

    def __init__(self, function: Callable, device, warmup: int = 2) -> None:
        self.torch = import_torch()
        self.function, self.device, self.warmup = function, device, warmup
        self.captures = 0
        self._key: tuple | None = None
        self._static: list = []
        self._graph = None
        self._output = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def _prepare(self, tensors: tuple) -> None:
        torch = self.torch
        self._graph = self._output = None
        self._static = [t.detach().clone() for t in tensors]
        if self.device.type != "cuda":
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile, autotune and allocate before capture, as torch documents
            for _ in range(self.warmup):
                self.function(*self._static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._output = self.function(*self._static)
        self._graph = graph
        self.captures += 1

    def __call__(self, *tensors):
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        if key != self._key:
            self._prepare(tensors)
            self._key = key
        for static, tensor in zip(self._static, tensors, strict=True):
            if static.data_ptr() != tensor.data_ptr():
                static.copy_(tensor)
        if self._graph is not None:
            self._graph.replay()
        else:
            self._output = self.function(*self._static)
        return self._output


def euler_loop(step: Callable) -> Callable:
    """``loop(x, sigmas, *conditioning)``: every step of the flow, sigma rows taken from the on-device table.

    ``extra``: the step's inputs after ``txt_ids`` (a UniDG-Text bundle's ``pooled``), passed on unchanged."""

    def loop(x, sigmas, cond, ctx, key_bias, guidance, img_ids, txt_ids, *extra):
        batch = x.shape[0]
        for i in range(sigmas.shape[0] - 1):
            sigma, sigma_next = sigmas[i].expand(batch), sigmas[i + 1].expand(batch)
            x = step(x, cond, ctx, key_bias, sigma, sigma_next, guidance, img_ids, txt_ids, *extra)
            if isinstance(x, tuple | list):
                (x,) = x
        return x

    return loop


def optimize_step_program(program, options: TorchOptions, device) -> tuple[Callable, dict]:
    """Apply ``options`` (FP8, fused attention, compile) to the step program; returns it and what was changed."""
    torch = import_torch()
    report: dict = {}
    graph = isinstance(program, torch.fx.GraphModule)
    if options.fp8:
        if not graph:
            raise BackendError("--fp8 rewrites an exported step program (a torch.fx GraphModule); got a callable")
        report["fp8_linears"] = len(quantize_graph_linears(program))
        if not report["fp8_linears"]:
            raise BackendError("--fp8: the step program has no aten.linear layer eligible for FP8")
    if options.fused_attention:
        check_fused_attention_available(device)
        if not graph:
            raise BackendError("--fused-attention rewrites an exported step program (a torch.fx GraphModule)")
        report["fused_attention_calls"] = fuse_graph_attention(program)
        if not report["fused_attention_calls"]:
            raise BackendError("--fused-attention: the step program has no scaled_dot_product_attention call")
    if options.compile:
        program = torch.compile(program)
        report["compiled"] = True
    return program, report


def static_cache_loop(
    programs: dict[str, Callable],
    inputs: dict[str, tuple[str, ...]],
    conditioning: tuple[str, ...],
    schedule: tuple[bool, ...],
    progress: Callable[[int], None] | None = None,
) -> Callable:
    """``loop(x, sigmas, *conditioning)``: a static step-cache schedule over the head, tail and cached-step programs,
    every tensor kept on the device (the decisions are fixed, so nothing is read back between steps and the loop can
    be captured as one CUDA graph). ``inputs``: each program's argument names (``Bundle.cache_inputs``);
    ``conditioning``: the names of the loop's arguments after ``sigmas``; ``progress(step)`` after each step (not
    while capturing)."""

    def first(outputs):
        return outputs[0] if isinstance(outputs, tuple | list) else outputs

    def loop(x, sigmas, *values):
        named = dict(zip(conditioning, values, strict=True))
        batch = x.shape[0]
        for i, full in enumerate(schedule):
            named.update(x=x, sigma=sigmas[i].expand(batch), sigma_next=sigmas[i + 1].expand(batch))
            hidden, encoder_hidden, temb, _ = programs["step_head"](*(named[n] for n in inputs["step_head"]))
            named.update(hidden=hidden, encoder_hidden=encoder_hidden, temb=temb)
            if full:
                x, named["tail_residual"] = programs["step_tail"](*(named[n] for n in inputs["step_tail"]))
            else:
                x = first(programs["step_cached"](*(named[n] for n in inputs["step_cached"])))
            if progress is not None:
                progress(i + 1)
        return x

    return loop
