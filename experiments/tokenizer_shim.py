"""
How much of a model survives a tokenizer change (issue 33, item 1)? A character model with tokenizer shims
(shim.py) moves to GPT-2 BPE by retraining only its embedding, head and shims, the blocks frozen, against
(a) the same model trained on BPE from scratch and (b) full fine-tuning from the char model's blocks.

    python prepare.py && python prepare.py --dataset=shakespeare
    OMP_NUM_THREADS=1 nice -n 10 python experiments/tokenizer_shim.py            # ~15 min on one CPU core

Every run is train.py: the char model (config/shim_char.py), then three BPE runs of `steps` steps on the same
data and seed. shim-only: --train_only=shim; full fine-tuning: a 0-step shim swap (the char blocks with a fresh
BPE embedding), then every weight trained; scratch: the same shape, fresh. Val loss is compared in nats per
character: a BPE token's loss times the val split's tokens per character. Writes <out_dir>/tokenizer_shim.json
and .png (val nats/char against steps, one line per variant; the char model's own level dashed).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from data import open_dataset  # noqa: E402
from metrics import read_metrics, save_figure  # noqa: E402
from runtime import code_version  # noqa: E402
from scripts import run_script  # noqa: E402
from tokenizer import tokenizer_from_meta  # noqa: E402

DEFAULTS = dict(
    out_dir="out/tokenizer_shim",
    char_config="config/shim_char.py",
    bpe_dataset="shakespeare",
    data_dir="data",
    steps=150,                    # BPE steps of each variant
    eval_every=25,
    # BPE runs: a quarter of the char run's tokens per step, about as many characters (GPT-2 BPE ~3.3 chars per token
    # here), which keeps the 50k-row head affordable on a CPU core
    bpe_overrides={"batch_size": 8, "block_size": 32, "eval_iters": 10},
    seed=1337,
)
VARIANTS = ("shim only (blocks frozen)", "full fine-tuning", "BPE from scratch")


def chars_per_token(data_dir, dataset):
    """Characters per token of a prepared dataset's val split (its text decoded back)."""
    meta = open_dataset(data_dir, dataset, 1)
    ids = np.fromfile(os.path.join(data_dir, dataset, "val.bin"), dtype=meta["dtype"])
    return len(tokenizer_from_meta(meta).decode(ids.tolist())) / len(ids)


def val_curve(run_dir, per_char):
    """[(step, val nats per character)] of a train.py run."""
    return [(r["step"], r["val_loss"] / per_char) for r in read_metrics(run_dir) if "val_loss" in r]


def run_variants(cfg, folder):
    """The char model, then the three BPE runs; their folders."""
    common = {"seed": cfg["seed"], "data_dir": cfg["data_dir"], "overwrite": True}
    char = os.path.join(folder, "char")
    run_script("train.py", common | {"out_dir": char}, args=[cfg["char_config"]])
    bpe = common | cfg["bpe_overrides"] | {"dataset": cfg["bpe_dataset"], "max_iters": cfg["steps"],
                                           "eval_interval": cfg["eval_every"]}
    runs = dict(zip(VARIANTS, (os.path.join(folder, name) for name in ("shim", "full", "scratch"))))
    run_script("train.py", bpe | {"init_from": char, "train_only": "shim", "out_dir": runs[VARIANTS[0]]},
               args=[cfg["char_config"]])
    swapped = os.path.join(folder, "swap0")  # the char blocks under a fresh BPE embedding, not yet trained
    run_script("train.py", bpe | {"init_from": char, "train_only": "shim", "max_iters": 0, "out_dir": swapped},
               args=[cfg["char_config"]])
    run_script("train.py", bpe | {"init_from": swapped, "out_dir": runs[VARIANTS[1]]}, args=[cfg["char_config"]])
    run_script("train.py", bpe | {"out_dir": runs[VARIANTS[2]]}, args=[cfg["char_config"]])
    return char, runs


def plot(result, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, curve) in enumerate(result["curves"].items()):
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", color=f"C{i}", label=name)
    ax.axhline(result["char_model_val_nats_per_char"], color="gray", ls="--", label="the char model itself")
    ax.set_xlabel("BPE training steps N")
    ax.set_ylabel("val loss (nats per character)")
    ax.set_title("char model -> GPT-2 BPE: how much survives a tokenizer change")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png)
    return fig


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    per_char = chars_per_token(cfg["data_dir"], cfg["bpe_dataset"])  # before training: missing data fails first
    char, runs = run_variants(cfg, cfg["out_dir"])
    char_val = [r["val_loss"] for r in read_metrics(char) if "val_loss" in r][-1]
    char_per_token = chars_per_token(cfg["data_dir"], "shakespeare_char")  # 1, but for the EOT token
    result = {"config": cfg, "code": code_version(__file__), "bpe_chars_per_token": per_char,
              "char_model_val_nats_per_char": char_val / char_per_token,
              "curves": {name: val_curve(path, per_char) for name, path in runs.items()}}
    result["final"] = {name: curve[-1][1] for name, curve in result["curves"].items()}
    os.makedirs(cfg["out_dir"], exist_ok=True)
    write_json_atomic(os.path.join(cfg["out_dir"], "tokenizer_shim.json"), result)
    plot(result, os.path.join(cfg["out_dir"], "tokenizer_shim.png"))
    for name, value in result["final"].items():
        print(f"{name}: {value:.3f} nats/char after {cfg['steps']} BPE steps "
              f"(the char model: {result['char_model_val_nats_per_char']:.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
