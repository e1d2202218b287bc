"""Every Triton kernel of the package compiles for an H100 (sm_90), on the CPU.

Triton's interpreter, which runs the kernels in the other CPU tests, does not type-check them: at 8444ca6 the
canvas kernel's ``chunks`` mode passed every interpreter test and failed to compile on the GPU (a scalar and a
vector under one name in the tile loop).  ``triton.compile`` needs no GPU to build a kernel down to its cubin,
so each variant the engine launches is compiled here, with the argument types it is launched with."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vllm_s2d2.kernels import row_reductions  # noqa: E402
from vllm_s2d2.model_executor.attention import canvas_kernel  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)


def compile_for_h100(fn, signature: dict[str, str], constexprs: dict[str, object]) -> dict:
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=H100)
    except (FileNotFoundError, RuntimeError) as e:  # no ptxas in this Triton install
        if "ptxas" in str(e):
            pytest.skip(f"Triton cannot build cubins here: {e}")
        raise
    return kernel.asm


@pytest.mark.parametrize("chunked", [False, True], ids=["rows", "chunks"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_canvas_kernel_compiles(chunked, dtype):
    ptrs = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "o_ptr": f"*{dtype}",
            "tables_ptr": "*i8", "row_slot_ptr": "*i32", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32",
            "qsl_ptr": "*i32", "prog_row_ptr": "*i32", "prog_off_ptr": "*i32", "scale": "fp32"}
    strides = {name: "i32" for name in ("stride_qt", "stride_qh", "stride_kb", "stride_ko", "stride_kh", "stride_vb",
                                        "stride_vo", "stride_vh", "stride_ot", "stride_oh", "stride_btr")}
    asm = compile_for_h100(canvas_kernel._canvas_attention_kernel, {**ptrs, **strides},
                           {"G": 2, "W": 8, "D": 128, "PAGE": 16, "BLOCK_M": 16, "TILE": 32, "CHUNKED": chunked})
    assert asm["cubin"]


ROW_KERNELS = {
    "_softmax_kernel": {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_cols": "i32", "stride_x": "i32", "stride_out": "i32"},
    "_sum_kernel": {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_cols": "i32", "stride_x": "i32"},
    "_entropy_collision_kernel": {"p_ptr": "*fp32", "entropy_ptr": "*fp32", "collision_ptr": "*fp32",
                                  "n_cols": "i32", "stride_p": "i32"},
}


@pytest.mark.parametrize("name", sorted(ROW_KERNELS))
def test_row_reduction_kernels_compile(name):
    asm = compile_for_h100(getattr(row_reductions, name), ROW_KERNELS[name], {"BLOCK": row_reductions.BLOCK})
    assert asm["cubin"]


def test_every_kernel_is_listed():
    """A new ``@triton.jit`` kernel of the package gets a case here."""
    import inspect

    jitted = {name for name, obj in inspect.getmembers(row_reductions) if isinstance(obj, triton.JITFunction)}
    assert jitted == set(ROW_KERNELS)
    assert {name for name, obj in inspect.getmembers(canvas_kernel)
            if isinstance(obj, triton.JITFunction)} == {"_canvas_attention_kernel"}
