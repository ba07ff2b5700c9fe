"""The Triton kernels compiled for Ada (sm_89) and Hopper (sm_90) without a GPU: Triton's front end, its MLIR and
LLVM passes and the ptxas bundled with the triton wheel, as on a GPU at first launch.

The CPU interpreter (``TRITON_INTERPRET=1``, test_cuda_kernels.py) runs the kernels' arithmetic but checks no
types: a kernel that only fails to compile (a name given two pointer types in the branches of a runtime ``if``,
an FP8 conversion the target lacks) passes there. Each kernel is compiled here in the configurations the runtime
launches, the FP8 ones included; the PTX must round to FP8 with the saturating conversion.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiling needs Triton's compiler, not its interpreter", allow_module_level=True)
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a Triton without the ahead-of-time API
    pytest.skip("this Triton cannot compile ahead of time", allow_module_level=True)

from tritonize.runtime import cuda_kernels as k  # noqa: E402

ROTARY = {"q_out_ptr": "*bf16", "qkv_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "slot_ptr": "*i64",
          "k_cache_ptr": "*{cache}", "v_cache_ptr": "*{cache}", "stride_qkv": "i32", "stride_cs": "i32",
          "stride_cache": "i32", "k_scale": "fp32", "v_scale": "fp32"}
ATTENTION = {"out_ptr": "*bf16", "q_ptr": "*bf16", "k_cache_ptr": "*{cache}", "v_cache_ptr": "*{cache}",
             "block_tables_ptr": "*i64", "seq_lens_ptr": "*i64", "query_start_loc_ptr": "*i64", "scale": "fp32",
             "num_seqs": "i32", "stride_q_tok": "i32", "stride_q_head": "i32", "stride_o_tok": "i32",
             "stride_o_head": "i32", "stride_k_blk": "i32", "stride_k_tok": "i32", "stride_k_head": "i32",
             "stride_v_blk": "i32", "stride_v_tok": "i32", "stride_v_head": "i32", "stride_bt": "i32", "v_scale": "fp32",
             "acc_ws_ptr": "*fp32", "ml_ws_ptr": "*fp32", "n_heads": "i32"}
COMBINE = {"out_ptr": "*bf16", "acc_ws_ptr": "*fp32", "ml_ws_ptr": "*fp32", "n_heads": "i32", "stride_o_tok": "i32",
           "stride_o_head": "i32", "v_scale": "fp32"}
CASES = {
    "rotary_and_cache": (k._rotary_cache_kernel, ROTARY,
                         {"H": 32, "HKV": 8, "D": 128, "D_P": 128, "HALF": 64, "HALF_P": 64, "ROPE": True}),
    "rotary_and_cache, partial rotary": (k._rotary_cache_kernel, ROTARY,
                                         {"H": 4, "HKV": 1, "D": 24, "D_P": 32, "HALF": 4, "HALF_P": 4, "ROPE": True}),
    "rotary_and_cache, no rotary": (k._rotary_cache_kernel, ROTARY,
                                    {"H": 4, "HKV": 4, "D": 32, "D_P": 32, "HALF": 1, "HALF_P": 1, "ROPE": False}),
    "paged_attention, decode": (k._paged_attention_kernel, ATTENTION,
                                {"GROUP": 4, "GROUP_P": 4, "HEAD_DIM": 128, "HEAD_P": 128, "BLOCK_SIZE": 16,
                                 "BLOCK_Q": 4, "BLOCK_M": 16, "BLOCK_N": 64, "WINDOW": 0, "IEEE": False,
                                 "NUM_SPLITS": 1}),
    "paged_attention, decode, keys shared among 16": (k._paged_attention_kernel, ATTENTION,
                                                      {"GROUP": 4, "GROUP_P": 4, "HEAD_DIM": 128, "HEAD_P": 128,
                                                       "BLOCK_SIZE": 16, "BLOCK_Q": 4, "BLOCK_M": 16, "BLOCK_N": 64,
                                                       "WINDOW": 0, "IEEE": False, "NUM_SPLITS": 16}),
    "paged_attention, prefill with a window": (k._paged_attention_kernel, ATTENTION,
                                               {"GROUP": 4, "GROUP_P": 4, "HEAD_DIM": 128, "HEAD_P": 128,
                                                "BLOCK_SIZE": 16, "BLOCK_Q": 16, "BLOCK_M": 64, "BLOCK_N": 64,
                                                "WINDOW": 4096, "IEEE": False, "NUM_SPLITS": 1}),
    "paged_attention, the shares added": (k._combine_splits_kernel, COMBINE,
                                          {"HEAD_DIM": 128, "HEAD_P": 128, "NUM_SPLITS": 16}),
}


def _compile(fn, signature: dict, constants: dict, capability: int) -> str:
    ast = ASTSource(fn=fn, signature={**signature, **{c: "constexpr" for c in constants}}, constexprs=constants)
    return triton.compile(ast, target=GPUTarget("cuda", capability, 32)).asm["ptx"]


@pytest.mark.parametrize("capability", [89, 90])
@pytest.mark.parametrize("cache", ["bf16", "fp8e4nv"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_kernels_compile_for_fp8_gpus(case, cache, capability):
    fn, signature, constants = CASES[case]
    signature = {name: kind.format(cache=cache) for name, kind in signature.items()}
    ptx = _compile(fn, signature, {**constants, "FP8_CACHE": cache == "fp8e4nv"}, capability)
    if cache == "fp8e4nv" and "rotary" in case:
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert f".target sm_{capability}" in ptx


@pytest.mark.parametrize("static", [False, True])
def test_the_activation_quantization_kernel_compiles(static):
    ptx = _compile(k._per_token_fp8_kernel, {"out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "x_ptr": "*bf16",
                                             "static_ptr": "*fp32", "n_cols": "i32"},
                   {"STATIC": static, "BLOCK": 16384}, 90)
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "div.rn.f32" in ptx


LINEAR = {"out_ptr": "*{out}", "x_ptr": "*{x}", "x_scale_ptr": "*fp32", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
          "part_ptr": "*fp32", "count_ptr": "*i32", "m": "i32", "n": "i32", "k": "i32", "k_split": "i32",
          "m_tiles": "i32"}


def _linear_signature(activations: str) -> dict:
    out = "bf16" if activations == "fp8e4nv" else activations
    return {name: kind.format(out=out, x=activations) for name, kind in LINEAR.items()}


SHARED_LIMIT = {89: 101_376, 90: 232_448}  # bytes of shared memory a block may use: Ada, Hopper
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8e4nv": 1}


def _runtime_tilings() -> list[tuple]:
    """Each distinct (capability, activations, tiling) the runtime picks for the 8B shape's linears and a small
    float32 model's, at each step size it sends to the kernel (weight-only at most 64 rows)."""
    picked = set()
    for capability in SHARED_LIMIT:
        for n, k_dim in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (48, 96)]:
            for activations, nbytes in ACTIVATION_BYTES.items():
                for m in (1, 16, 32, 64, 128, 256):
                    if m > 64 and nbytes > 1 or activations == "fp16" and m > 16:  # fp16: as bf16, fewer
                        continue
                    picked.add((capability, activations, k.fp8_tiling(m, n, k_dim, nbytes, hopper=capability >= 90)))
    return sorted(picked, key=repr)


@pytest.mark.parametrize("capability, activations, t", _runtime_tilings(), ids=repr)
def test_the_fp8_linear_kernel_compiles_in_each_tiling_and_fits(capability, activations, t):
    """The tilings the runtime picks (their pipeline depth included) compile and fit the shared memory of the GPU
    they are picked for, an Ada's or a Hopper's; the PTX multiplies as intended."""
    constants = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "SPLIT_K": t.split_k,
                 "X_FP8": activations == "fp8e4nv", "IEEE": activations == "fp32"}
    ast = ASTSource(fn=k._fp8_linear_kernel,
                    signature={**_linear_signature(activations), **{c: "constexpr" for c in constants}},
                    constexprs=constants)
    compiled = triton.compile(ast, target=GPUTarget("cuda", capability, 32),
                              options={"num_stages": t.num_stages, "num_warps": t.num_warps})
    assert 0 < compiled.metadata.shared <= SHARED_LIMIT[capability]
    ptx = compiled.asm["ptx"]
    assert f".target sm_{capability}" in ptx
    # 16-bit and FP8 activations on the tensor cores (FP8 x FP8 as e4m3 operands), one row and float32 on FMAs
    assert ("mma" in ptx) == (activations != "fp32" and t.block_m > 1)
    if activations == "fp8e4nv":
        assert "e4m3.e4m3" in ptx and "cvt.rn.f16x2.e4m3x2" not in ptx  # both operands FP8, nothing widened
    assert ("atom.global" in ptx) == (t.split_k > 1)  # the shares meet at a per-tile counter
