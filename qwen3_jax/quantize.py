"""Write Qwen's block-FP8 checkpoint layout from a bf16 / float32 Hugging Face checkpoint.

    python -m qwen3_jax.quantize --model BF16_DIR --out FP8_DIR [--scale-dtype float32|bfloat16]
        [--max-shard-size 5GB] [--keep-unquantized PATTERN ...]

Each quantized linear (q/k/v/o_proj, expert and dense gate/up/down_proj) becomes `weight`
float8_e4m3fn [out, in] plus `weight_scale_inv` [ceil(out/128), ceil(in/128)]; router gate,
norms, embeddings and lm_head are written bf16. config.json gains the `quantization_config`
block Qwen's -FP8 releases carry; tokenizer and generation files are copied.

Memory stays bounded by one tensor: every output size is known from the input header, so each
shard's safetensors header is written first and tensors are quantized and appended one by one
from the memory-mapped input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys

import ml_dtypes
import numpy as np

from .checkpoint import validate_checkpoint
from .config import Qwen3MoeConfig
from .fp8 import SCALE_DTYPES, dequantize_blocks, module_kept_unquantized, quantize_blocks
from .progress import progress_bar
from .safetensors_io import DTYPE_NAMES, CheckpointError, SafetensorsCheckpoint

BLOCK = (128, 128)
BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
# The linears Qwen quantizes; everything else (router `mlp.gate`, norms, embeddings, lm_head) stays bf16.
QUANTIZED = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.experts\.\d+\.(gate|up|down)_proj"
                       r"|mlp\.(gate|up|down)_proj)\.weight$")
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
SKIPPED_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json")


def quantization_config(keep_unquantized=()) -> dict:
    """The block Qwen3-*-FP8 config.json files carry (modules_to_not_convert only when given)."""
    q = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
         "weight_block_size": list(BLOCK)}
    if keep_unquantized:
        q["modules_to_not_convert"] = list(keep_unquantized)
    return q


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB', '123' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r}; write e.g. 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base ** power)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plan_tensors(ckpt: SafetensorsCheckpoint, keep_unquantized=(), scale_dtype=np.float32):
    """[(input name, [(output name, dtype, shape), ...])] in the order they are written."""
    plan = []
    for name in sorted(ckpt.keys(), key=_natural_key):
        shape = ckpt.shape(name)
        dtype = ckpt.dtype(name)
        if "float8" in str(dtype) or name.endswith("_scale_inv"):
            raise CheckpointError(f"tensor {name} in {ckpt.file_of(name)} is already FP8 ({dtype}); "
                                  "--model must be an unquantized (bf16 / float32) checkpoint")
        if not np.issubdtype(dtype, np.floating) and dtype != BF16:
            raise CheckpointError(f"tensor {name} in {ckpt.file_of(name)} has dtype {dtype}; expected a float "
                                  "weight")
        module = name[: -len(".weight")]
        if QUANTIZED.match(name) and not module_kept_unquantized(module, keep_unquantized):
            scale_shape = tuple(-(-s // b) for s, b in zip(shape, BLOCK))
            plan.append((name, [(name, FP8, shape), (name + "_scale_inv", np.dtype(scale_dtype), scale_shape)]))
        else:
            plan.append((name, [(name, BF16, shape)]))
    return plan


def _nbytes(dtype, shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def assign_shards(plan, max_shard_bytes: int) -> list[list]:
    """Group plan entries (a weight and its scale stay together) into shards of <= max bytes
    (one tensor larger than that gets a shard of its own)."""
    shards, current, size = [], [], 0
    for entry in plan:
        n = sum(_nbytes(dt, sh) for _, dt, sh in entry[1])
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


class StreamingShardWriter:
    """One safetensors file whose header is written up front; tensors are appended in plan order."""

    def __init__(self, path: str, outputs: list[tuple[str, np.dtype, tuple]], metadata: dict[str, str]):
        header, offset = {}, 0
        self.expected = []
        for name, dtype, shape in outputs:
            n = _nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            self.expected.append((name, np.dtype(dtype), tuple(shape)))
            offset += n
        header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)  # tensor data 8-byte aligned, as safetensors writes it
        self.path, self.total = path, offset
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.next = 0

    def write(self, name: str, array: np.ndarray):
        want_name, want_dtype, want_shape = self.expected[self.next]
        if (name, array.dtype, tuple(array.shape)) != (want_name, want_dtype, want_shape):
            raise RuntimeError(f"internal: writing {name} {array.dtype} {array.shape} to {self.path}, "
                               f"header says {want_name} {want_dtype} {want_shape}")
        # From the buffer itself: a bf16 input tensor goes from the memory map to the file uncopied.
        self.f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        self.next += 1

    def close(self):
        self.f.close()
        if self.next != len(self.expected):
            raise RuntimeError(f"internal: {self.path} got {self.next} of {len(self.expected)} tensors")


def convert_tensor(ckpt: SafetensorsCheckpoint, name: str, outputs, scale_dtype) -> list[np.ndarray]:
    src = ckpt.array(name)
    if len(outputs) == 2:
        w8, scale = quantize_blocks(src, BLOCK, scale_dtype)
        return [w8, scale]
    return [src if src.dtype == BF16 else src.astype(BF16)]


def quantize_checkpoint(model_dir: str, out_dir: str, scale_dtype: str = "float32",
                        max_shard_size: str | int = "5GB", keep_unquantized=(), progress: bool = False) -> dict:
    """BF16/F32 checkpoint directory -> Qwen block-FP8 checkpoint directory. Returns a summary dict."""
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"--scale-dtype {scale_dtype!r} is not supported; use one of {sorted(SCALE_DTYPES)}")
    sdt = SCALE_DTYPES[scale_dtype]
    if os.path.abspath(model_dir) == os.path.abspath(out_dir):
        raise ValueError(f"--out {out_dir} is the --model directory; write the FP8 checkpoint elsewhere")
    cfg_path = os.path.join(model_dir, "config.json")
    with open(cfg_path) as f:
        cfg_dict = json.load(f)
    cfg = Qwen3MoeConfig.from_dict(cfg_dict)
    if cfg.fp8 is not None:
        raise CheckpointError(f"{cfg_path} already has a quantization_config (FP8); --model must be the "
                              "unquantized (bf16 / float32) checkpoint")
    ckpt = SafetensorsCheckpoint(model_dir)
    validate_checkpoint(ckpt, cfg)
    if os.path.isdir(out_dir) and any(f.endswith(".safetensors") or f == "config.json" for f in os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already holds a checkpoint; choose an empty --out directory")
    os.makedirs(out_dir, exist_ok=True)

    plan = plan_tensors(ckpt, tuple(keep_unquantized), sdt)
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    shards = assign_shards(plan, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    bar = progress_bar(len(plan), "quantizing", "tensor", progress, leave=True)
    weight_map, total, quantized = {}, 0, 0
    for fname, shard in zip(names, shards):
        outputs = [o for _, outs in shard for o in outs]
        writer = StreamingShardWriter(os.path.join(out_dir, fname), outputs, {"format": "pt"})
        for name, outs in shard:
            for (out_name, _, _), arr in zip(outs, convert_tensor(ckpt, name, outs, sdt)):
                writer.write(out_name, arr)
                weight_map[out_name] = fname
            quantized += len(outs) == 2
            bar.update(1)
        writer.close()
        total += writer.total
    bar.close()
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    cfg_dict["quantization_config"] = quantization_config(keep_unquantized)
    dtype_key = "dtype" if "dtype" in cfg_dict else "torch_dtype"
    cfg_dict[dtype_key] = "bfloat16"  # the unquantized tensors are bf16, as in Qwen's releases
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    copied = _copy_side_files(model_dir, out_dir)
    in_bytes = sum(_nbytes(ckpt.dtype(n), ckpt.shape(n)) for n in ckpt.keys())
    return {"tensors": len(plan), "quantized": quantized, "shards": len(shards), "bytes_in": in_bytes,
            "bytes_out": total, "copied": copied}


def _copy_side_files(model_dir: str, out_dir: str) -> list[str]:
    """Tokenizer, generation config, chat template, README, license: every plain file that is not weights."""
    copied = []
    for fname in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, fname)
        if not os.path.isfile(path) or fname in SKIPPED_FILES or fname.endswith(WEIGHT_FILES):
            continue
        shutil.copy2(path, os.path.join(out_dir, fname))
        copied.append(fname)
    return copied


def dequantize_checkpoint(fp8_dir: str, out_dir: str, dtype=np.float32) -> None:
    """A Qwen block-FP8 checkpoint -> the same model with every FP8 weight dequantized (weight *
    scale_inv, block by block) and no quantization_config: the exact weights FP8 inference
    computes with, loadable by any reader (used as the transformers reference in tests)."""
    with open(os.path.join(fp8_dir, "config.json")) as f:
        cfg_dict = json.load(f)
    q = cfg_dict.pop("quantization_config", None) or {}
    block = tuple(q.get("weight_block_size", BLOCK))
    ckpt = SafetensorsCheckpoint(fp8_dir)
    tensors = {}
    for name in sorted(ckpt.keys(), key=_natural_key):
        if name.endswith("_scale_inv"):
            continue
        w = ckpt.array(name)
        if "float8" in str(w.dtype):
            w = dequantize_blocks(w, ckpt.array(name + "_scale_inv"), block)
        tensors[name] = np.asarray(w).astype(dtype)
    os.makedirs(out_dir, exist_ok=True)
    from .safetensors_io import write_safetensors
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, {"format": "pt"})
    cfg_dict["dtype" if "dtype" in cfg_dict else "torch_dtype"] = str(np.dtype(dtype))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    _copy_side_files(fp8_dir, out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3_jax.quantize",
                                description="Write Qwen's block-FP8 (128x128, e4m3) checkpoint from a bf16/f32 one.")
    p.add_argument("--model", required=True, help="unquantized Hugging Face checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (created; must not hold a checkpoint)")
    p.add_argument("--scale-dtype", default="float32", choices=sorted(SCALE_DTYPES),
                   help="dtype of weight_scale_inv (Qwen's releases use both)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output file, e.g. 5GB or 500MB")
    p.add_argument("--keep-unquantized", nargs="*", default=[], metavar="PATTERN",
                   help="modules left bf16 and listed in modules_to_not_convert (transformers' matching: "
                        "'model.layers.0.self_attn.q_proj', 'o_proj', 'model.layers.3.mlp.experts')")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        s = quantize_checkpoint(args.model, args.out, args.scale_dtype, args.max_shard_size,
                                args.keep_unquantized, progress=not args.no_progress)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {s['tensors']} tensors ({s['quantized']} FP8 + scale_inv {args.scale_dtype}) in "
          f"{s['shards']} file(s), {s['bytes_in'] / 1e9:.3f} GB -> {s['bytes_out'] / 1e9:.3f} GB; "
          f"copied {', '.join(s['copied']) or 'no other files'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
