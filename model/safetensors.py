"""The safetensors file format, read lazily and written tensor by tensor, in NumPy.

A file is: 8 bytes (little-endian u64) header size N, N bytes of JSON
{name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
then the raw little-endian tensor bytes (offsets relative to the end of the header).
Reading loads one tensor at a time from the header's offsets; writing streams one
tensor at a time. bfloat16 is `ml_dtypes.bfloat16` (shipped
with JAX). Sharded checkpoints have `model.safetensors.index.json` mapping each
tensor name to its file.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
_NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}
INDEX = "model.safetensors.index.json"


class SafetensorsError(ValueError):
  pass


def _header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) != 8:
      raise SafetensorsError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    (size,) = struct.unpack("<Q", prefix)
    try:
      header = json.loads(f.read(size))
    except (ValueError, UnicodeDecodeError) as error:
      raise SafetensorsError(f"{path}: unreadable safetensors header ({error})") from None
  header.pop("__metadata__", None)
  return header, 8 + size


def tensor_files(directory: str) -> dict[str, str]:
  """{tensor name: file path} of a Hugging Face model directory (single or sharded)."""
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(directory, file) for name, file in weight_map.items()}
  files = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
  if not files:
    raise SafetensorsError(f"no *.safetensors files in {directory}")
  names = {}
  for file in files:
    path = os.path.join(directory, file)
    names.update({name: path for name in _header(path)[0]})
  return names


class Reader:
  """Lazy access to the tensors of a model directory: reader[name] -> np.ndarray, read then."""

  def __init__(self, directory: str):
    self.files = tensor_files(directory)
    self._headers = {}

  def __contains__(self, name):
    return name in self.files

  def entry(self, name: str) -> dict:
    path = self.files[name]
    if path not in self._headers:
      self._headers[path] = _header(path)
    header, _ = self._headers[path]
    if name not in header:
      raise SafetensorsError(f"tensor {name} is listed in the index but missing from {path}")
    return header[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entry(name)["shape"])

  def __getitem__(self, name: str) -> np.ndarray:
    entry = self.entry(name)
    path = self.files[name]
    _, data_start = self._headers[path]
    if entry["dtype"] not in DTYPES:
      raise SafetensorsError(f"tensor {name}: dtype {entry['dtype']} is not supported")
    dtype = np.dtype(DTYPES[entry["dtype"]])
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != dtype.itemsize * int(np.prod(shape)):
      raise SafetensorsError(f"tensor {name}: {end - begin} bytes for shape {shape} {dtype}")
    with open(path, "rb") as f:  # one tensor's bytes; freed once the caller converts it
      f.seek(data_start + begin)
      return np.fromfile(f, dtype=dtype.newbyteorder("<"), count=int(np.prod(shape))).reshape(shape)


def write(directory: str, tensors: dict, max_shard_bytes: int = 5 * 2**30,
          metadata: dict | None = None) -> list[str]:
  """Writes {name: (shape, dtype, make_array)} as safetensors files in `directory`.

  `make_array()` is called once per tensor while its bytes are written, so only one
  converted tensor is alive at a time. More than `max_shard_bytes` in all: sharded
  files model-0000i-of-0000n.safetensors plus the index. Returns the file names.
  """
  sizes = {name: int(np.prod(shape)) * np.dtype(dtype).itemsize
           for name, (shape, dtype, _) in tensors.items()}
  shards, current, current_size = [], [], 0
  for name in tensors:
    if current and current_size + sizes[name] > max_shard_bytes:
      shards.append(current)
      current, current_size = [], 0
    current.append(name)
    current_size += sizes[name]
  shards.append(current)
  if len(shards) == 1:
    file_names = ["model.safetensors"]
  else:
    file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for file_name, names in zip(file_names, shards):
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for name in names:
      shape, dtype, _ = tensors[name]
      header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                      "data_offsets": [offset, offset + sizes[name]]}
      offset += sizes[name]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(os.path.join(directory, file_name), "wb") as f:
      f.write(struct.pack("<Q", len(encoded)) + encoded)
      for name in names:
        shape, dtype, make_array = tensors[name]
        array = np.ascontiguousarray(make_array(), dtype=np.dtype(dtype).newbyteorder("<"))
        if array.shape != tuple(shape):
          raise SafetensorsError(f"tensor {name}: made shape {array.shape}, declared {shape}")
        f.write(array.tobytes())
  if len(shards) > 1:
    weight_map = {name: file for file, names in zip(file_names, shards) for name in names}
    with open(os.path.join(directory, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f,
                indent=2)
  return file_names
