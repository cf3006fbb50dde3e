"""log.wandb: the trainer's metrics in a Weights & Biases run (offline mode),
read back from W&B's own run file."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from test_train import EXE, metrics, write_config

wandb = pytest.importorskip("wandb")


def wandb_history(run_dir):
    """{step: {key: value}} of every offline W&B run in `run_dir`, from the
    run files (a LevelDB-style log of W&B's Record protobufs: a 7-byte
    header, then in 32 KiB blocks chunks of crc32 / length / type / payload,
    a record in one FULL chunk or in FIRST, MIDDLE..., LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    history, ids = {}, set()
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B"
        pos, block, part = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            _, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
            part += data[pos + 7:pos + 7 + size]
            pos += 7 + size
            if kind not in (1, 4):  # FULL, LAST
                continue
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
            if record.WhichOneof("record_type") == "history":
                items = {}
                for item in record.history.item:  # an image: its fields under nested keys
                    keys = [item.key] if item.key else list(item.nested_key)
                    into = items
                    for k in keys[:-1]:
                        into = into.setdefault(k, {})
                    into[keys[-1]] = json.loads(item.value_json)
                history[record.history.step.num] = items
    return history, ids


def run_env(**extra):
    return dict(os.environ, MOEYARD_PYTHON=sys.executable, WANDB_SILENT="true", **extra)


def train(config, *sets, env=None):
    return subprocess.run([EXE, "train", "--config", str(config), "--set", "log.wandb=moeyard-test", "--set",
                           "log.wandb_mode=offline", *sets], capture_output=True, text=True, timeout=600,
                          env=env or run_env())


def test_offline_run_holds_every_step_and_resume_continues_it(tmp_path, shards):
    """Every number of metrics.jsonl reaches W&B at its step (per MoE layer
    under moe/<stat>/layer<i>), with tokens_per_s and, every log.every
    steps, the expert loads as an image whose pixels are the loads. A
    resumed training continues the same W&B run with the new steps only."""
    from PIL import Image

    cfg = write_config(tmp_path, shards, "run")
    sets = ["--set", "train.eval_every=0", "--set", "checkpoint.every=2", "--set", "log.every=2"]
    r = train(cfg, "--set", "train.steps=3", *sets)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    history, ids = wandb_history(tmp_path / "run")
    records = metrics(tmp_path / "run")
    assert sorted(history) == [rec["step"] for rec in records] == [1, 2, 3]
    for rec in records:
        got = history[rec["step"]]
        for key in ("loss", "ce", "lr", "grad_norm"):
            assert got[key] == pytest.approx(rec[key], rel=1e-6)
        for layer in rec["moe_layers"]:
            assert got[f"moe/max_violation/layer{layer['layer']}"] == pytest.approx(layer["max_violation"], rel=1e-6)
        assert got["tokens_per_s"] > 0
    assert [s for s in sorted(history) if "moe/expert_load" in history[s]] == [2, 3]  # every 2 steps and the last
    image = history[3]["moe/expert_load"]
    assert image["_type"] == "image-file"
    files = glob.glob(os.path.join(tmp_path, "run", "wandb", "offline-run-*", "files", image["path"]))
    assert len(files) == 1
    pixels = Image.open(files[0])
    layers = records[-1]["moe_layers"]
    assert pixels.size == (len(layers[0]["tokens_per_expert"]), len(layers))
    busiest = max(max(layer["tokens_per_expert"]) for layer in layers)
    assert [pixels.getpixel((e, 0)) for e in range(pixels.size[0])] == \
        [round(c / busiest * 255) for c in layers[0]["tokens_per_expert"]]

    r = train(cfg, "--set", "train.steps=5", *sets)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    history, ids = wandb_history(tmp_path / "run")
    assert len(ids) == 1  # one W&B run over both launches
    assert sorted(history) == [1, 2, 3, 4, 5]
    assert history[4]["loss"] == pytest.approx(metrics(tmp_path / "run")[3]["loss"], rel=1e-6)


def fake_wandb(tmp_path, body):
    """A `wandb` module that the feed imports instead of the real one."""
    pkg = tmp_path / "fake" / "wandb"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    return run_env(PYTHONPATH=f"{tmp_path / 'fake'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def test_missing_wandb_fails_before_training_naming_the_fix(tmp_path, shards):
    cfg = write_config(tmp_path, shards, "run")
    r = train(cfg, "--set", "train.steps=2", env=fake_wandb(tmp_path, "raise ImportError('no wandb here')\n"))
    assert r.returncode != 0
    assert f"log.wandb: {sys.executable} -m moeyard.wandb_feed: wandb is not installed for {sys.executable} " \
           "(pip install wandb)" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl") or metrics(tmp_path / "run") == []


def test_refused_run_names_wandbs_reason(tmp_path, shards):
    cfg = write_config(tmp_path, shards, "run")
    body = ("def init(**kw):\n    raise RuntimeError('api_key not configured (no-tty)')\n")
    r = train(cfg, "--set", "train.steps=2", env=fake_wandb(tmp_path, body))
    assert r.returncode != 0
    assert "moeyard.wandb_feed: RuntimeError: api_key not configured (no-tty)" in r.stderr, r.stderr[-2000:]


def test_a_dying_wandb_process_does_not_stop_training(tmp_path, shards):
    """The W&B process crashes at the second step: the training warns once
    and finishes, every step in metrics.jsonl."""
    cfg = write_config(tmp_path, shards, "run")
    body = ("class Run:\n"
            "    def log(self, data, step):\n"
            "        if step == 2:\n            raise SystemExit(3)\n"
            "    def finish(self):\n        pass\n"
            "def init(**kw):\n    return Run()\n")
    r = train(cfg, "--set", "train.steps=6", "--set", "train.eval_every=0", "--set", "checkpoint.every=0",
              env=fake_wandb(tmp_path, body))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [rec["step"] for rec in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    out = r.stdout + r.stderr
    assert out.count("log.wandb: the W&B process has ended") == 1, out[-2000:]


def test_wandb_mode_must_be_online_or_offline(tmp_path, shards):
    cfg = write_config(tmp_path, shards, "run")
    r = subprocess.run([EXE, "train", "--config", str(cfg), "--set", "log.wandb_mode=cloud"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "config: log.wandb_mode (--set log.wandb_mode=cloud): must be online or offline, got 'cloud'" \
        in r.stderr, r.stderr[-1500:]
