"""The routing study: trains every arm of a study config with each seed on
identical batches, then tabulates quality against expert compute and draws
the plots (docs/routing_study.md).

    python scripts/study.py --config configs/study/routing.yaml [--jobs 2]
        [--runs runs/study] [--out docs/routing_study] [--arms a,b] [--report-only]

Each run lives in <runs>/<arm>/seed<k>; a finished run (its last step and
evaluation in metrics.jsonl) is skipped, an unfinished one resumes from its
checkpoint, so the study can be stopped and started again at any point.

Per run, from metrics.jsonl: the final validation loss in bits per byte;
real experts per token averaged over the MoE layers (over the whole run and
over its last quarter); expert FLOPs relative to the baseline arm (the
ratio of whole-run real experts per token: every expert has the same
width); executed / allocated expert rows; dead experts (a real expert with
under 1/(4E) of a layer's picks over the last quarter); MaxVio; the dropped
fraction; the median step time relative to the baseline's. Across seeds: the
mean and standard deviation; a difference from the baseline counts only if
every seed's difference has the same sign and the mean difference exceeds
twice the baseline's standard deviation over seeds. Then the baseline's
trained models are evaluated with `moe.skip_ratio` from 0 to 0.9 (the
heuristic skip), and the `critic` arm's models (if the study has one) with
their routing critics skipping a budget of 0.1 to 0.9 of the tokens' lowest
picks: the share of picks skipped against the change in bits per byte.

An arm with `from: <arm>` starts from that arm's trained model of the same
seed, which it also names as `distill.teacher` (ZEDA-style skip adaptation:
null experts added, KL from the frozen model); it runs after the others,
for its own `train.steps`, and its skipped share (1 - real experts per
token / top_k) and change in bits per byte join the skip curve.
"""

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EXE = os.path.join(os.environ.get("MOEYARD_BUILD_DIR", os.path.join(ROOT, "build")), "moeyard")
LN2 = math.log(2.0)
BEGIN, END = "<!-- study table: begin (scripts/study.py writes it) -->", "<!-- study table: end -->"


def load_study(path):
    with open(path) as f:
        study = yaml.safe_load(f)
    for key in ("base", "seeds", "baseline", "arms"):
        if key not in study:
            sys.exit(f"study: {path} has no '{key}'")
    names = [a["name"] for a in study["arms"]]
    if study["baseline"] not in names:
        sys.exit(f"study: baseline '{study['baseline']}' is not an arm of {path} ({', '.join(names)})")
    return study


def read_metrics(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(run, steps):
    rec = read_metrics(run)
    return bool(rec) and rec[-1]["step"] == steps and "valid_loss" in rec[-1]


def arm_steps(study, arm):
    return arm.get("set", {}).get("train.steps", study["base"]["train"]["steps"])


def train(study, arm, seed, runs):
    """Trains one (arm, seed) run unless it is finished; returns its dir. A
    run made with other settings (the base or the arm changed) is started
    again from scratch."""
    run = os.path.join(runs, arm["name"], f"seed{seed}")
    steps = arm_steps(study, arm)
    sets = {**arm.get("set", {}), "train.seed": seed, "checkpoint.dir": run}
    if "from" in arm:  # the trained model it starts from and learns from
        sets["distill.teacher"] = os.path.join(runs, arm["from"], f"seed{seed}")
    settings = json.dumps({"base": study["base"], "set": sets}, sort_keys=True)
    recorded = os.path.join(run, "settings.json")
    if os.path.exists(recorded) and open(recorded).read() != settings:
        print(f"[study] {arm['name']} seed {seed}: settings changed, training it again", flush=True)
        shutil.rmtree(run)
    if finished(run, steps):
        return run, "done before"
    os.makedirs(run, exist_ok=True)
    with open(recorded, "w") as f:
        f.write(settings)
    base = os.path.join(run, "base.yaml")
    with open(base, "w") as f:
        yaml.safe_dump(study["base"], f)
    args = [EXE, "train", "--config", base, "--resume", "auto"]
    for k, v in sets.items():
        args += ["--set", f"{k}={json.dumps(v) if isinstance(v, bool) else v}"]
    t = time.time()
    with open(os.path.join(run, "train.log"), "a") as log:
        r = subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode != 0 or not finished(run, steps):
        sys.exit(f"study: {arm['name']} seed {seed} failed ({r.returncode}); see {run}/train.log")
    return run, f"{time.time() - t:.0f} s"


def layer_mean(rec, key):
    layers = rec["moe_layers"]
    return sum(layer[key] for layer in layers) / len(layers)


def summarize(run, num_experts, start_step=0):
    """The figures of one finished run (its steps counted from
    `start_step`: where the model it started from ended)."""
    rec = read_metrics(run)
    tail = rec[len(rec) * 3 // 4:]
    late = lambda key: statistics.fmean(layer_mean(r, key) for r in tail)  # noqa: E731
    n_layers = len(rec[0]["moe_layers"])
    dead = 0  # per layer, over the last quarter
    loads, hist = [], [0.0] * (num_experts + 1)
    for j in range(n_layers):
        counts = [sum(r["moe_layers"][j]["tokens_per_expert"][e] for r in tail) for e in range(num_experts)]
        total = sum(counts) or 1.0
        dead += sum(c / total < 1.0 / (4 * num_experts) for c in counts)
        loads.append([c / total for c in counts])
        for r in tail:
            for k, c in enumerate(r["moe_layers"][j]["experts_per_token_histogram"]):
                hist[k] += c
    valid = [(start_step + r["step"], r["valid_loss"] / LN2) for r in rec if "valid_loss" in r]
    return {
        "bpb": valid[-1][1],
        "valid_curve": valid,
        "real_per_token": statistics.fmean(layer_mean(r, "real_experts_per_token") for r in rec),
        "real_per_token_late": late("real_experts_per_token"),
        "executed_over_allocated": late("capacity_utilization"),
        "dropped_fraction": late("dropped_fraction"),
        "max_violation": late("max_violation"),
        "dead_experts": dead,
        "step_s": statistics.median(r["step_s"] for r in rec[len(rec) // 10:]),
        "k_histogram": [h / (sum(hist) or 1.0) for h in hist],
        "loads": loads,
        "tokens_per_step": rec[0]["moe_layers"][0]["tokens"],
    }


def mean_sd(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def tabulate(study, results):
    """One row per arm: seed means, spreads and the significance rule."""
    base_name = study["baseline"]
    base = results[base_name]
    _, base_sd = mean_sd([r["bpb"] for r in base])
    base_flops = statistics.fmean(r["real_per_token"] for r in base)
    base_step = statistics.fmean(r["step_s"] for r in base)
    rows = []
    for arm in study["arms"]:
        runs = results.get(arm["name"])
        if not runs:
            continue
        bpb, sd = mean_sd([r["bpb"] for r in runs])
        deltas = [r["bpb"] - b["bpb"] for r, b in zip(runs, base)]
        mean_delta = statistics.fmean(deltas)
        same_sign = all(d > 0 for d in deltas) or all(d < 0 for d in deltas)
        real = statistics.fmean(r["real_per_token"] for r in runs)
        rows.append({
            "arm": arm["name"],
            "what": arm.get("what", ""),
            "bpb": bpb,
            "bpb_sd": sd,
            "delta_bpb": mean_delta,
            "delta_per_seed": deltas,
            "significant": arm["name"] != base_name and same_sign and abs(mean_delta) > 2 * base_sd,
            "real_per_token": real,
            "real_per_token_late": statistics.fmean(r["real_per_token_late"] for r in runs),
            "expert_flops": real / base_flops,
            "executed_over_allocated": statistics.fmean(r["executed_over_allocated"] for r in runs),
            "step_time": statistics.fmean(r["step_s"] for r in runs) / base_step,
            "dead_experts": statistics.fmean(r["dead_experts"] for r in runs),
            "max_violation": statistics.fmean(r["max_violation"] for r in runs),
            "dropped_fraction": statistics.fmean(r["dropped_fraction"] for r in runs),
        })
    return rows, base_sd


def markdown(rows, base_sd, study):
    out = [
        f"Baseline `{study['baseline']}`; seeds {', '.join(map(str, study['seeds']))}; baseline seed spread "
        f"(sd of bpb) {base_sd:.4f}; * marks a difference that counts (every seed's difference has the same sign "
        f"and the mean exceeds twice that spread).",
        "",
        "| arm | bpb (mean ± sd) | Δ bpb per seed | real experts / token (run; last quarter) | expert FLOPs | "
        "executed / allocated rows | step time | dead experts | MaxVio | dropped |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        deltas = ", ".join(f"{d:+.4f}" for d in r["delta_per_seed"])
        mark = " *" if r["significant"] else ""
        out.append(
            f"| `{r['arm']}` | {r['bpb']:.4f} ± {r['bpb_sd']:.4f}{mark} | {deltas} | "
            f"{r['real_per_token']:.2f}; {r['real_per_token_late']:.2f} | {r['expert_flops']:.2f} | "
            f"{r['executed_over_allocated']:.2f} | {r['step_time']:.2f} | {r['dead_experts']:.1f} | "
            f"{r['max_violation']:.2f} | {r['dropped_fraction']:.3f} |")
    out += ["", "Arms:", ""] + [f"- `{a['name']}`: {a.get('what', '')}" for a in study["arms"]]
    return "\n".join(out) + "\n"


def plots(study, results, rows, skips, critic, adapted, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = {r["arm"]: r for r in rows}
    # 1. Quality against expert compute, with the static top-k frontier.
    fig, ax = plt.subplots(figsize=(7, 5))
    frontier = [by_arm[a] for a in ("top1", "top2", "top3") if a in by_arm]
    if frontier:
        ax.plot([r["expert_flops"] for r in frontier], [r["bpb"] for r in frontier], "k--", lw=1,
                label="static top-1/2/3")
    for r in rows:
        ax.errorbar(r["expert_flops"], r["bpb"], yerr=r["bpb_sd"], fmt="o", capsize=3)
        ax.annotate(r["arm"], (r["expert_flops"], r["bpb"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel(f"expert FLOPs relative to {study['baseline']}")
    ax.set_ylabel("validation bits per byte")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bpb_vs_flops.png"), dpi=120)
    plt.close(fig)
    # 2. Validation loss against tokens (seed means).
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, runs in results.items():
        steps = [s for s, _ in runs[0]["valid_curve"]]
        mean = [statistics.fmean(r["valid_curve"][i][1] for r in runs) for i in range(len(steps))]
        ax.plot([s * runs[0]["tokens_per_step"] for s in steps], mean, marker=".", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation bits per byte")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bpb_vs_tokens.png"), dpi=120)
    plt.close(fig)
    # 3. Real experts per token (last quarter, all MoE layers, seed 0).
    names = list(results)
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(12, 2.4 * math.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        h = results[name][0]["k_histogram"]
        ax.bar(range(len(h)), h)
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(h)))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("share of tokens by number of real experts (last quarter of training)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "k_histograms.png"), dpi=120)
    plt.close(fig)
    # 4. Per-layer load heatmaps (share of each layer's picks, seed 0).
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(12, 2.2 * math.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        loads = results[name][0]["loads"]
        ax.imshow(loads, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.3, max(max(x) for x in loads)))
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_ylabel("MoE layer", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "load_heatmaps.png"), dpi=120)
    plt.close(fig)
    # 5. Loss against the share of picks skipped (heuristic skip).
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([r["skipped"] for r in skips], [r["delta"] for r in skips], yerr=[r["delta_sd"] for r in skips],
                marker="o", capsize=3, label=f"skip_ratio on {study['baseline']}")
    if critic:
        ax.errorbar([r["skipped"] for r in critic], [r["delta"] for r in critic],
                    yerr=[r["delta_sd"] for r in critic], marker="s", capsize=3, label="routing critic on critic")
    for r in adapted:
        ax.errorbar([r["skipped"]], [r["delta_bpb"]], yerr=[r["delta_sd"]], marker="^", capsize=3, ls="none",
                    label=f"{r['arm']} (continues {study['baseline']})")
    ax.set_xlabel("share of picks skipped")
    ax.set_ylabel("Δ validation bits per byte")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "skip_curve.png"), dpi=120)
    plt.close(fig)


def validation_tokens(study):
    """The first eval_batches x micro_batch sequences of the validation
    shard (token shard format: 32-byte header, then little-endian ids)."""
    import numpy as np

    base = study["base"]
    with open(os.path.join(ROOT, base["data"]["valid"]), "rb") as f:
        head = f.read(32)
        width = int.from_bytes(head[12:16], "little")
        data = np.frombuffer(f.read(), dtype=np.uint16 if width == 2 else np.uint32)
    S, n = base["data"]["seq_len"], base["train"]["eval_batches"] * base["train"]["micro_batch"]
    return data[: n * S].astype("int64").reshape(n, S)


def skip_curve(study, runs, ratios=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)):
    """The heuristic skip on the baseline's trained models: each pick whose
    weight is below `ratio` times the token's largest is skipped
    (moe.skip_ratio) at evaluation; per ratio, the share of picks skipped
    and the bits per byte, per seed."""
    import torch

    import moeyard
    from moeyard import checkpoint

    tokens = torch.from_numpy(validation_tokens(study))
    k = study["base"]["moe"]["top_k"]
    curve = []
    for seed in study["seeds"]:
        run = os.path.join(runs, study["baseline"], f"seed{seed}")
        step = os.path.join(run, f"step_{study['base']['train']['steps']}")
        cfg = yaml.safe_load(json.load(open(os.path.join(step, "manifest.json")))["config"])
        state = checkpoint.load(step)
        for ratio in ratios:
            model = moeyard.Transformer({**cfg["model"], "moe": {**cfg["moe"], "skip_ratio": ratio}})
            model.load_state_dict(state)
            model.eval()
            curve.append({"seed": seed, "ratio": ratio,
                          **skipping_point(model, tokens.split(study["base"]["train"]["micro_batch"]), k)})
    return curve


def skipping_point(model, batches, k):
    """A model's bits per byte on the batches and the share of its k picks
    per token it skipped."""
    import torch

    ce, real = [], []
    with torch.no_grad():
        for batch in batches:
            out = model.loss(batch)
            ce.append(out["ce"].item())
            real.append(statistics.fmean(float(m["real_experts_per_token"]) for m in out["moe_layers"]))
    return {"bpb": statistics.fmean(ce) / LN2, "skipped": 1.0 - statistics.fmean(real) / k}


def critic_curve(study, runs, budgets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), arm="critic"):
    """The routing critic's skip on the `arm` models: per budget b, each
    MoE layer's threshold is the b quantile of its critic's predictions on
    the validation tokens without skipping (as the trainer calibrates
    critic.skip_budget; calibrated and measured on the same tokens), then
    the tokens below it skip their lowest pick; per budget the share of
    picks skipped and the bits per byte, per seed. Empty without the arm."""
    import torch

    import moeyard

    if arm not in {a["name"] for a in study["arms"]}:
        return []
    tokens = torch.from_numpy(validation_tokens(study)).split(study["base"]["train"]["micro_batch"])
    k = study["base"]["moe"]["top_k"]
    curve = []
    for seed in study["seeds"]:
        step = os.path.join(runs, arm, f"seed{seed}", f"step_{study['base']['train']['steps']}")
        model = moeyard.Transformer.from_checkpoint(step)
        layers = [f"layers.{i}.moe.critic_threshold" for i in model.moe_layer_indices()]
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name in layers:
                buffers[name].fill_(-math.inf)
            preds = [torch.cat([p.flatten() for p in ps]) for ps in zip(*(model.critic_predictions(b) for b in tokens))]
            for budget in budgets:
                for name, p in zip(layers, preds):
                    ordered = p.sort().values
                    at = min(len(ordered) - 1, round(budget * len(ordered)))
                    buffers[name].fill_(ordered[at].item() if budget > 0 else -math.inf)
                curve.append({"seed": seed, "ratio": budget, **skipping_point(model, tokens, k)})
    return curve


def skip_table(curve):
    """Per skip ratio: the share of picks skipped and the change in bits per
    byte against no skipping, seed means (and sd)."""
    base = {c["seed"]: c["bpb"] for c in curve if c["ratio"] == 0.0}
    rows = []
    for ratio in sorted({c["ratio"] for c in curve}):
        cs = [c for c in curve if c["ratio"] == ratio]
        d, d_sd = mean_sd([c["bpb"] - base[c["seed"]] for c in cs])
        rows.append({"ratio": ratio, "skipped": statistics.fmean(c["skipped"] for c in cs), "delta": d,
                     "delta_sd": d_sd})
    return rows


def skip_markdown(rows, critic_rows, study):
    out = ["", f"Skipping at evaluation only, on the `{study['baseline']}` models (`moe.skip_ratio`: a pick whose "
           "weight is below the ratio times the token's largest is skipped):", "",
           "| skip_ratio | picks skipped | Δ bpb (mean ± sd over seeds) |", "|---:|---:|---:|"]
    out += [f"| {r['ratio']:.1f} | {r['skipped']:.3f} | {r['delta']:+.4f} ± {r['delta_sd']:.4f} |" for r in rows]
    if critic_rows:
        out += ["", "The routing critic's skip at evaluation, on the `critic` models (the tokens whose predicted "
                "loss increase is lowest skip their lowest pick, a budget of the tokens per layer):", "",
                "| budget | picks skipped | Δ bpb (mean ± sd over seeds) |", "|---:|---:|---:|"]
        out += [f"| {r['ratio']:.1f} | {r['skipped']:.3f} | {r['delta']:+.4f} ± {r['delta_sd']:.4f} |"
                for r in critic_rows]
    return "\n".join(out) + "\n"


def adapted_points(study, rows):
    """The arms that start from another's model: their share of picks
    skipped against the baseline's top_k (last quarter) and their change in
    bits per byte."""
    k = study["base"]["moe"]["top_k"]
    derived = {a["name"] for a in study["arms"] if "from" in a}
    return [{**r, "skipped": 1.0 - r["real_per_token_late"] / k, "delta_sd": mean_sd(r["delta_per_seed"])[1]}
            for r in rows if r["arm"] in derived]


def adapted_markdown(points):
    if not points:
        return ""
    out = ["", "Trained to skip (arms that continue the baseline's models; Δ against the baseline's final bpb, so "
           "continuing without skipping is the reference):", "",
           "| arm | picks skipped (last quarter) | Δ bpb (mean ± sd over seeds) | Δ per seed |",
           "|---|---:|---:|---|"]
    out += [f"| `{r['arm']}` | {r['skipped']:.3f} | {r['delta_bpb']:+.4f} ± {r['delta_sd']:.4f} | "
            f"{', '.join(f'{d:+.4f}' for d in r['delta_per_seed'])} |" for r in points]
    return "\n".join(out) + "\n"


def write_report(study, results, out, doc, runs):
    os.makedirs(out, exist_ok=True)
    rows, base_sd = tabulate(study, results)
    skips = skip_table(skip_curve(study, runs))
    critic = skip_table(critic_curve(study, runs)) if "critic" in results else []
    adapted = adapted_points(study, rows)
    table = markdown(rows, base_sd, study) + skip_markdown(skips, critic, study) + adapted_markdown(adapted)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"baseline": study["baseline"], "baseline_sd": base_sd, "rows": rows, "skip": skips,
                   "critic_skip": critic, "adapted": adapted}, f, indent=1)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "delta_per_seed"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plots(study, results, rows, skips, critic, adapted, out)
    if doc and os.path.exists(doc):
        text = open(doc).read()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            with open(doc, "w") as f:
                f.write(head + BEGIN + "\n" + table + END + tail)
    print(table)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "study", "routing.yaml"))
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "study"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "routing_study"),
                    help="where the table (md, csv, json) and plots go")
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "routing_study.md"),
                    help="markdown file whose study-table section is rewritten")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    ap.add_argument("--arms", help="only these arms (comma-separated; the baseline is always run)")
    ap.add_argument("--report-only", action="store_true", help="tabulate finished runs, train nothing")
    a = ap.parse_args()
    study = load_study(a.config)
    arms = study["arms"]
    if a.arms:
        wanted = set(a.arms.split(",")) | {study["baseline"]}
        unknown = wanted - {x["name"] for x in arms}
        if unknown:
            sys.exit(f"study: unknown arms {', '.join(sorted(unknown))}")
        wanted |= {x["from"] for x in arms if x["name"] in wanted and "from" in x}
        arms = [x for x in arms if x["name"] in wanted]
    # Arms that start from another arm's models run after the others.
    arms = sorted(arms, key=lambda x: "from" in x)
    jobs = [(arm, seed) for arm in arms for seed in study["seeds"]]
    if not a.report_only:
        if not os.path.exists(os.path.join(ROOT, study["base"]["data"]["train"])):  # the built-in corpus
            subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--builtin", "--out",
                            os.path.join(ROOT, "data", "builtin"), "--max-bytes", "20000000"], check=True)
        t0 = time.time()

        def one(job):
            run, took = train(study, *job, a.runs)
            return job, took

        done = 0
        for phase in ([j for j in jobs if "from" not in j[0]], [j for j in jobs if "from" in j[0]]):
            with ThreadPoolExecutor(a.jobs) as pool:
                for (arm, seed), took in pool.map(one, phase):
                    done += 1
                    left = (time.time() - t0) / done * (len(jobs) - done)
                    print(f"[study] {done}/{len(jobs)} {arm['name']} seed {seed}: {took} "
                          f"(ETA {left / 60:.0f} min)", flush=True)
    results = {}
    by_name = {x["name"]: x for x in arms}
    for arm, seed in jobs:
        run = os.path.join(a.runs, arm["name"], f"seed{seed}")
        start = arm_steps(study, by_name[arm["from"]]) if "from" in arm else 0
        if finished(run, arm_steps(study, arm)):
            results.setdefault(arm["name"], []).append(summarize(run, study["base"]["moe"]["num_experts"], start))
    if study["baseline"] not in results:
        sys.exit("study: the baseline has no finished run yet")
    n = len(study["seeds"])
    results = {k: v for k, v in results.items() if len(v) == n}  # arms with every seed
    write_report(study, results, a.out, a.doc, a.runs)


if __name__ == "__main__":
    main()
