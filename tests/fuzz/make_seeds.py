"""Seed corpora for the fuzz harnesses: small valid token shards and
safetensors files (standard library only, so scripts/fuzz.sh needs no venv).

    python tests/fuzz/make_seeds.py OUT_DIR   # OUT_DIR/{token_shard,safetensors}/
"""

import json
import os
import struct
import sys

DTYPES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def token_shards():
    for width, count, vocab in [(2, 0, 1), (2, 1, 256), (2, 17, 65536), (4, 5, 70000), (4, 0, 2**32), (4, 64, 50257)]:
        fmt = "<H" if width == 2 else "<I"
        body = b"".join(struct.pack(fmt, (i * 7919) % vocab) for i in range(count))
        yield f"w{width}_n{count}_v{vocab}", b"MOEYTOK1" + struct.pack("<IIQQ", 1, width, count, vocab) + body


def safetensors(tensors, metadata=None, pad=True):
    """tensors: [(name, dtype, shape)], laid out one after another."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = DTYPES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + bytes((i * 31) % 256 for i in range(offset))


def safetensors_seeds():
    yield "empty", safetensors([])
    yield "meta_only", safetensors([], {"format": "pt"})
    yield "one_f32", safetensors([("w", "F32", [2, 3])], {"format": "pt"})
    yield "scalar", safetensors([("s", "F64", [])], pad=False)
    yield "zero_size", safetensors([("z", "BF16", [0, 4]), ("b", "BOOL", [3])])
    yield "all_dtypes", safetensors([(f"t_{d}", d, [2]) for d in DTYPES])
    yield "layers", safetensors([(f"model.layers.{i}.mlp.weight", "F16", [4, 2]) for i in range(3)])


def main(out):
    for kind, seeds in (("token_shard", token_shards()), ("safetensors", safetensors_seeds())):
        d = os.path.join(out, kind)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds:
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main(sys.argv[1])
