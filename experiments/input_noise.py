"""
Does input noise make a sturdier character model? Each noise family, and a mix, against no noise at
equal steps on shakespeare_char: (a) clean val loss, (b) val loss on a noised copy of val.

    python experiments/input_noise.py --out=out/input_noise                       # CPU, cpu_quick shape
    python experiments/input_noise.py --device=cuda --workers=3 --train_config=config/shakespeare_char_best.py \
        --max_iters=1500 --eval_iters=100 --evals=6 --time_limit_s=300 --out=out/input_noise_gpu   # one H100, < 8 min

Every run is train.py with the same config, seed and steps, only `noise` differs. The noised val
copy uses `val_noise` (all character families at once) on fixed batches; its targets stay clean.
Noise can only cure overfitting where there is some: `train_tokens=N` trains on the first N characters
of the training split (the same val), so a CPU-sized model overfits its slice in minutes as the GPU
model overfits the whole corpus; `evals` > 1 logs train and val loss along the way (the gap, and
the step where val turns up). `seeds` repeats every run; `time_limit_s` starts no run after it.
Writes <out>/input_noise.json and <out>/input_noise.png; each run's folder is <out>/<name>_s<seed>.
"""
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import atomic_write, load_checkpoint, load_model, read_json, write_json_atomic  # noqa: E402
from configurator import configure, print_config, settings  # noqa: E402
from metrics import save_figure  # noqa: E402
from data import get_batch, open_dataset  # noqa: E402
from noise import InputNoise  # noqa: E402
from scripts import run_script  # noqa: E402
from runtime import read_jsonl, resolve_device, run_in_processes  # noqa: E402

DEFAULTS = dict(
    out="out/input_noise",
    train_config="config/cpu_quick.py",
    overrides=[],           # more --key=value for every run, e.g. ["--n_layer=2", "--n_embd=64"]
    max_iters=300,
    device="cpu",
    workers=1,              # runs trained at once in separate processes (a baby GPT leaves most of a GPU idle)
    seeds=[1337],           # every run once per seed
    eval_iters=20,
    evals=1,                # train/val evaluations during each run (the last at max_iters)
    train_tokens=0,         # train on the first N tokens of the training split only (0: all of it)
    time_limit_s=0,         # no run starts after this many seconds (0: no limit); finished runs are kept
    runs={  # name -> noise; every run trains for max_iters steps from the same seed
        "none": {},
        "mask": {"mask": 0.15},
        "delete": {"delete": 0.03},
        "insert": {"insert": 0.03},
        "transpose": {"transpose": 0.03},
        "keyboard": {"keyboard": 0.03},
        "whitespace": {"whitespace": 0.03},
        "repeat": {"repeat": 0.2},
        "mix": {"mask": 0.05, "delete": 0.01, "insert": 0.01, "transpose": 0.01, "keyboard": 0.01,
                "whitespace": 0.01, "repeat": 0.1},
    },
    val_noise={"delete": 0.02, "insert": 0.02, "transpose": 0.02, "keyboard": 0.02, "whitespace": 0.02, "repeat": 0.2},
)
EVAL_SEED = 4321
KEYS = ("train_clean", "val_clean", "val_noisy", "best_val")  # the numbers of each run, averaged over seeds


def train_slice(meta, train_tokens):
    """The dataset with only the first train_tokens tokens of its training split (val and vocabulary
    unchanged), written beside it as data/<name>_train<N> (afresh each time: never stale); its name."""
    name = f"{os.path.basename(meta['folder'])}_train{train_tokens}"
    folder = os.path.join(os.path.dirname(meta["folder"]), name)
    train = np.memmap(os.path.join(meta["folder"], "train.bin"), dtype=meta["dtype"], mode="r")
    if train_tokens > len(train):
        raise SystemExit(f"train_tokens={train_tokens} exceeds the {len(train)} tokens of {meta['folder']}")
    atomic_write(os.path.join(folder, "train.bin"), lambda f: f.write(train[:train_tokens].tobytes()))
    with open(os.path.join(meta["folder"], "val.bin"), "rb") as val:
        atomic_write(os.path.join(folder, "val.bin"), lambda f: shutil.copyfileobj(val, f))
    sliced = {k: v for k, v in meta.items() if k != "folder"}
    write_json_atomic(os.path.join(folder, "meta.json"),
                      {**sliced, "train_tokens": train_tokens, "sliced_from": meta["folder"]})
    return name


@torch.no_grad()
def final_losses(model, meta, val_noise, eval_iters, batch_size, block_size, device):
    """Mean loss on fixed batches: train (clean), val (clean) and val with val_noise on the inputs (targets clean)."""
    model.eval()
    noiser = InputNoise(val_noise, meta, EVAL_SEED, model.config.padded_vocab_size)
    sums = {"train_clean": 0.0, "val_clean": 0.0, "val_noisy": 0.0}
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(EVAL_SEED)
        for i in range(eval_iters):
            x, y = get_batch(meta, split, batch_size, block_size, generator, device)
            sums[f"{split}_clean"] += model(x, y)[1].item()
            if split == "val":
                sums["val_noisy"] += model(*noiser(x, y, key=i))[1].item()
    return {k: v / eval_iters for k, v in sums.items()}


def mean_over_seeds(rows):
    """{name: the mean of each number over its seeds, and the rows per seed}, names in the order first seen."""
    out = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        out[name] = {"noise": mine[0]["noise"], **{k: float(np.mean([r[k] for r in mine])) for k in KEYS},
                     "seeds": {r["seed"]: {k: r[k] for k in (*KEYS, "curve")} for r in mine}}
    return out


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    curves = any(len(run["curve"]) > 1 for r in results.values() for run in r["seeds"].values())
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(15 if curves else 9, 4.5), squeeze=False)
    ax = axes[0, 0]
    xs = range(len(names))
    for i, (offset, key, label) in enumerate(((-0.27, "train_clean", "train (clean)"), (0, "val_clean", "clean val"),
                                              (0.27, "val_noisy", "noised val copy"))):
        ax.bar([x + offset for x in xs], [results[n][key] for n in names], width=0.27, label=label, color=f"C{i}")
        for x, n in zip(xs, names):  # each seed's value, where there are several
            seeds = [run[key] for run in results[n]["seeds"].values()]
            if len(seeds) > 1:
                ax.plot([x + offset] * len(seeds), seeds, "k.", ms=3)
    if "none" in results:
        for i, key in enumerate(("train_clean", "val_clean", "val_noisy")):
            ax.axhline(results["none"][key], color=f"C{i}", ls="--", lw=0.8)
    low = min(min(r["train_clean"], r["val_clean"], r["val_noisy"]) for r in results.values())
    ax.set_ylim(low - 0.1, None)
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_xlabel("training noise (dashed: no noise; dots: seeds)")
    ax.set_ylabel("loss at the final step (nats/char)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    if curves:
        ax = axes[0, 1]
        for i, n in enumerate(names):
            run = next(iter(results[n]["seeds"].values()))  # the first seed's curves
            steps = [row["step"] for row in run["curve"]]
            ax.plot(steps, [row["val_loss"] for row in run["curve"]], color=f"C{i}", marker="o", ms=3, label=f"{n} val")
            ax.plot(steps, [row["train_loss"] for row in run["curve"]], color=f"C{i}", ls=":", lw=1)
        later = [row[k] for r in results.values() for run in r["seeds"].values() for row in run["curve"][1:]
                 for k in ("train_loss", "val_loss")]
        if later:  # the first evaluation (an untrained model) would squash the rest
            ax.set_ylim(min(later) - 0.1, max(later) + 0.1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/char; solid val, dotted train)")
        ax.set_title("during training (first seed): overfitting shows as val rising while train falls")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def train_and_measure(cfg, name, probs, seed, dataset):
    """Train one run with this noise and seed (train.py in a child process, fresh folder <out>/<name>_s<seed>), then its
    train, clean val and noised val loss, and its train/val curve."""
    device = resolve_device(cfg["device"])
    run_dir = os.path.join(cfg["out"], f"{name}_s{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # this experiment's own run folder: always a fresh run
    print(f"--- {name}, seed {seed}: noise {probs}", flush=True)
    run_script("train.py", dict(out_dir=run_dir, max_iters=cfg["max_iters"],
                                eval_interval=max(1, cfg["max_iters"] // cfg["evals"]), eval_iters=cfg["eval_iters"],
                                device=cfg["device"], seed=seed, noise=probs) | ({"dataset": dataset} if dataset else {}),
               args=[cfg["train_config"], *cfg["overrides"]])
    run = read_json(os.path.join(run_dir, "config.json"), fix="the run did not finish: run the experiment again")
    meta = open_dataset(run["data_dir"], run["dataset"], run["block_size"])
    model = load_model(load_checkpoint(os.path.join(run_dir, "ckpt.pt"), map_location=device), device)
    losses = final_losses(model, meta, cfg["val_noise"], cfg["eval_iters"], run["batch_size"], run["block_size"], device)
    curve = [{k: row[k] for k in ("step", "train_loss", "val_loss")}
             for row in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "val_loss" in row]
    print(f"{name} seed {seed}: train {losses['train_clean']:.4f}, clean val {losses['val_clean']:.4f}, "
          f"noised val {losses['val_noisy']:.4f}", flush=True)
    return {"name": name, "seed": seed, "noise": probs, **losses, "best_val": min(r["val_loss"] for r in curve),
            "curve": curve}


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    os.makedirs(cfg["out"], exist_ok=True)
    resolve_device(cfg["device"])  # a missing device is an error before any worker starts
    if "none" not in cfg["runs"]:
        raise SystemExit("runs must include 'none' (no noise): every other run is compared with it")
    if cfg["evals"] < 1 or not cfg["seeds"]:
        raise SystemExit(f"evals must be >= 1 and seeds a non-empty list, got {cfg['evals']} and {cfg['seeds']}")
    dataset = ""
    if cfg["train_tokens"]:
        run = settings([cfg["train_config"], *cfg["overrides"]])  # train.py's defaults where the config is silent
        dataset = train_slice(open_dataset(run.get("data_dir", "data"), run.get("dataset", "shakespeare_char"),
                                           run.get("block_size", 1024)), cfg["train_tokens"])
    deadline = time.monotonic() + cfg["time_limit_s"] if cfg["time_limit_s"] else None
    jobs = [(cfg, name, probs, seed, dataset) for seed in cfg["seeds"] for name, probs in cfg["runs"].items()]
    rows = []
    for row in run_in_processes(train_and_measure, jobs, cfg["workers"], deadline):
        rows.append(row)
        rows.sort(key=lambda r: (list(cfg["runs"]).index(r["name"]), cfg["seeds"].index(r["seed"])))
        write_json_atomic(os.path.join(cfg["out"], "input_noise.json"),
                          {"config": cfg, "dataset": dataset or "as configured", "results": mean_over_seeds(rows)})
    results = mean_over_seeds(rows)
    plot(results, os.path.join(cfg["out"], "input_noise.png"))
    print(json.dumps({n: {k: round(r[k], 4) for k in KEYS} for n, r in results.items()}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
