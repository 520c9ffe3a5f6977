"""Launch knobs of the Triton M2RNN kernels (importable without triton, so the op's signature can name them)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class M2RNNTritonConfig:
    """Launch knobs of the Triton M2RNN kernels. The op runs `DEFAULT_CONFIG`; benchmarks and tests pass their own.

    Attributes:
        checkpoint_interval: steps between two stored states; memory kept for backward is B·N·K·V·S/interval
            float32 values.
        block_k: rows of the state per program (16, 32 or 64) instead of the choice from the shape.
        half_precision_state_dot: run H @ W with float16 operands (float32 accumulation) for 16-bit inputs; the
            carried state stays float32. |H| ≤ max(1, |H_0|), so float16 keeps tf32's 10-bit mantissa.
        loop_unroll: unroll factor of the sequential loops.
        cuda_kernels: run the CUDA kernels (`cuda_forward.cu`, compiled at run time with NVRTC) where they cover
            the case (16-bit inputs, K and V multiples of 16; `cuda_kernels.cuda_forward_covers`), the Triton
            kernels elsewhere. `m2rnn_recurrence(backend="cuda")` sets it.
    """

    checkpoint_interval: int = 64
    block_k: int | None = None
    half_precision_state_dot: bool = False
    loop_unroll: int = 1
    cuda_kernels: bool = False

    def __post_init__(self):
        if self.checkpoint_interval < 1:
            raise ValueError(f"M2RNNTritonConfig: checkpoint_interval must be >= 1, got {self.checkpoint_interval}")
        if self.block_k not in (None, 16, 32, 64):
            raise ValueError(f"M2RNNTritonConfig: block_k must be None, 16, 32 or 64, got {self.block_k}")
        if self.loop_unroll < 1:
            raise ValueError(f"M2RNNTritonConfig: loop_unroll must be >= 1, got {self.loop_unroll}")


DEFAULT_CONFIG = M2RNNTritonConfig()
