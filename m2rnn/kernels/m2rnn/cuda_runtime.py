"""Compile CUDA C++ kernels at run time with NVRTC and launch them through the driver API (ctypes).

No build step and no extension module: the sources ship as `.cu` files beside this one, are compiled on first use
for the current device with the variant's `-D` options, and kept per process. NVRTC comes with torch's CUDA wheels;
without it (CPU-only torch, ROCm) `cuda_kernels_available()` is False and callers stay on Triton.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import pathlib
import sys
import threading

import torch

_SOURCE_DIR = pathlib.Path(__file__).parent
_LOCK = threading.Lock()
_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute


class CudaKernelError(RuntimeError):
    """NVRTC or the driver refused a kernel (compile error, bad launch)."""


def _open_first(names: list[str]) -> ctypes.CDLL:
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as error:
            errors.append(f"{name}: {error}")
    raise OSError("; ".join(errors))


@functools.lru_cache(maxsize=None)
def _nvrtc() -> ctypes.CDLL:
    try:  # torch knows where its wheel put libnvrtc
        from torch.cuda._utils import _get_gpu_rtc_library

        return _get_gpu_rtc_library()
    except Exception:  # noqa: BLE001 - private helper, absent or failing in some versions
        pass
    names = [f"libnvrtc.so.{major}" for major in (13, 12)] + ["libnvrtc.so"]
    found = ctypes.util.find_library("nvrtc")
    wheels = sorted(str(path) for root in map(pathlib.Path, sys.path) if root.is_dir()
                    for path in root.glob("nvidia/*/lib/libnvrtc.so.*") if "builtins" not in path.name)
    return _open_first(([found] if found else []) + names + wheels)


@functools.lru_cache(maxsize=None)
def _driver() -> ctypes.CDLL:
    return _open_first(["libcuda.so.1", "libcuda.so"])


SOURCES = ("cuda_common.cuh", "cuda_forward.cu", "cuda_backward.cu")


@torch.compiler.assume_constant_result
def cuda_kernels_available() -> bool:
    """True where the CUDA kernels can be compiled and launched: an NVIDIA device, NVRTC, the driver and the
    kernel sources (a flat Hub export of the code carries only Python files). Asked on every recurrence call, so
    answered once per process; under torch.compile a constant of the trace (its file checks cannot be traced, and
    a `fullgraph=True` decode step asks it)."""
    return _cuda_kernels_available()


@functools.lru_cache(maxsize=None)
def _cuda_kernels_available() -> bool:
    if not all((_SOURCE_DIR / name).is_file() for name in SOURCES):
        return False
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    try:
        _nvrtc()
        _driver()
    except OSError:
        return False
    return True


def _check_driver(result: int, what: str) -> None:
    if result != 0:
        message = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(message))
        raise CudaKernelError(f"{what}: CUDA driver error {result} ({(message.value or b'?').decode()})")


def _compile(source: str, name: str, options: tuple[str, ...]) -> bytes:
    """NVRTC: source -> cubin for the options' architecture."""
    nvrtc = _nvrtc()
    program = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(), 0, None, None):
        raise CudaKernelError(f"nvrtcCreateProgram failed for {name}")
    try:
        encoded = [option.encode() for option in options]
        result = nvrtc.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
        if result:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise CudaKernelError(f"compiling {name} with {' '.join(options)}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(program, cubin)
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def compile_options(defines: dict[str, int], arch: str) -> tuple[str, ...]:
    """NVRTC options of one variant: the target architecture, the sources' folder (for `cuda_common.cuh`) and the
    -D parameters, in a stable order."""
    return (f"--gpu-architecture={arch}", "--std=c++17", f"-I{_SOURCE_DIR}",
            *(f"-D{key}={int(value)}" for key, value in sorted(defines.items())))


class CudaKernel:
    """One compiled entry point on one device; `launch` takes tensors, ints and floats in the kernel's order."""

    def __init__(self, cubin: bytes, entry: str, device: torch.device):
        driver = _driver()
        self.module = ctypes.c_void_p()
        self.function = ctypes.c_void_p()
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # makes torch's primary context current on this thread
            _check_driver(driver.cuModuleLoadData(ctypes.byref(self.module), cubin), f"loading {entry}")
            _check_driver(
                driver.cuModuleGetFunction(ctypes.byref(self.function), self.module, entry.encode()),
                f"finding {entry}",
            )
        self.entry = entry
        self.device = device
        self.shared_limit = 48 * 1024  # dynamic shared memory a launch may use without asking
        self._resident: dict[tuple[int, int], int] = {}  # (block, shared bytes) -> blocks per multiprocessor

    def launch(self, grid: int, block: int, args: list, shared_bytes: int = 0) -> None:
        """Launch on the kernel's device's current stream with `shared_bytes` of dynamic shared memory."""
        with torch.cuda.device(self.device):
            self._launch(grid, block, args, shared_bytes)

    def resident_blocks_per_multiprocessor(self, block: int, shared_bytes: int = 0) -> int:
        """How many blocks of `block` threads and `shared_bytes` of dynamic shared memory one multiprocessor holds
        at once (the driver's occupancy calculator: registers, shared memory, threads; asked once per pair)."""
        if (block, shared_bytes) in self._resident:
            return self._resident[block, shared_bytes]
        with torch.cuda.device(self.device):
            self._allow_shared(shared_bytes)
            blocks = ctypes.c_int()
            _check_driver(
                _driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(
                    ctypes.byref(blocks), self.function, block, ctypes.c_size_t(shared_bytes)),
                f"occupancy of {self.entry}",
            )
        self._resident[block, shared_bytes] = blocks.value
        return blocks.value

    def _allow_shared(self, shared_bytes: int) -> None:
        if shared_bytes > self.shared_limit:
            _check_driver(
                _driver().cuFuncSetAttribute(self.function, _MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes),
                f"asking {shared_bytes} bytes of shared memory for {self.entry}",
            )
            self.shared_limit = shared_bytes

    def _launch(self, grid: int, block: int, args: list, shared_bytes: int) -> None:
        self._allow_shared(shared_bytes)
        values = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                values.append(ctypes.c_void_p(arg.data_ptr()))
            elif arg is None:
                values.append(ctypes.c_void_p(0))
            elif isinstance(arg, LongLong):
                values.append(ctypes.c_longlong(arg.value))
            elif isinstance(arg, float):
                values.append(ctypes.c_float(arg))
            else:
                values.append(ctypes.c_int(int(arg)))
        params = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(x), ctypes.c_void_p) for x in values))
        handle = torch.cuda.current_stream().cuda_stream
        _check_driver(
            _driver().cuLaunchKernel(self.function, grid, 1, 1, block, 1, 1, shared_bytes, ctypes.c_void_p(handle),
                                     params, None),
            f"launching {self.entry}",
        )


class LongLong:
    """Marks a kernel argument as `long long` (64-bit) for `CudaKernel.launch`."""

    def __init__(self, value: int):
        self.value = int(value)


_KERNELS: dict[tuple, CudaKernel] = {}


def get_kernel(source_file: str, entry: str, defines: dict[str, int], device: torch.device) -> CudaKernel:
    """The kernel `entry` of `source_file` compiled with `defines` for `device`, compiled once per process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    options = compile_options(defines, f"sm_{major}{minor}")
    key = (source_file, entry, options, index)
    with _LOCK:
        kernel = _KERNELS.get(key)
        if kernel is None:
            source = (_SOURCE_DIR / source_file).read_text()
            kernel = _KERNELS[key] = CudaKernel(_compile(source, entry, options), entry, torch.device("cuda", index))
    return kernel
