"""Read and write safetensors files ourselves, memory-mapped, with FP8 dtypes.

safetensors' numpy back end cannot return F8_E4M3 tensors. The format is simple: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, raw bytes. A
memory-mapped numpy view per tensor lets callers slice it and touch only the bytes they need.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that does not match what the config says it should hold."""


class SafetensorsFile:
    """One .safetensors file; tensors come back as read-only memory-mapped numpy views."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        self._base = 8 + n
        header.pop("__metadata__", None)
        self.entries = header
        size = os.path.getsize(path)
        for name, e in header.items():
            if e["dtype"] not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
            end = self._base + e["data_offsets"][1]
            if end > size:
                raise CheckpointError(f"{path}: tensor {name} ends at byte {end} but the file has {size} "
                                      "bytes (truncated download?); fetch the file again")

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def array(self, name: str) -> np.ndarray:
        e = self.entries[name]
        start, end = e["data_offsets"]
        return np.frombuffer(self._mm, dtype=DTYPES[e["dtype"]], count=(end - start) // DTYPES[e["dtype"]].itemsize,
                             offset=self._base + start).reshape(e["shape"])


class SafetensorsCheckpoint:
    """A directory of safetensors: one `model.safetensors` or shards listed in model.safetensors.index.json."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = None
        self.files: dict[str, SafetensorsFile] = {}
        for fname in files:
            path = os.path.join(directory, fname)
            if not os.path.exists(path):
                raise CheckpointError(f"{path} is listed in model.safetensors.index.json but missing; "
                                      "download the checkpoint again")
            self.files[fname] = SafetensorsFile(path)
        self.where: dict[str, str] = {}
        for fname, f in self.files.items():
            for name in f.keys():
                if weight_map is not None and weight_map.get(name) != fname:
                    continue
                self.where[name] = fname
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self.where:
                    raise CheckpointError(f"tensor {name} is listed in model.safetensors.index.json for {fname} "
                                          "but that file does not contain it")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self):
        return self.where.keys()

    def file_of(self, name: str) -> str:
        return self.where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.files[self.where[name]].dtype(name)

    def array(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].array(name)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write numpy arrays (any dtype in DTYPES, including ml_dtypes' bfloat16 and float8) to one file."""
    header, offset = {}, 0
    for name, arr in tensors.items():
        nbytes = arr.nbytes
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
