"""
How many CPU threads should a µLM use on a busy machine? cpu_quick's training tokens/s and sample.py's
tokens/s at threads=0 (the automatic choice, runtime.set_threads), 1 and 2, with no added load and under a
background load of one busy-loop process per core (started `warm_s` seconds first, so the load average the
automatic choice reads has seen it). train.py and sample.py run as commands, as a user types them.

    python experiments/threads.py --out=experiments/results/threads_cpu

Writes <out>.json (every run: its threads, the count the automatic choice took, tokens/s, the load averages
before it) and <out>.png. A benchmark, not a test: on a shared machine, others' work is part of the load, so
each row records the load average it ran under.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configurator import configure, print_config  # noqa: E402
from metrics import save_figure  # noqa: E402
from runtime import code_version, read_jsonl  # noqa: E402

DEFAULTS = dict(
    config="config/cpu_quick.py",  # the training run measured (its first `steps` steps)
    steps=60,                  # training steps per run (tokens/s counts the steps after the first log row)
    new_tokens=300,            # sample.py tokens per run, from the trained checkpoint
    threads=[0, 1, 2],         # 0: the automatic choice
    loads=[0, 2],              # busy-loop processes started beside the runs (0: no added load)
    warm_s=60.0,               # seconds each added load runs before the first measurement under it
    rounds=1,                  # every (load, threads) measured this many times, the threads interleaved
    data_dir="data",
    out="out/threads",         # <out>.json and <out>.png
)


def busy_loops(n):
    """n processes that spin forever (one per core makes a busy machine); the caller kills them."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def used_threads(text):
    """The CPU threads a run says it used: train.py's device line and sample.py's checkpoint line both name them."""
    found = re.search(r"(\d+) CPU threads?", text)
    return int(found.group(1)) if found else None


def train_speed(cfg, threads, out_dir):
    """(tokens/s over the training steps, threads used) of one train.py run."""
    argv = [sys.executable, "train.py", cfg["config"], f"--out_dir={out_dir}", f"--max_iters={cfg['steps']}",
            f"--eval_interval={cfg['steps']}", "--eval_iters=2", "--log_interval=10", f"--threads={threads}",
            f"--data_dir={cfg['data_dir']}", "--overwrite=True"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=without_omp())
    if done.returncode:
        raise SystemExit(f"train.py failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    rows = [r for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "tokens_per_s" in r]
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    per_step = config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
    first, last = rows[0], rows[-1]  # the first log window (warm-up) is left out
    return per_step * (last["step"] - first["step"]) / (last["train_time"] - first["train_time"]), \
        used_threads(done.stdout)


def sample_speed(cfg, threads, out_dir):
    """(tokens/s, threads used) of one sample.py run from the checkpoint train_speed wrote."""
    argv = [sys.executable, "sample.py", f"--out_dir={out_dir}", f"--max_new_tokens={cfg['new_tokens']}",
            "--stop_at_eot=False", "--seed=1", f"--threads={threads}", "--device=cpu"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=without_omp())
    speed = re.search(r"([\d.]+) tokens/s", done.stderr)
    if done.returncode or not speed:
        raise SystemExit(f"sample.py failed:\n{done.stderr[-1500:]}")
    return float(speed.group(1)), used_threads(done.stderr)


def without_omp():
    """The environment without OMP_NUM_THREADS: each run's --threads decides (0 must not read ours)."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def measure(cfg, load, scratch):
    rows = []
    for round_ in range(cfg["rounds"]):
        for threads in cfg["threads"]:
            before = os.getloadavg()
            t0 = time.time()
            train_tps, train_used = train_speed(cfg, threads, scratch)
            sample_tps, sample_used = sample_speed(cfg, threads, scratch)
            rows.append({"load": load, "threads": threads, "round": round_, "train_tokens_per_s": round(train_tps, 1),
                         "train_threads_used": train_used, "sample_tokens_per_s": sample_tps,
                         "sample_threads_used": sample_used, "loadavg_before": [round(x, 2) for x in before],
                         "seconds": round(time.time() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows, cfg, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("train_tokens_per_s", "sample_tokens_per_s"),
                              ("cpu_quick training", "sample.py decoding")):
        labels, values = [], []
        for load in cfg["loads"]:
            for threads in cfg["threads"]:
                mine = [r[key] for r in rows if r["load"] == load and r["threads"] == threads]
                used = {r["train_threads_used" if key.startswith("train") else "sample_threads_used"]
                        for r in rows if r["load"] == load and r["threads"] == threads}
                name = f"auto ({'/'.join(map(str, sorted(used)))})" if threads == 0 else str(threads)
                labels.append(f"{name}\n{'idle' if not load else f'{load} busy'}")
                values.append(sorted(mine)[len(mine) // 2] if mine else 0)
        bars = ax.bar(range(len(values)), values, color=[f"C{i % len(cfg['threads'])}" for i in range(len(values))])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title}: threads, and the added load")
    fig.tight_layout()
    save_figure(fig, png)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for load in cfg["loads"]:
            spinners = busy_loops(load)
            try:
                if load:
                    time.sleep(cfg["warm_s"])  # the 1-minute load average catches up with the new load
                rows += measure(cfg, load, os.path.join(scratch, "run"))
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
    result = {"config": cfg, "cores": os.cpu_count(), "code": code_version(__file__), "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
    with open(f"{cfg['out']}.json", "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, cfg, f"{cfg['out']}.png")
    print(f"wrote {cfg['out']}.json and {cfg['out']}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
