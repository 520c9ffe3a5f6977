"""Compile the M2RNN kernels for Hopper (sm_90) without a GPU and count the instructions in their loops.

    python benchmarks/inspect_sass.py [--kernel fwd|bwd|decode|cuda_fwd|cuda_bwd] [--dtype bf16] [--block-k 64]
                                      [--warps 1] [--config FIELD=VALUE ...] [--define NAME=INT ...] [--dump out.sass]

Triton ships ptxas and cuobjdump, so a CPU machine can build the cubin that the H100 would run and show what
each loop iteration issues: tensor-core ops (HMMA), special-function ops (MUFU: tanh), shuffles, shared-memory
round trips and barriers, and the stall cycles the compiler scheduled through it (a lone warp's cycles per
iteration where nothing waits on memory). This is the free half of every tuning step (predict from the instruction mix, then
time on the device); `--config` sets a field of `M2RNNTritonConfig` (e.g. half_precision_state_dot=True).
`cuda_fwd` / `cuda_bwd` build the CUDA kernels (`m2rnn/kernels/m2rnn/cuda_*.cu`, `--block-k` = 16 · tiles per
warp) with the nvcc on PATH, as NVRTC would for the paper's shape (float32 gates, checkpoints, clipping).
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench_m2rnn import parse_config  # benchmarks/ is on the path when this script runs
from m2rnn.kernels import M2RNNTritonConfig
from m2rnn.kernels.m2rnn import backward, decode, forward
from m2rnn.kernels.m2rnn.triton_common import _math_flags

INSTRUCTION_CLASSES = {
    "HMMA": "tensor core", "MUFU": "special function", "SHFL": "shuffle", "BAR": "barrier",
    "LDS": "shared load", "STS": "shared store", "LDSM": "shared load (matrix)", "STSM": "shared store (matrix)",
    "LDG": "global load", "STG": "global store", "FFMA": "fp32 fma", "FMUL": "fp32 mul", "FADD": "fp32 add",
    "MOV": "move", "F2FP": "pack/convert", "HADD2": "fp16x2 add", "HFMA2": "fp16x2 fma", "HMUL2": "fp16x2 mul",
    "MOVM": "matrix transpose", "FMNMX": "fp32 min/max",
}

POINTER_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _signature(kernel_name: str, dtype: str) -> dict[str, str]:
    """Argument types of each kernel (inputs in `dtype`, state and partial gradients float32)."""
    x = POINTER_TYPES[dtype]
    f32, i32 = "*fp32", "*i32"
    if kernel_name == "fwd":
        pointers = dict(q_ptr=x, k_ptr=x, v_ptr=x, w_ptr=x, f_ptr=x, h0_ptr=f32, y_ptr=x, ht_ptr=f32,
                        checkpoint_ptr=f32, cu_seqlens_ptr=i32, chunk_offsets_ptr=i32)
        scalars = dict(seqlen="i32", chunks_per_seq="i32", total_tokens="i32", work_bucket="i32")
    elif kernel_name == "bwd":
        pointers = dict(q_ptr=x, k_ptr=x, v_ptr=x, w_ptr=x, f_ptr=x, checkpoint_ptr=f32, dy_ptr=x, dht_ptr=f32,
                        dq_ptr=f32, dk_ptr=f32, dv_ptr=f32, df_ptr=f32, dw_ptr=f32, dh0_ptr=f32, scratch_ptr=f32,
                        cu_seqlens_ptr=i32, chunk_offsets_ptr=i32)
        scalars = dict(seqlen="i32", chunks_per_seq="i32", total_tokens="i32", work_bucket="i32", clip="fp32")
    else:
        pointers = dict(q_ptr=x, k_ptr=x, v_ptr=x, w_ptr=x, f_ptr=x, state_ptr=f32, y_ptr=x)
        scalars = {f"stride_{a}{b}": "i32" for a in "qkvf" for b in "bh"}
    return {**pointers, **scalars}


def compile_kernel(kernel_name: str, dtype: str, block_k: int, warps: int, config: M2RNNTritonConfig,
                   key_dim: int = 64, value_dim: int = 16, heads: int = 84) -> triton.compiler.CompiledKernel:
    """Build one kernel for sm_90 with the constexprs the host wrapper would pass at the paper's shape."""
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    jit = {"fwd": forward._m2rnn_fwd_kernel, "bwd": backward._m2rnn_bwd_kernel,
           "decode": decode._m2rnn_decode_kernel}[kernel_name]
    fn = jit.fn if hasattr(jit, "fn") and not isinstance(jit, triton.runtime.jit.JITFunction) else jit
    constexprs = dict(N=heads, NQ=1, NK=1, NV=heads, NF=heads, NW=heads, K=key_dim, V=value_dim,
                      BLOCK_K=block_k if kernel_name != "decode" else key_dim, BLOCK_V=max(16, value_dim),
                      **_math_flags(torch_dtype, config))
    if kernel_name != "decode":
        constexprs.update(CHUNK=config.checkpoint_interval, IS_VARLEN=False, LOOP_UNROLL=config.loop_unroll)
    if kernel_name == "fwd":
        constexprs.update(HAS_H0=False, STORE_CHECKPOINTS=True)
    if kernel_name == "bwd":
        constexprs.update(HAS_DHT=False, STORE_DH0=False, CLIP=True)
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    signature = {**_signature(kernel_name, dtype), **{name: "constexpr" for name in constexprs}}
    # what a real launch specialises on: 16-byte aligned pointers (torch allocations are)
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*")}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=1))


CUDA_SOURCES = {"cuda_fwd": "cuda_forward.cu", "cuda_bwd": "cuda_backward.cu"}


def compile_cuda_kernel(kernel_name: str, dtype: str, tiles: int, value_dim: int = 16,
                        defines_set: dict[str, int] | None = None) -> bytes:
    """The cubin of one CUDA kernel variant for sm_90, built with nvcc (same source and -D options as NVRTC);
    `defines_set` overrides the paper shape's -D options (e.g. M2_A1_BESIDE=1)."""
    from m2rnn.kernels.m2rnn import cuda_runtime

    nvcc = shutil.which("nvcc")
    if nvcc is None or dtype == "fp32":
        raise SystemExit(f"{kernel_name}: needs nvcc on PATH and a 16-bit --dtype")
    defines = dict(M2_TILES=tiles, M2_V=value_dim, M2_BF16=dtype == "bf16", M2_VARLEN=0, M2_GATE_F32=1, M2_CHUNK=64)
    if kernel_name == "cuda_fwd":
        defines.update(M2_HAS_H0=0, M2_STORE_CKPT=1, M2_PARTIAL_Y=tiles < 4)
    else:
        defines.update(M2_HAS_DHT=0, M2_STORE_DH0=0, M2_CLIP=1, M2_A1_BESIDE=0)
    defines.update(defines_set or {})
    source = pathlib.Path(cuda_runtime.__file__).parent / CUDA_SOURCES[kernel_name]
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-std=c++17", f"-I{source.parent}",
                        *(f"-D{k}={int(v)}" for k, v in defines.items()), "-o", cubin, str(source)], check=True)
        with open(cubin, "rb") as handle:
            return handle.read()


def disassemble(cubin: bytes) -> tuple[dict[str, list[tuple[int, str]]], dict[str, dict[int, int]]]:
    """(address, instruction text) of every SASS instruction per kernel of the cubin (each kernel's addresses start
    at 0), and each instruction's scheduled stall cycles, through the cuobjdump that Triton ships."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([tool, "-sass", handle.name], capture_output=True, text=True, check=True).stdout
    return sass_functions(text), sass_stalls(text)


def _sections(text: str) -> list[tuple[str, str]]:
    """cuobjdump -sass text -> (kernel name, its listing) per kernel."""
    sections = []
    for section in re.split(r"^\s*Function : ", text, flags=re.MULTILINE)[1:]:
        name, body = section.split("\n", 1)
        sections.append((name.strip(), body))
    return sections


def sass_functions(text: str) -> dict[str, list[tuple[int, str]]]:
    """cuobjdump -sass text -> {kernel name: [(address, instruction text)]}. Kernels are kept apart because their
    addresses overlap (the backward's cubin holds two)."""
    pattern = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
    return {name: [(int(m.group(1), 16), m.group(2)) for m in pattern.finditer(body)] for name, body in _sections(text)}


def sass_stalls(text: str) -> dict[str, dict[int, int]]:
    """{kernel name: {address: stall cycles}}: the cycles the compiler makes the warp wait after each instruction
    before issuing its next (fixed-latency dependencies; variable-latency ones wait on scoreboards instead). On
    Volta and later they are bits 41-44 of an instruction's second 64-bit word, which cuobjdump prints on the line
    after it; instructions listed without it are left out."""
    pattern = re.compile(r"/\*([0-9a-f]{4,})\*/[^\n]*?;\s*/\* 0x[0-9a-f]{16} \*/\s*/\* 0x([0-9a-f]{16}) \*/")
    return {name: {int(m.group(1), 16): (int(m.group(2), 16) >> 41) & 0xF for m in pattern.finditer(body)}
            for name, body in _sections(text)}


def loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(start, end) addresses of innermost loops: backward branches whose body holds no other backward branch."""
    found = []
    for address, text in instructions:
        match = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if match and int(match.group(1), 16) < address:
            found.append((int(match.group(1), 16), address))
    return [(s, e) for s, e in found if not any(s < s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in found)]


def histogram(instructions: list[tuple[int, str]], start: int, end: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for address, text in instructions:
        if start <= address <= end:
            opcode = text.split()[1] if text.startswith("@") else text.split()[0]
            counts[opcode.split(".")[0]] += 1
            counts["total"] += 1
    return counts


def loop_stall_cycles(instructions: list[tuple[int, str]], stalls: dict[int, int], start: int, end: int) -> int | None:
    """The scheduled stall cycles of one pass through a loop: a lone warp's cycles per iteration where nothing
    waits on memory or a scoreboard (None where the listing lacks the control words)."""
    addresses = [address for address, _ in instructions if start <= address <= end]
    if not all(address in stalls for address in addresses):
        return None
    return sum(stalls[address] for address in addresses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=["fwd", "bwd", "decode", *CUDA_SOURCES], default="fwd")
    parser.add_argument("--dtype", choices=list(POINTER_TYPES), default="bf16")
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--warps", type=int, default=1)
    parser.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE",
                        help="set a field of M2RNNTritonConfig (ints, True/False, None)")
    parser.add_argument("--define", action="append", default=[], metavar="NAME=INT",
                        help="cuda_fwd / cuda_bwd: set a -D option of the kernel (e.g. M2_A1_BESIDE=1)")
    parser.add_argument("--dump", help="write the full SASS here")
    args = parser.parse_args()
    config = parse_config(args.config, "--config")
    if args.kernel in CUDA_SOURCES:
        defines = {name: int(value) for name, value in (item.split("=", 1) for item in args.define)}
        functions, stalls = disassemble(
            compile_cuda_kernel(args.kernel, args.dtype, args.block_k // 16, defines_set=defines))
        size = sum(len(x) for x in functions.values())
        summary = f"{args.kernel} {args.dtype} tiles={args.block_k // 16} {args.define}: {size} instructions"
    else:
        kernel = compile_kernel(args.kernel, args.dtype, args.block_k, args.warps, config)
        functions, stalls = disassemble(kernel.asm["cubin"])
        summary = (f"{args.kernel} {args.dtype} BLOCK_K={args.block_k} warps={args.warps} {args.config}: "
                   f"{kernel.n_regs if hasattr(kernel, 'n_regs') else '?'} registers, "
                   f"{kernel.metadata.shared} B shared, {sum(len(x) for x in functions.values())} instructions")
    if args.dump:
        with open(args.dump, "w") as out:
            out.write("\n".join(f"{name} {a:05x} {t}" for name, instructions in functions.items()
                                for a, t in instructions))
    print(summary)
    keys = ["total", *INSTRUCTION_CLASSES]
    print("| kernel | loop | stall cycles | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 3) + "|")
    for name, instructions in functions.items():
        for start, end in loops(instructions):
            counts = histogram(instructions, start, end)
            cycles = loop_stall_cycles(instructions, stalls.get(name, {}), start, end)
            print(f"| {name} | {start:05x}-{end:05x} | {cycles if cycles is not None else '?'} | "
                  + " | ".join(str(counts.get(k, 0)) for k in keys) + " |")


if __name__ == "__main__":
    main()
