"""`benchmarks/inspect_sass.py`'s parsing: loops and their instruction counts per kernel of a cubin."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import inspect_sass
finally:
    sys.path.pop(0)

# cuobjdump -sass of a cubin with two kernels whose addresses overlap: each has one loop at 0x0010-0x0030. The
# first is listed with each instruction's control word (stall cycles: bits 41-44), the second without.
SASS = """
	code for sm_90
		Function : walk
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                          /* 0x00000a0000017a02 */
                                                                                    /* 0x000fe20000000800 */
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;                 /* 0x0000000c0804723c */
                                                                                    /* 0x000fe20000000800 */
        /*0020*/                   MUFU.TANH R5, R5 ;                               /* 0x0000000005057308 */
                                                                                    /* 0x004fd600078ec0ff */
        /*0030*/              @!P0 BRA 0x10 ;                                       /* 0xfffffffc00008947 */
                                                                                    /* 0x000fea0003800000 */
        /*0040*/                   EXIT ;                                           /* 0x000000000000794d */
                                                                                    /* 0x000fea0003800000 */
		..........
		Function : states
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                          /* 0x00000a0000017a02 */
        /*0010*/                   FFMA R4, R5, R6, R4 ;                            /* 0x0000000605047223 */
        /*0020*/                   FFMA R4, R5, R6, R4 ;                            /* 0x0000000605047223 */
        /*0030*/               @P0 BRA 0x10 ;                                       /* 0xfffffffc00000947 */
        /*0040*/                   EXIT ;                                           /* 0x000000000000794d */
"""


def test_loops_are_counted_per_kernel():
    functions = inspect_sass.sass_functions(SASS)
    assert list(functions) == ["walk", "states"]
    counts = {}
    for name, instructions in functions.items():
        (start, end), = inspect_sass.loops(instructions)
        assert (start, end) == (0x10, 0x30)
        counts[name] = inspect_sass.histogram(instructions, start, end)
    assert counts["walk"]["total"] == 3 and counts["walk"]["HMMA"] == 1 and counts["walk"]["MUFU"] == 1
    assert counts["states"]["total"] == 3 and counts["states"]["FFMA"] == 2 and counts["states"]["HMMA"] == 0


def test_stall_cycles_are_read_from_the_control_words():
    stalls = inspect_sass.sass_stalls(SASS)
    assert stalls["walk"] == {0x0: 1, 0x10: 1, 0x20: 11, 0x30: 5, 0x40: 5}  # 0x000fe2.. -> 1, 0x004fd6.. -> 11
    assert stalls["states"] == {}
    functions = inspect_sass.sass_functions(SASS)
    assert inspect_sass.loop_stall_cycles(functions["walk"], stalls["walk"], 0x10, 0x30) == 1 + 11 + 5
    assert inspect_sass.loop_stall_cycles(functions["states"], stalls["states"], 0x10, 0x30) is None
