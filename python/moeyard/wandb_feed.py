"""The W&B side of ``log.wandb``: the trainer (rank 0) starts this module
with a socket as its standard input and sends one JSON line per step.

The first line opens the run (project, mode, name, dir, config); this answers
``ready`` or ``error <reason>``. Each further line is a step: its scalars
under their dashboard names and, every ``log.every`` steps, the experts'
loads (a row per MoE layer, in [0, 1]), logged as the image
``moe/expert_load``. The end of the input finishes the run. Signals meant
for the trainer (Ctrl-C, a scheduler's SIGTERM) are left to it: this process
ends when the trainer closes the socket, also when the trainer was killed.

The W&B run id is kept in ``<dir>/wandb/moeyard-run-id`` so that a resumed
training continues the same W&B run.
"""

import json
import os
import secrets
import signal
import socket
import string
import sys


def _open_run(spec: dict):
    import wandb

    os.makedirs(os.path.join(spec["dir"], "wandb"), exist_ok=True)
    id_file = os.path.join(spec["dir"], "wandb", "moeyard-run-id")
    if os.path.exists(id_file):
        run_id = open(id_file).read().strip()
    else:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        with open(id_file, "w") as f:
            f.write(run_id + "\n")
    return wandb.init(project=spec["project"], name=spec["name"], dir=spec["dir"], mode=spec["mode"],
                      config=spec["config"], id=run_id, resume="allow")


def _step_data(record: dict) -> dict:
    data = dict(record["scalars"])
    if "expert_load" in record:
        import numpy as np
        import wandb

        load = np.asarray(record["expert_load"], dtype=np.float64)
        data["moe/expert_load"] = wandb.Image(np.round(load * 255).astype(np.uint8), mode="L")
    return data


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The socket on a descriptor of its own, /dev/null as stdin: processes
    # that wandb starts must not hold the trainer's socket open.
    sock = socket.socket(fileno=os.dup(0))
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    lines = sock.makefile("rb")
    spec = json.loads(lines.readline())
    try:
        run = _open_run(spec)
    except ImportError as e:
        reason = " ".join(str(e).split())
        sock.sendall(f"error wandb is not installed for {sys.executable} (pip install wandb): {reason}\n".encode())
        return
    except Exception as e:  # noqa: BLE001  (wandb's errors: a login, a bad project, ...)
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        sock.sendall(f"error {reason}\n".encode())
        return
    sock.sendall(b"ready\n")
    for line in lines:
        record = json.loads(line)
        run.log(_step_data(record), step=record["step"])
    run.finish()


if __name__ == "__main__":
    main()
