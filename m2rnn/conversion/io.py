"""Streaming checkpoint I/O: read safetensors tensor by tensor, write sharded safetensors tensor by tensor.

Nothing here holds a whole model: the reader opens every file with `safe_open` and loads one tensor when asked
(keeping the last two, since converters often cut several outputs from one source tensor), and the writer streams
each tensor's bytes into a file whose header is computed up front from the planned names, shapes and dtypes.
Peak memory is therefore about the two largest source tensors plus one output tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..utils import staged_folder

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files carried from the source folder to the output as they are (tokenizer and generation settings).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted exactly: the message names the key, tensor or path at fault."""


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The raw `config.json` of a checkpoint folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    with open(path) as f:
        return json.load(f)


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint folder (one file, or shards with or without an index)."""

    def __init__(self, folder: str | os.PathLike, cache_size: int = 2):
        self.folder = Path(folder)
        self._file_of = self._locate_tensors()
        self._handles: dict[str, Any] = {}
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def _locate_tensors(self) -> dict[str, str]:
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            for file in set(weight_map.values()):
                if not (self.folder / file).is_file():
                    raise ConversionError(f"{index}: shard {file!r} listed in weight_map is missing")
            return dict(weight_map)
        files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
            if pickled:
                raise ConversionError(
                    f"{self.folder}: only pickled weights ({', '.join(pickled)}); convert them to safetensors first "
                    "(pickled files can run arbitrary code and are not read)"
                )
            raise ConversionError(f"{self.folder}: no *.safetensors weights found")
        file_of: dict[str, str] = {}
        for file in files:
            with safe_open(self.folder / file, framework="pt") as handle:
                for name in handle.keys():
                    file_of[name] = file
        return file_of

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        if name not in self._file_of:
            raise ConversionError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.folder / file, framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES_BY_NAME[self._handle(name).get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (kept in a small cache of the most recent ones)."""
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        tensor = self._handle(name).get_tensor(name)
        self._cache[name] = tensor
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tensor


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split names (in order) into shards of at most `max_shard_bytes` (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _header(specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = _numel(shape) * _element_size(dtype)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def write_sharded_safetensors(
    folder: Path,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    max_shard_bytes: int = 5 * 1024**3,
    progress: Callable[[Iterator[str]], Iterator[str]] | None = None,
) -> list[str]:
    """Write `specs` (name → (shape, dtype), in order) as safetensors, calling `produce(name)` one tensor at a time.

    One file `model.safetensors` when everything fits in one shard, else `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`. A produced tensor whose shape differs from its spec raises `ConversionError`.
    Returns the files written.
    """
    sizes = {name: _numel(shape) * _element_size(dtype) for name, (shape, dtype) in specs.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    names = iter(specs)
    if progress is not None:
        names = progress(names)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, shard in zip(files, shards):
        header = _header([(name, *specs[name]) for name in shard])
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for _ in shard:
                name = next(names)
                shape, dtype = specs[name]
                tensor = produce(name)
                if tuple(tensor.shape) != tuple(shape):
                    raise ConversionError(f"tensor {name!r}: built shape {tuple(tensor.shape)}, expected {tuple(shape)}")
                f.write(tensor.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                weight_map[name] = file
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        with open(folder / SAFETENSORS_INDEX, "w") as f:
            json.dump(index, f, indent=2)
    return files


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Copy tokenizer files and `generation_config.json` (whichever exist) from `source` to `target`."""
    copied = []
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


@contextmanager
def staged_output(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to `output`; move it into place on success, delete it on failure.

    Refuses an existing `output` (unless `overwrite`) and any `output` that is, or lies inside, `source`.
    """
    source, output = Path(source).resolve(), Path(output).resolve()
    if output == source or source in output.parents:
        raise ConversionError(f"output {output} is, or lies inside, the source {source}; the source is never written")
    if output.exists() and not overwrite:
        raise ConversionError(f"output {output} already exists (pass overwrite=True / --overwrite to replace it)")
    with staged_folder(output) as staging:
        yield staging
