"""Reading native moeyard checkpoints (``<dir>/step_<N>/``) from Python.

A one-process run writes ``model.safetensors``; each rank of a multi-process
run writes ``model-rank<r>.safetensors`` with the tensors it owns: whole
replicated tensors, and tensor-parallel pieces or expert slices whose
``__metadata__`` entry (``{"dim", "parts", "index", "count"}``) places them
in the full tensor. :func:`load` verifies every file against the manifest's
SHA-256 and returns full tensors under their global names, whatever the
layout the checkpoint was saved at (docs/training.md).
"""

import hashlib
import json
import os
import re

import torch


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _join(pieces, dim, parts):
    if parts == 1:
        return torch.cat(pieces, dim)
    width = pieces[0].shape[dim] // parts
    return torch.cat([p.narrow(dim, b * width, width) for b in range(parts) for p in pieces], dim)


def load(step_dir, kind="model"):
    """Full tensors of a checkpoint's ``kind`` files ("model" or "optimizer")."""
    from safetensors import safe_open

    with open(os.path.join(step_dir, "manifest.json")) as f:
        manifest = json.load(f)
    pattern = re.compile(rf"^{kind}(-rank\d+)?\.safetensors$")
    whole, pieces = {}, {}
    files = sorted(f for f in manifest["sha256"] if pattern.match(f))
    if not files:
        raise ValueError(f"checkpoint {step_dir}: no {kind} files in manifest.json")
    for name in files:
        path = os.path.join(step_dir, name)
        if _sha256(path) != manifest["sha256"][name]:
            raise ValueError(f"checkpoint {path}: SHA-256 mismatch with manifest.json")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                t = f.get_tensor(key)
                if key not in meta:
                    if key in whole or key in pieces:
                        raise ValueError(f"checkpoint {path}: tensor '{key}' is also in another file")
                    whole[key] = t
                    continue
                m = json.loads(meta[key])
                entry = pieces.setdefault(key, {"dim": m["dim"], "parts": m["parts"], "count": m["count"], "by": {}})
                if (key in whole or m["index"] in entry["by"]
                        or (entry["dim"], entry["parts"], entry["count"]) != (m["dim"], m["parts"], m["count"])):
                    raise ValueError(f"checkpoint {path}: piece {m['index']} of tensor '{key}' "
                                     "does not fit the other pieces")
                entry["by"][m["index"]] = t
    for key, e in pieces.items():
        if sorted(e["by"]) != list(range(e["count"])):
            raise ValueError(f"checkpoint {step_dir}: tensor '{key}' has pieces {sorted(e['by'])} of {e['count']}")
        whole[key] = _join([e["by"][i] for i in range(e["count"])], e["dim"], e["parts"])
    return whole
