"""Compiled decoding: one graph per step, the fast one-row products kept, the same results."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import pytest
import torch
from conftest import rand_ids
from transformers import AutoModelForCausalLM, StaticCache
from transformers.generation import CompileConfig

import qwen  # noqa: F401
from qwen import cpu_kernels
from qwen.cpu_engine import CPU_COMPILE_OPTIONS, onednn_off_for_one_row_step
from qwen.kv_cache import CACHE_KWARG


def load(path, dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture
def torch_kernels_only(monkeypatch):
    """Eager steps through torch's kernels, as the traced graph: the C kernels of
    cpu_kernels.py (which compiled steps do not use) sum some products in another order
    (test_cpu_kernels compares them with torch's)."""
    monkeypatch.setattr(cpu_kernels, "_kernel", lambda: None)


def recording_backend(graphs: list):
    """A torch.compile backend that keeps each FX graph Dynamo captured and runs it as is."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def one_row_linear_calls(gm) -> int:
    op = torch.ops.qwen.one_row_linear
    return sum(n.op == "call_function" and n.target in (op, op.default) for n in gm.graph.nodes)


@torch.no_grad()
@pytest.mark.parametrize(
    "dtype,prompt",
    [(torch.float32, 80), (torch.bfloat16, 80), (torch.bfloat16, 12)],
    ids=["fp32-beyond-seq-length", "bf16-beyond-seq-length", "bf16"],
)
def test_decode_step_traces_into_one_graph(tiny_dir, dtype, prompt, torch_kernels_only):
    """A decoding step over a static cache traces into one graph (``fullgraph``: no break
    on the dynamic-NTK choice, the logN factors or the one-row products), computes what
    the eager step computes, and in half precision keeps every one-row product as the
    opaque ``qwen::one_row_linear`` (torch's GEMV, not oneDNN's). The 80-token prompt is
    beyond the checkpoint's seq_length of 64: NTK alpha 3 and logN factors above 1."""
    m = load(tiny_dir, dtype)
    graphs: list = []
    step = torch.compile(m, backend=recording_backend(graphs), fullgraph=True)
    ids = rand_ids(1, prompt)
    eager_cache = StaticCache(config=m.config, max_cache_len=prompt + 4)
    compiled_cache = StaticCache(config=m.config, max_cache_len=prompt + 4)
    token = m(ids, **{CACHE_KWARG: eager_cache}).logits[:, -1:].argmax(-1)
    m(ids, **{CACHE_KWARG: compiled_cache})
    for i in range(3):
        position = torch.tensor([[prompt + i]])
        eager = m(token, position_ids=position, **{CACHE_KWARG: eager_cache}).logits
        compiled = step(token, position_ids=position, **{CACHE_KWARG: compiled_cache}).logits
        assert torch.equal(eager, compiled), i
        token = eager[:, -1:].argmax(-1)
    assert len(graphs) == 1
    layers = m.config.num_hidden_layers
    assert one_row_linear_calls(graphs[0]) == (5 * layers + 1 if dtype == torch.bfloat16 else 0)


def test_compiled_prefill_in_a_fresh_process_traces_into_one_graph(tiny_dir):
    """The CPU probes behind the multi-row paths cannot be traced: they run at import,
    not on a first call that may come while tracing (a compiled bf16 prefill)."""
    script = f"""
import torch, qwen
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tiny_dir)!r}, dtype=torch.bfloat16).eval()
graphs = []
def backend(gm, example_inputs):
    graphs.append(gm)
    return gm.forward
ids = torch.randint(0, 151643, (2, 8), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = torch.compile(m, backend=backend, fullgraph=True)(ids, use_cache=False).logits
    assert torch.equal(out, m(ids, use_cache=False).logits)
print(len(graphs))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "1"


def test_overlapping_one_row_steps_restore_onednn():
    """Compiled one-row steps in two threads share the oneDNN switch: it stays off until
    the last one ends, then comes back as it was (not off for good, as a save/restore per
    step would leave it when the steps overlap: A saves on, B saves off, A, then B restore)."""
    assert torch._C._get_mkldnn_enabled()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with onednn_off_for_one_row_step():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with onednn_off_for_one_row_step():
            b_in.set()
            a_out.wait(10)
            seen["after A left"] = torch._C._get_mkldnn_enabled()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"after A left": False}
    assert torch._C._get_mkldnn_enabled()


def test_one_row_linear_operator_equals_the_eager_product():
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    weight = torch.randn(48, 64).to(torch.bfloat16)
    bias = torch.randn(48).to(torch.bfloat16)
    with torch.no_grad():
        for b in (bias, None):
            out = torch.ops.qwen.one_row_linear(x, weight, b)
            assert out.shape == (1, 1, 48)
            assert torch.equal(out, torch.nn.functional.linear(x, weight, b))


@torch.no_grad()
def test_generate_runs_one_row_steps_compiled_without_onednn(tiny_dir, torch_kernels_only):
    """Through ``generate``, a one-row bf16 step on CPU runs its compiled graph with oneDNN
    switched off as a whole and its products as plain linears in the graph (the operator's
    round trip costs ~10% of a compiled step); the recording backend runs the graph as
    traced, so the tokens and logits equal eager decoding exactly."""
    m = load(tiny_dir, torch.bfloat16)
    graphs: list = []
    onednn_during_steps: list = []

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            onednn_during_steps.append(torch._C._get_mkldnn_enabled())
            return gm.forward(*args)

        return run

    ids = rand_ids(1, 70)
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    eager = m.generate(ids, **kw)
    compiled = m.generate(
        ids, cache_implementation="static", compile_config=CompileConfig(backend=backend, mode=None), **kw
    )
    assert eager.sequences.tolist() == compiled.sequences.tolist()
    for a, b in zip(eager.logits, compiled.logits, strict=True):
        assert torch.equal(a, b)
    assert len(graphs) == 1 and onednn_during_steps == [False] * 3  # 3 decoding steps after the prefill
    assert torch._C._get_mkldnn_enabled()  # back on after the step
    assert one_row_linear_calls(graphs[0]) == 0
    linears = sum(n.target is torch._C._nn.linear for n in graphs[0].graph.nodes)
    assert linears == 5 * m.config.num_hidden_layers + 1


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_cxx(), reason="Inductor needs a C++ compiler on CPU")
@torch.no_grad()
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)], ids=["fp32", "bf16"])
def test_generate_compiles_decoding_on_cpu(tiny_dir, dtype, atol):
    """``generate(cache_implementation="static", compile_config=CompileConfig())`` compiles
    the decoding steps with Inductor on CPU (transformers alone would not there), with
    CPU_COMPILE_OPTIONS, leaves the caller's config alone, and decodes as eager does
    (bf16: other fusions round differently, so logits agree to bf16 precision)."""
    m = load(tiny_dir, dtype)
    ids = rand_ids(1, 70)  # beyond seq_length 64
    config = CompileConfig()
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    eager = m.generate(ids, **kw)
    compiled = m.generate(ids, cache_implementation="static", compile_config=config, **kw)
    assert hasattr(m, "_compiled_call")
    used = m._last_compile_config
    assert used.mode is None and {**used.options, **CPU_COMPILE_OPTIONS} == used.options
    assert used.options.get("triton.cudagraphs") is True  # mode="reduce-overhead" as its options
    assert config._compile_all_devices is None and config.options is None  # the caller's, untouched
    for a, b in zip(eager.logits, compiled.logits, strict=True):
        assert (a - b).abs().max().item() < atol
    if dtype == torch.float32:
        assert eager.sequences.tolist() == compiled.sequences.tolist()
