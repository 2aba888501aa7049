"""
Which shakespeare_char config reaches the lowest best val loss, as a mean over seeds? (issue 16: <= 1.40)

    python prepare.py
    python experiments/char_best.py --out=out/char_best                          # one H100: 4 configs x 3 seeds
    python experiments/char_best.py --smoke=True --device=cpu --out=/tmp/char_best   # tiny shapes: checks it runs

Every run is `python train.py <base_config> <the config's overrides> --seed=S` in a process of its own, and
`parallel` of them share the GPU at once: one baby GPT leaves most of an H100 idle (its step is bound by
kernel launches and, with input noise, by the CPU), so twelve at once take a few times one run's time, not
twelve times. Runs still going at deadline_s are stopped and keep the evaluations they logged.
Writes <out>/char_best.json (every run's best val; mean, std, min and max per config) and <out>/char_best.png.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from metrics import save_figure  # noqa: E402
from runtime import read_jsonl  # noqa: E402

# character noise as data augmentation (noise.py): the inputs change every epoch, the targets stay clean
CHAR_NOISE = "--noise={'delete': 0.02, 'insert': 0.02, 'transpose': 0.02, 'keyboard': 0.02}"
DEFAULTS = dict(
    out="out/char_best",
    base_config="config/shakespeare_char_best.py",
    configs={  # name -> train.py overrides of base_config
        "best": [],  # as shipped: the reference and the seed spread
        "block512": ["--block_size=512", "--batch_size=32"],  # more context per prediction, same tokens per step
        "noise_3000": [CHAR_NOISE, "--max_iters=3000"],  # augmented data lets it train longer before overfitting
        "noise_block1024_3000": [CHAR_NOISE, "--max_iters=3000", "--block_size=1024", "--batch_size=16"],  # both, further
    },
    seeds=[1337, 1338, 1339],
    parallel=12,        # runs at once on the one device
    device="auto",
    data_dir="data",
    deadline_s=420,     # seconds after the start: runs still going are stopped (their logged evaluations count)
    stagger_s=2.0,      # seconds between starting two runs
    smoke=False,        # tiny shapes and 20 steps, uncompiled: checks the script runs (numbers mean nothing)
)
SMOKE = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=20",
         "--eval_interval=10", "--eval_iters=2", "--log_interval=10", "--compile=False"]
TARGET, NANOGPT = 1.40, 1.4643  # the target; nanoGPT's best val in the same-run measurement


def run_command(cfg, name, seed):
    """(argv, out_dir) of one training run."""
    out_dir = os.path.join(cfg["out"], name, f"seed{seed}")
    argv = [sys.executable, os.path.join(ROOT, "train.py"), cfg["base_config"], *cfg["configs"][name],
            *(SMOKE if cfg["smoke"] else []), f"--seed={seed}", f"--out_dir={out_dir}", f"--device={cfg['device']}",
            f"--data_dir={cfg['data_dir']}", "--overwrite=True"]
    return argv, out_dir


def run_all(cfg):
    """Start every (config, seed) run, at most `parallel` at once; {(name, seed): (exit code, out_dir, seconds)}.
    A run that ran out of GPU memory (many processes starting at once) is started once more."""
    pending = [(name, seed) for seed in cfg["seeds"] for name in cfg["configs"]]  # seed-major: each config starts early
    running, done, retried, start = {}, {}, set(), time.perf_counter()
    # many processes share the CPU cores (one thread and one Inductor compile worker each) and the GPU's memory
    env = os.environ | {"OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1",
                        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    bar = tqdm(total=len(pending), unit="run")
    while pending or running:
        late = cfg["deadline_s"] and time.perf_counter() - start > cfg["deadline_s"]
        while pending and len(running) < cfg["parallel"] and not late:
            key = pending.pop(0)
            argv, out_dir = run_command(cfg, *key)
            os.makedirs(out_dir, exist_ok=True)
            log_path = os.path.join(cfg["out"], f"{key[0]}_seed{key[1]}.log")
            log = open(log_path, "w")
            running[key] = (subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env),
                            log, log_path, out_dir, time.perf_counter())
            time.sleep(cfg["stagger_s"])  # the compilations' memory peaks do not all coincide
        time.sleep(1)
        for key, (proc, log, log_path, out_dir, t0) in list(running.items()):
            if proc.poll() is None and late:
                proc.terminate()  # train.py saves and stops at the next step (SIGTERM is a stop request)
                proc.wait()
            if proc.poll() is None:
                continue
            log.close()
            del running[key]
            with open(log_path) as f:
                out_of_memory = proc.returncode and "out of memory" in f.read()
            if out_of_memory and key not in retried and not late:
                retried.add(key)
                pending.append(key)
                continue
            done[key] = (proc.returncode, out_dir, time.perf_counter() - t0)
            bar.update(1)
    for key in pending:  # never started: the deadline came first
        done[key] = (None, run_command(cfg, *key)[1], 0.0)
    bar.close()
    return done


def summarize_run(code, out_dir, seconds, log_path):
    """Best val (and where) of one run from its metrics.jsonl, or its error."""
    path = os.path.join(out_dir, "metrics.jsonl")
    evals = [r for r in read_jsonl(path) if "val_loss" in r] if os.path.exists(path) else []
    if not evals:
        if not os.path.exists(log_path):
            return dict(exit_code=code, error="not started: the deadline came first")
        with open(log_path) as f:
            return dict(exit_code=code, error=f.read()[-1500:])
    best = min(evals, key=lambda r: r["val_loss"])
    with open(os.path.join(out_dir, "config.json")) as f:
        max_iters = json.load(f)["max_iters"]
    return dict(exit_code=code, best_val=best["val_loss"], best_step=best["step"], best_train_time=best["train_time"],
                last_step=evals[-1]["step"], finished=evals[-1]["step"] >= max_iters, wall_s=seconds,
                curve=[(r["step"], round(r["val_loss"], 4)) for r in evals])


def summarize(cfg, done):
    runs = {name: {} for name in cfg["configs"]}
    for (name, seed), (code, out_dir, seconds) in sorted(done.items()):
        runs[name][seed] = summarize_run(code, out_dir, seconds, os.path.join(cfg["out"], f"{name}_seed{seed}.log"))
    configs = {}
    for name, by_seed in runs.items():
        bests = [r["best_val"] for r in by_seed.values() if "best_val" in r]
        configs[name] = dict(overrides=cfg["configs"][name], seeds=len(bests),
                             stopped_early=sum(not r.get("finished", True) for r in by_seed.values()),
                             mean=statistics.mean(bests) if bests else None,
                             std=statistics.stdev(bests) if len(bests) > 1 else None,
                             min=min(bests, default=None), max=max(bests, default=None),
                             meets_target=bool(bests) and statistics.mean(bests) <= TARGET)
    return runs, configs


def plot(runs, configs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (name, by_seed) in enumerate(runs.items()):
        for j, r in enumerate(v for v in by_seed.values() if "curve" in v):
            steps, vals = zip(*r["curve"])
            curves.plot(steps, vals, color=f"C{i}", lw=1, alpha=0.8, label=name if j == 0 else None)
    names = [n for n in configs if configs[n]["mean"] is not None]
    means = [configs[n]["mean"] for n in names]
    spread = [[configs[n]["mean"] - configs[n]["min"] for n in names], [configs[n]["max"] - configs[n]["mean"] for n in names]]
    bars.bar(range(len(names)), means, yerr=spread, capsize=6, color=[f"C{list(configs).index(n)}" for n in names])
    for ax in (curves, bars):
        ax.axhline(TARGET, color="k", ls="--", lw=0.8, label=f"target {TARGET}")
        ax.axhline(NANOGPT, color="grey", ls=":", lw=0.8, label=f"nanoGPT {NANOGPT}")
        ax.grid(alpha=0.3)
    low = min([v for by_seed in runs.values() for r in by_seed.values() for _, v in r.get("curve", [])], default=1.3)
    curves.set_ylim(low - 0.02, low + 0.4)
    curves.set(xlabel="step", ylabel="val loss", title="val loss, every seed")
    curves.legend(fontsize=8)
    bars.set_xticks(range(len(names)), [f"{n}\n{configs[n]['mean']:.4f}" for n in names], fontsize=8)
    bars.set_ylim(min(configs[n]["min"] for n in names) - 0.02, max(max(configs[n]["max"] for n in names), NANOGPT) + 0.01)
    bars.set(ylabel="best val loss", title="best val: mean over seeds, bars min to max")
    bars.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    if not os.path.exists(os.path.join(ROOT, cfg["base_config"])) and not os.path.exists(cfg["base_config"]):
        raise SystemExit(f"no config at {cfg['base_config']}")
    if not cfg["configs"] or not cfg["seeds"] or cfg["parallel"] < 1:
        raise SystemExit("need at least one config, one seed and parallel >= 1")
    os.makedirs(cfg["out"], exist_ok=True)
    t0 = time.perf_counter()
    done = run_all(cfg)
    runs, configs = summarize(cfg, done)
    write_json_atomic(os.path.join(cfg["out"], "char_best.json"),
                      dict(settings=cfg, command=" ".join(["python", *sys.argv]), wall_s=time.perf_counter() - t0,
                           target=TARGET, configs=configs, runs=runs))
    if any(c["mean"] is not None for c in configs.values()):
        plot(runs, configs, os.path.join(cfg["out"], "char_best.png"))
    for name, c in configs.items():
        if c["mean"] is None:
            print(f"{name:<22} every run failed: see {cfg['out']}/{name}_seed*.log")
        else:
            spread = f" ± {c['std']:.4f}" if c["std"] is not None else ""
            print(f"{name:<22} best val {c['mean']:.4f}{spread} (min {c['min']:.4f}, max {c['max']:.4f}, "
                  f"{c['seeds']} seeds){'  <= target' if c['meets_target'] else ''}"
                  f"{f'  ({n} stopped by deadline_s)' if (n := c['stopped_early']) else ''}")


if __name__ == "__main__":
    main(sys.argv[1:])
