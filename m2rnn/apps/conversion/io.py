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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

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


def check_source_folder(folder: str | os.PathLike) -> Path:
    """`folder` as a Path, refused unless it is an existing folder holding a `config.json`."""
    path = Path(folder)
    if not path.exists():
        hint = ""
        if not Path(folder).is_absolute() and str(folder).count("/") == 1:
            hint = (f"; to convert a Hub model, download it first (`hf download {folder} --local-dir DIR`) "
                    "and pass DIR")
        raise ConversionError(f"checkpoint folder {str(folder)!r} does not exist (a local folder is expected){hint}")
    if not path.is_dir():
        raise ConversionError(
            f"checkpoint folder {str(folder)!r} is a file; pass the folder that holds config.json and the safetensors"
        )
    if not (path / "config.json").is_file():
        raise ConversionError(
            f"checkpoint folder {str(folder)!r} has no config.json (expected a Hugging Face checkpoint folder)"
        )
    return path


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The raw `config.json` of a checkpoint folder (a JSON object), or a `ConversionError` naming the file."""
    path = source_file(check_source_folder(folder), "config.json", "config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # UnicodeDecodeError is a ValueError
        raise ConversionError(f"{path}: not readable as JSON ({error})") from error
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a JSON object of config keys, got a {type(raw).__name__}")
    return raw


def source_file(folder: Path, name: str, what: str) -> Path:
    """`folder / name`, refused when it leads out of `folder`: `..`, an absolute path, or a symlink to elsewhere.

    A Hugging Face cache snapshot (`.../snapshots/REV/`) may link into its own repository's `blobs/` folder.
    """
    path = folder / name
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    target = path.resolve()
    if not any(target == place or place in target.parents for place in allowed):
        raise ConversionError(
            f"{what} {name!r} leads outside the source folder {str(folder)!r} (to {target}); "
            "a checkpoint's files must lie inside its folder"
        )
    return path


def _open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as error:
        raise ConversionError(f"{path}: not a readable safetensors file ({error}); is it truncated or damaged?") from error


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint folder (one file, or shards with or without an index).

    Every file is checked when the reader is made: shards inside the folder, readable safetensors headers, and the
    index's tensors present in the shards it names.
    """

    def __init__(self, folder: str | os.PathLike, cache_size: int = 2):
        self.folder = Path(folder)
        self._handles: dict[str, Any] = {}
        self._file_of = self._locate_tensors()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def _locate_tensors(self) -> dict[str, str]:
        index = self.folder / SAFETENSORS_INDEX
        if index.exists():
            weight_map = self._read_index(source_file(self.folder, SAFETENSORS_INDEX, "index"))
            names_in: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                names_in.setdefault(file, []).append(name)
            for file, names in names_in.items():
                path = source_file(self.folder, file, f"{index}: shard")
                if not path.is_file():
                    raise ConversionError(f"{index}: shard {file!r} listed in weight_map is missing")
                present = set(self._open(file).keys())
                absent = [name for name in names if name not in present]
                if absent:
                    raise ConversionError(
                        f"{index}: {len(absent)} tensor(s) listed for {file!r} are not in it, e.g. {absent[:3]}"
                    )
            return weight_map
        files = sorted(p.name for p in self.folder.glob("*.safetensors") if p.is_file())
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
            source_file(self.folder, file, "weights file")
            for name in self._open(file).keys():
                if name in file_of:
                    raise ConversionError(f"{self.folder}: tensor {name!r} is in both {file_of[name]!r} and {file!r}")
                file_of[name] = file
        return file_of

    @staticmethod
    def _read_index(path: Path) -> dict[str, str]:
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as error:
            raise ConversionError(f"{path}: not readable as JSON ({error})") from error
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(
                f"{path}: no `weight_map` (an object mapping each tensor name to its shard file); "
                "fix or delete the index"
            )
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file:
                raise ConversionError(f"{path}: weight_map[{name!r}]={file!r} must be a shard file name")
        return dict(weight_map)

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = _open_safetensors(self.folder / file)
        return self._handles[file]

    def files(self) -> list[Path]:
        """Every weights file this reader reads."""
        return [self.folder / file for file in dict.fromkeys(self._file_of.values())]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        if name not in self._file_of:
            raise ConversionError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        return self._open(self._file_of[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        stored = self._handle(name).get_slice(name).get_dtype()
        if stored not in _DTYPES_BY_NAME:
            raise ConversionError(
                f"{self.folder}: tensor {name!r} is stored as {stored}, which conversion does not read "
                f"(supported: {', '.join(_DTYPES_BY_NAME)}); dequantize the checkpoint first"
            )
        return _DTYPES_BY_NAME[stored]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (kept in a small cache of the most recent ones)."""
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        try:
            tensor = self._handle(name).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ConversionError(f"{self.folder / self._file_of[name]}: cannot read tensor {name!r} ({error})") from error
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
    on_written: Callable[[str], None] | None = None,
) -> list[str]:
    """Write `specs` (name → (shape, dtype), in order) as safetensors, calling `produce(name)` one tensor at a time.

    One file `model.safetensors` when everything fits in one shard, else `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`. A produced tensor whose shape differs from its spec raises `ConversionError`.
    `on_written(name)` is called after each tensor (e.g. to advance a progress bar). Returns the files written.
    """
    sizes = {name: _numel(shape) * _element_size(dtype) for name, (shape, dtype) in specs.items()}
    shards = plan_shards(sizes, max_shard_bytes)
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
            for name in shard:
                shape, dtype = specs[name]
                tensor = produce(name)
                if tuple(tensor.shape) != tuple(shape):
                    raise ConversionError(f"tensor {name!r}: built shape {tuple(tensor.shape)}, expected {tuple(shape)}")
                f.write(tensor.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                weight_map[name] = file
                if on_written is not None:
                    on_written(name)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        with open(folder / SAFETENSORS_INDEX, "w") as f:
            json.dump(index, f, indent=2)
    return files


def side_files(source: Path) -> list[str]:
    """The tokenizer files and `generation_config.json` that `source` holds (checked to lie inside it)."""
    return [name for name in SIDE_FILES if (source / name).is_file() and source_file(source, name, "file")]


def copy_side_files(source: Path, target: Path, names: list[str]) -> None:
    """Copy the files `names` (see `side_files`) from `source` to `target`."""
    for name in names:
        shutil.copy2(source / name, target / name)
