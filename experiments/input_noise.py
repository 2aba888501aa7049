"""
Does input noise make a sturdier character model? Each noise family, and a mix, against no noise at
equal steps on shakespeare_char: (a) clean val loss, (b) val loss on a noised copy of val.

    python experiments/input_noise.py --out=out/input_noise                       # CPU, cpu_quick shape
    bash experiments/analysis_gpu.sh OUT     # GPU: config/shakespeare_char_best.py, 9 runs at once, ~9 min

Every run is train.train with the same config, seed and steps, only `noise` differs. The noised val
copy uses `val_noise` (all character families at once) on fixed batches; its targets stay clean.
Writes <out>/input_noise.json and <out>/input_noise.png; each run's folder is <out>/<name>.
"""
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from checkpoint import load_checkpoint, load_model, write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from plot import save_figure  # noqa: E402
from data import get_batch, open_dataset  # noqa: E402
from noise import InputNoise  # noqa: E402
from runtime import resolve_device, run_in_processes  # noqa: E402

DEFAULTS = dict(
    out="out/input_noise",
    train_config="config/cpu_quick.py",
    overrides=[],           # more --key=value for every run, e.g. ["--n_layer=2", "--n_embd=64"]
    max_iters=300,
    device="cpu",
    workers=1,              # runs trained at once in separate processes (a baby GPT leaves most of a GPU idle)
    seed=1337,
    eval_iters=20,
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


@torch.no_grad()
def val_losses(model, meta, val_noise, eval_iters, batch_size, block_size, device):
    """Mean val loss on fixed batches, clean and with val_noise on the inputs (targets clean)."""
    model.eval()
    noiser = InputNoise(val_noise, meta, EVAL_SEED, model.config.padded_vocab_size)
    generator = torch.Generator().manual_seed(EVAL_SEED)
    clean = noisy = 0.0
    for i in range(eval_iters):
        x, y = get_batch(meta, "val", batch_size, block_size, generator, device)
        clean += model(x, y)[1].item()
        noisy += model(*noiser(x, y, key=i))[1].item()
    return clean / eval_iters, noisy / eval_iters


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(names))
    for offset, key, label in ((-0.2, "val_clean", "clean val"), (0.2, "val_noisy", "noised val copy")):
        ax.bar([x + offset for x in xs], [results[n][key] for n in names], width=0.4, label=label)
    for key, style in (("val_clean", "C0"), ("val_noisy", "C1")):
        ax.axhline(results["none"][key], color=style, ls="--", lw=0.8)
    low = min(min(r["val_clean"], r["val_noisy"]) for r in results.values())
    ax.set_ylim(low - 0.1, None)
    ax.set_xticks(list(xs), names)
    ax.set_xlabel("training noise (dashed: no noise)")
    ax.set_ylabel("val loss (nats/char, final step)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)


def train_and_measure(cfg, name, probs):
    """Train one run with this noise (train.train, fresh folder <out>/<name>), then its clean and noised val loss."""
    device = resolve_device(cfg["device"])
    run_dir = os.path.join(cfg["out"], name)
    shutil.rmtree(run_dir, ignore_errors=True)  # this experiment's own run folder: always a fresh run
    run = configure(train.DEFAULTS, [cfg["train_config"], f"--out_dir={run_dir}", f"--max_iters={cfg['max_iters']}",
                                     f"--eval_interval={cfg['max_iters']}",
                                     f"--device={cfg['device']}", f"--seed={cfg['seed']}", f"--noise={probs!r}",
                                     *cfg["overrides"]])
    print(f"--- {name}: noise {probs}", flush=True)
    train.train(run)
    meta = open_dataset(run["data_dir"], run["dataset"], run["block_size"])
    model = load_model(load_checkpoint(os.path.join(run_dir, "ckpt.pt"), map_location=device), device)
    clean, noisy = val_losses(model, meta, cfg["val_noise"], cfg["eval_iters"], run["batch_size"], run["block_size"], device)
    print(f"{name}: clean val {clean:.4f}, noised val {noisy:.4f}", flush=True)
    return {"name": name, "noise": probs, "val_clean": clean, "val_noisy": noisy}


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    os.makedirs(cfg["out"], exist_ok=True)
    resolve_device(cfg["device"])  # a missing device is an error before any worker starts
    if "none" not in cfg["runs"]:
        raise SystemExit("runs must include 'none' (no noise): every other run is compared with it")
    results = {}
    for result in run_in_processes(train_and_measure, [(cfg, name, probs) for name, probs in cfg["runs"].items()],
                                   cfg["workers"]):
        results[result.pop("name")] = result
        results = {name: results[name] for name in cfg["runs"] if name in results}  # in the order of runs
        write_json_atomic(os.path.join(cfg["out"], "input_noise.json"), {"config": cfg, "results": results})
    plot(results, os.path.join(cfg["out"], "input_noise.png"))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
