"""The Python-C boundary of qwen/cpu_kernels.py: the C source compiles without a warning,
its definitions agree with the Python declarations (or it does not compile), and
BlockSteps' table, filled by field name, runs every block as the kernels one by one do."""

from __future__ import annotations

import dataclasses
import platform
import re

import pytest
import torch
from conftest import needs_compiler

from qwen import cpu_kernels
from qwen.cpu_kernels import BlockParts, BlockSteps, Norm, Product

WARNINGS = [
    "-Wall", "-Wextra", "-Wpedantic", "-Wmissing-prototypes", "-Wstrict-prototypes", "-Wshadow", "-Wcast-qual",
    "-Wconversion", "-Wdouble-promotion", "-Wundef", "-Werror",
]  # fmt: skip
# -march=native is what users build; on x86 also the AVX512-BF16 and the portable code paths
TARGETS = {"native": ["-march=native"]}
if platform.machine().lower() in ("x86_64", "amd64"):
    TARGETS |= {"avx512-bf16": ["-march=skylake-avx512", "-mavx512bf16"], "x86-64": ["-march=x86-64"]}


def compile_c(source: str, tmp_path, flags: list[str]) -> None:
    cpu_kernels._run_compiler(cpu_kernels._compiler(), source, tmp_path / "kernels.so", flags)


@needs_compiler
@pytest.mark.parametrize("target", TARGETS)
def test_the_source_compiles_without_a_warning(tmp_path, target):
    """The exact source the package builds, with its flags (on x86 also for other CPUs),
    every warning an error; -Wmissing-prototypes makes an exported function missing from the
    declarations one too."""
    flags = [flag for flag in cpu_kernels._FLAGS if flag != "-march=native"] + TARGETS[target]
    compile_c(cpu_kernels._SOURCE, tmp_path, flags + WARNINGS)


def changed(name: str, argument: str, c_type: str | None) -> dict:
    """The entry points' declarations with one argument's type changed (None: dropped; a new
    name: added at the end)."""
    arguments = [(a, c_type if a == argument else t) for a, t in cpu_kernels._ENTRY_POINTS[name]]
    if argument not in dict(arguments):
        arguments.append((argument, c_type))
    return cpu_kernels._ENTRY_POINTS | {name: tuple((a, t) for a, t in arguments if t is not None)}


@needs_compiler
@pytest.mark.parametrize(
    "declarations,error",
    [
        ({}, None),  # as declared: compiles
        ({"entry_points": changed("linear_row", "N", "int")}, "qwen_linear_row_bf16"),
        ({"entry_points": changed("decode_blocks", "rot", "float")}, "qwen_decode_blocks_bf16"),
        ({"entry_points": changed("decode_attention", "out", "const uint16_t *")}, "qwen_decode_attention_bf16"),
        ({"entry_points": changed("swiglu_row", "eps", None)}, "qwen_swiglu_row_bf16"),
        ({"entry_points": changed("rms_norm", "extra", "int")}, "qwen_rms_norm_bf16"),
        ({"block_fields": tuple(f for f in cpu_kernels._BLOCK_FIELDS if f != "keys_pos")}, "B_KEYS_POS"),
        ({"block_reals": ("ln_1_eps", "ln_2_eps")}, "R_SCALING"),
        ({"products": ("c_attn", "c_proj", "w1", "mlp_proj")}, "B_W2"),
        ({"product_fields": tuple(f for f in cpu_kernels._PRODUCT_FIELDS if f != "bias_dtype")}, "P_BIAS_DTYPE"),
        ({"dtypes": ("F32", "F16")}, "DT_BF16"),
        ({"gptq_row": cpu_kernels.GPTQ_ROW_ARGUMENTS[:-1]}, "too many arguments"),  # qwen_gptq_row's pointer type
    ],
    ids=[
        "as declared",
        "int64_t as int",
        "int64_t as float",
        "const out",
        "dropped",
        "added",
        "field",
        "real",
        "product",
        "product field",
        "dtype",
        "gptq_row",
    ],  # fmt: skip
)
def test_declarations_that_disagree_with_the_c_code_do_not_compile(tmp_path, declarations, error):
    source = cpu_kernels._source(**declarations)
    flags = ["-fsyntax-only", "-fopenmp", "-march=native"]
    if error is None:
        compile_c(source, tmp_path, flags)
    else:
        with pytest.raises(RuntimeError, match=error):
            compile_c(source, tmp_path, flags)


def test_the_c_definitions_name_their_arguments_as_declared():
    """What the compiler cannot see: two arguments of one type swapped in a definition."""
    defined = {
        name: [re.findall(r"\w+", argument)[-1] for argument in arguments.split(",")]
        for name, arguments in re.findall(r"^void qwen_(\w+)_bf16\(([^)]*)\)", cpu_kernels._DEFINITIONS, re.M)
    }
    assert defined == {name: [a for a, _ in args] for name, args in cpu_kernels._ENTRY_POINTS.items()}
    read = (
        ("B", cpu_kernels._BLOCK_FIELDS), ("B", cpu_kernels._PRODUCTS), ("P", cpu_kernels._PRODUCT_FIELDS),
        ("R", cpu_kernels._BLOCK_REALS),
    )  # fmt: skip
    for prefix, names in read:
        unread = [name for name in names if not re.search(rf"\b{prefix}_{name.upper()}\b", cpu_kernels._DEFINITIONS)]
        assert not unread, f"fields the C code never reads: {unread}"


@needs_compiler
def test_entry_points_take_exactly_the_declared_arguments():
    kernel = cpu_kernels._kernel()
    x, w, out = (torch.ones(4, dtype=torch.bfloat16) for _ in range(3))
    given = dict(x=x.data_ptr(), xs=4, w=w.data_ptr(), out=out.data_ptr(), rows=1, H=4, eps=1e-6, threads=1)
    kernel.rms_norm(**given)
    assert torch.equal(out, torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="missing .* argument: 'eps'"):
        kernel.rms_norm(**{k: v for k, v in given.items() if k != "eps"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'stride'"):
        kernel.rms_norm(**given, stride=4)


def test_table_fields_go_by_name():
    assert cpu_kernels._by_name({"a": 1, "b": 2}, ("b", "a")) == [2, 1]
    with pytest.raises(ValueError, match="'c' not given"):
        cpu_kernels._by_name({"a": 1, "b": 2}, ("a", "c"))
    with pytest.raises(ValueError, match=r"\['b'\] not declared"):
        cpu_kernels._by_name({"a": 1, "b": 2}, ("a",))


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding (rotate-half) of the first ``rot`` dims in torch's float32 ops."""
    rot, half = cos.shape[-1], cos.shape[-1] // 2
    part = x[..., :rot].float()
    rotated = torch.cat((part[..., half:], part[..., :half]), dim=-1)
    return torch.cat(((part * cos + rotated * signed_sin).bfloat16(), x[..., rot:]), dim=-1)


def block_reference(x, parts: BlockParts, keys, values, position, keep, cos, signed_sin, heads, dim):
    """One block through the kernels one by one (and torch's rotary), writing the cache."""
    k = cpu_kernels
    qkv = k.linear_row(k.rms_norm(x, parts.ln_1.weight, parts.ln_1.eps), parts.c_attn.weight, parts.c_attn.bias)
    q, key, value = qkv.view(3, heads, dim)
    keys[0, :, position] = rotary_reference(key, cos, signed_sin)
    values[0, :, position] = value
    seen = slice(0, position + 1)
    query = rotary_reference(q, cos, signed_sin).view(1, heads, 1, dim)
    att = k.decode_attention(query, keys[:, :, seen], values[:, :, seen], keep, parts.scaling)
    h = k.linear_row(att.view(1, 1, -1), parts.c_proj.weight, parts.c_proj.bias, residual=x)
    normed = k.rms_norm(h, parts.ln_2.weight, parts.ln_2.eps)
    gated = k.swiglu_row(normed, parts.w1.weight, parts.w1.bias, parts.w2.weight, parts.w2.bias)
    return k.linear_row(gated, parts.mlp_proj.weight, parts.mlp_proj.bias, residual=h)


def random_block(g, hidden, heads, dim, width, biases: bool, scaling: float) -> BlockParts:
    def product(n_out, n_in):
        weight = (torch.randn(n_out, n_in, generator=g) * n_in**-0.5).bfloat16()
        return Product(weight, (torch.randn(n_out, generator=g) * 0.5).bfloat16() if biases else None)

    def norm(eps):
        return Norm((1 + 0.3 * torch.randn(hidden, generator=g)).bfloat16(), eps)

    return BlockParts(
        ln_1=norm(1e-6), c_attn=product(3 * heads * dim, hidden), c_proj=product(hidden, heads * dim),
        ln_2=norm(0.25), w1=product(width, hidden), w2=product(width, hidden), mlp_proj=product(hidden, width),
        scaling=scaling,
    )  # fmt: skip


def rotary(g, rot):
    angles = torch.rand(rot // 2, generator=g) * 6
    cos, sin = torch.cat((angles, angles)).cos(), torch.cat((angles, angles)).sin()
    return cos, torch.cat((-sin[: rot // 2], sin[rot // 2 :]))


@needs_compiler
@torch.inference_mode()
@pytest.mark.parametrize("dim,rot", [(128, 64), (24, 16)])  # the AVX-512 attention where there is one; portable
def test_block_steps_equal_the_kernels_one_by_one(dim, rot):
    """Three blocks in one call (with and without biases and a mask, each norm its own eps,
    key and value buffers of different room) give the output and write the caches bit for
    bit as the kernels called block by block."""
    g = torch.Generator().manual_seed(dim)
    heads, hidden, width, position = 2, 96, 40, 9
    x = torch.randn(1, 1, hidden, generator=g).bfloat16()
    cos, signed_sin = rotary(g, rot)
    blocks = []
    for i in range(3):
        parts = random_block(g, hidden, heads, dim, width, biases=i != 1, scaling=dim**-0.5 * (1 + i))
        caches = [torch.randn(1, heads, room, dim, generator=g).bfloat16() for room in (position + 5, position + 1)]
        keep = None if i == 2 else torch.rand(1, 1, 1, position + 1, generator=g) > 0.3
        blocks.append((parts, caches, keep))
    steps = BlockSteps(x, cos.view(1, 1, 1, 1, rot), signed_sin.view(1, 1, 1, 1, rot), heads, dim)
    step_caches = [[buffer.clone() for buffer in caches] for _, caches, _ in blocks]
    assert steps.ok
    for (parts, _, keep), (keys, values) in zip(blocks, step_caches, strict=True):
        assert steps.add(parts, keys, values, position, keep)
    out = steps.run()
    expected = x
    for (parts, (keys, values), keep), step_cache in zip(blocks, step_caches, strict=True):
        expected = block_reference(expected, parts, keys, values, position, keep, cos, signed_sin, heads, dim)
        assert torch.equal(step_cache[0], keys) and torch.equal(step_cache[1], values)
    assert out.shape == x.shape and torch.equal(out, expected)


@torch.inference_mode()
def test_block_steps_decline_what_they_do_not_handle():
    g = torch.Generator().manual_seed(0)
    heads, dim, hidden, width, position = 2, 8, 32, 24, 3
    x = torch.randn(1, 1, hidden, generator=g).bfloat16()
    cos, signed_sin = (t.view(1, 1, 1, 1, 8) for t in rotary(g, 8))
    parts = random_block(g, hidden, heads, dim, width, biases=True, scaling=0.3)
    cache = torch.zeros(1, heads, position + 1, dim, dtype=torch.bfloat16)
    declined_steps = [
        (x.float(), cos, signed_sin, heads, dim),  # float32 input
        (torch.zeros(1, 2, hidden, dtype=torch.bfloat16), cos, signed_sin, heads, dim),  # two rows
        (x, cos.double(), signed_sin.double(), heads, dim),  # float64 tables
        (x, cos[..., :7], signed_sin[..., :7], heads, dim),  # an odd number of rotated dims
    ]
    for args in declined_steps:
        steps = BlockSteps(*args)
        assert not steps.ok and not steps.add(parts, cache, cache, position, None) and steps.run() is None
    short = torch.zeros(1, heads, position, dim, dtype=torch.bfloat16)
    declined_blocks = [
        (dataclasses.replace(parts, ln_1=Norm(parts.ln_1.weight.to("meta"), 1e-6)), cache, None),  # norm not on the CPU
        (dataclasses.replace(parts, ln_2=Norm(parts.ln_2.weight.float(), 1e-6)), cache, None),  # a float32 norm
        (dataclasses.replace(parts, c_attn=Product(parts.c_attn.weight[:-1], None)), cache, None),  # wrong size
        (dataclasses.replace(parts, w2=Product(parts.w2.weight[:-1], None)), cache, None),  # two widths
        (dataclasses.replace(parts, mlp_proj=Product(parts.mlp_proj.weight, parts.w1.bias)), cache, None),  # bias size
        (parts, short, None),  # no room at the position
        (parts, cache.transpose(2, 3), None),  # head vectors not contiguous
        (parts, cache, torch.ones(1, 1, 1, position, dtype=torch.bool)),  # mask of the wrong length
        (parts, cache, torch.zeros(1, 1, 1, position + 1)),  # an additive float mask
        (parts, cache, torch.ones(1, 1, 1, 2 * position + 2, dtype=torch.bool)[..., ::2]),  # a strided mask
    ]
    for block, keys, keep in declined_blocks:
        steps = BlockSteps(x, cos, signed_sin, heads, dim)
        if cpu_kernels.available():
            assert steps.ok and steps.add(parts, cache.clone(), cache.clone(), position, None)
        assert not steps.add(block, keys, cache, position, keep)
        assert not steps.add(parts, cache, cache, position, None)  # nor anything after a refusal
        assert steps.run() is None
    with torch.enable_grad():
        assert not BlockSteps(x, cos, signed_sin, heads, dim).ok
