"""
The auto Turing test (issue 33, item 3): does adversarial fine-tuning make a µLM's samples more human-like
by a measure that is not the discriminator itself?

    OMP_NUM_THREADS=1 nice -n 10 python experiments/turing.py config/turing_shakespeare_char.py
    python experiments/turing.py --replot=experiments/results/turing_shakespeare_char.json

One command makes everything: a generator (train.py with config/cpu_quick.py's recipe, as a command;
reused while its checkpoint has the steps asked for), then per seed two arms from that same generator,
each with a discriminator that starts as the generator's copy (adversarial.py): "adversarial" (REINFORCE
on the discriminator's score plus the LM loss) and "lm_only" (the same rounds with the REINFORCE term's
weight 0: the discriminator still learns, so its accuracy against a generator that only keeps learning
the language is the control). Every eval_every rounds: the discriminator's accuracy on fresh windows, the
generator's val loss, and outside measures of its samples' continuations against the same measures of
real training text: distinct-4 and the share of 6-grams that occur in the val text. Writes <name>.json
(every number, the config and the commit) and <name>.png.
"""
import dataclasses
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adversarial import (Adversarial, Discriminator, accuracy, adversarial_round, discriminator_steps,  # noqa: E402
                         distinct_n, fake_windows, ngrams, overlap, real_windows, samples)
from checkpoint import load_checkpoint, load_model, read_json, write_json_atomic  # noqa: E402
from configurator import ConfigError, configure, print_config  # noqa: E402
from data import open_dataset  # noqa: E402
from metrics import save_figure  # noqa: E402
from runtime import StopRequest, code_version  # noqa: E402
from scripts import run_script  # noqa: E402
from tokenizer import tokenizer_from_meta  # noqa: E402
from training import estimate_loss  # noqa: E402

ARMS = {"adversarial": {}, "lm_only": {"adv_weight": 0.0}}  # arm -> its changes to the round settings
DEFAULTS = dict(
    out="out/turing",
    results="experiments/results/turing_shakespeare_char.json",
    data_dir="data",
    dataset="shakespeare_char",
    generator_config="config/cpu_quick.py",  # train.py's recipe for the generator ...
    generator_iters=600,                     # ... and its steps
    arms=list(ARMS),
    seeds=[1337, 1, 2],
    rounds=150,
    eval_every=25,
    eval_iters=20,             # val batches (of batch_size x length) for the generator's val loss
    measure_samples=64,        # samples (and real windows) per outside measure
    settings={},               # adversarial.Adversarial's fields: the rounds' settings
    replot="",
)
DISTINCT_N, OVERLAP_N = 4, 6


def generator_checkpoint(out, config_file, iters, data_dir, dataset, stop):
    """train.py's generator (config_file's recipe, `iters` steps) in out/generator; reused when it has them."""
    path = os.path.join(out, "generator", "ckpt.pt")
    step = load_checkpoint(path)["step"] if os.path.exists(path) else None
    if step is None or step < iters:  # a stopped one resumes (train.py's resume continues exactly)
        start = {"overwrite": True} if step is None else {"init_from": "resume"}
        run_script("train.py", {"out_dir": os.path.dirname(path), "max_iters": iters, "data_dir": data_dir,
                                "dataset": dataset} | start, stop, args=[config_file])
        if stop.requested:
            raise SystemExit("stopped while training the generator; the same command starts it again")
    return path


def measure(texts, val_grams):
    return {f"distinct_{DISTINCT_N}": distinct_n(texts, DISTINCT_N), f"val_overlap_{OVERLAP_N}": overlap(texts, val_grams, OVERLAP_N)}


def evaluate(model, disc_row, meta, tokenizer, settings, n, eval_iters, val_grams, seed):
    """The generator's val loss and the outside measures of n of its continuations (fixed prompts per seed)."""
    device = next(model.parameters()).device
    prompts = real_windows(meta, n, settings.length, torch.Generator().manual_seed(seed), device)[:, :settings.prompt]
    fake = samples(model, prompts, settings.length, settings.temperature, seed)
    texts = [tokenizer.decode(row[settings.prompt:].tolist()) for row in fake]
    val = estimate_loss(model, meta, settings.batch_size, settings.length, eval_iters, device, splits=("val",))["val"]
    return {"val_loss": val, **measure(texts, val_grams), **disc_row, "sample": texts[0]}


def run_arm(path, meta, tokenizer, settings, cfg, seed, val_grams, stop):
    """One arm from the generator at path: rounds, with an evaluation every eval_every; returns its rows (up to
    the round where a stop request came, if one did)."""
    torch.manual_seed(seed)
    model = load_model(load_checkpoint(path)).train()
    disc = Discriminator.from_generator(model, settings.d_init)
    g_opt = torch.optim.AdamW(model.parameters(), lr=settings.g_lr, betas=(0.9, 0.99), weight_decay=0.0)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=settings.d_lr, betas=(0.9, 0.99), weight_decay=0.0)
    data = torch.Generator().manual_seed(seed)
    warmup = {}
    if settings.d_warmup:  # the discriminator learns to separate before the generator is rewarded by it
        device = next(model.parameters()).device
        d = discriminator_steps(model, disc, d_opt, meta, settings, data, seed * 100003, settings.d_warmup)
        warmup = {"warmup_d_loss": sum(x[0] for x in d[-10:]) / len(d[-10:]),
                  "accuracy": accuracy(disc, real_windows(meta, 4 * settings.batch_size, settings.length, data, device),
                                       torch.cat([fake_windows(model, meta, settings, data, seed * 100003 - 1 - k)
                                                  for k in range(4)]))}
        print(f"seed {seed}: after {settings.d_warmup} discriminator steps, loss {warmup['warmup_d_loss']:.4f}, "
              f"accuracy on fresh windows {warmup['accuracy']:.2f}", flush=True)
    rows = [{"round": 0, **evaluate(model, warmup, meta, tokenizer, settings, cfg["measure_samples"],
                                    cfg["eval_iters"], val_grams, seed)}]
    start = time.perf_counter()
    for r in range(1, cfg["rounds"] + 1):
        if stop.requested:
            break
        row = adversarial_round(model, disc, g_opt, d_opt, meta, settings, data, seed * 100003 + r)
        if r % cfg["eval_every"] == 0 or r == cfg["rounds"]:
            rows.append({"round": r, **evaluate(model, row, meta, tokenizer, settings, cfg["measure_samples"],
                                                cfg["eval_iters"], val_grams, seed)})
            print(f"seed {seed} round {r}: discriminator accuracy {row['accuracy']:.2f}, val loss "
                  f"{rows[-1]['val_loss']:.4f}, distinct-{DISTINCT_N} {rows[-1][f'distinct_{DISTINCT_N}']:.3f}, "
                  f"val {OVERLAP_N}-gram overlap {rows[-1][f'val_overlap_{OVERLAP_N}']:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def real_reference(meta, tokenizer, settings, n, val_grams):
    """The outside measures of real training text's continuations: what 'human-like' scores."""
    windows = real_windows(meta, n, settings.length, torch.Generator().manual_seed(0), torch.device("cpu"))
    return measure([tokenizer.decode(row[settings.prompt:].tolist()) for row in windows], val_grams)


def summary(runs):
    """Per arm: the change from round 0 to the last round of each number, mean and std over seeds."""
    out = {}
    for arm, by_seed in runs.items():
        keys = [k for k, v in next(iter(by_seed.values()))[-1].items() if isinstance(v, float)]
        out[arm] = {}
        for key in keys:
            first = [rows[0].get(key) for rows in by_seed.values()]
            last = [rows[-1][key] for rows in by_seed.values()]
            changes = [b - a for a, b in zip(first, last) if a is not None]
            out[arm][key] = {"last_mean": statistics.mean(last), "last_std": statistics.stdev(last) if len(last) > 1 else 0.0}
            if changes:
                out[arm][key] |= {"change_mean": statistics.mean(changes),
                                  "change_std": statistics.stdev(changes) if len(changes) > 1 else 0.0}
    return out


def plot(result, path):
    """Four panels over rounds: discriminator accuracy, generator val loss, distinct-4, val 6-gram overlap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("accuracy", "discriminator accuracy\n(fresh real vs sampled windows)"), ("val_loss", "generator val loss"),
            (f"distinct_{DISTINCT_N}", f"distinct-{DISTINCT_N} of samples"),
            (f"val_overlap_{OVERLAP_N}", f"share of sample {OVERLAP_N}-grams in val text")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, (key, label) in zip(axes, keys):
        for i, (arm, by_seed) in enumerate(result["runs"].items()):
            for j, rows in enumerate(by_seed.values()):
                points = [(r["round"], r[key]) for r in rows if key in r]
                ax.plot(*zip(*points), color=f"C{i}", marker="o", ms=3, lw=1.2, alpha=0.8,
                        label=arm if j == 0 else None)
        if key in result.get("real", {}):
            ax.axhline(result["real"][key], color="black", ls="--", lw=1, label="real text")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("LLM GAN on shakespeare_char: adversarial fine-tuning vs LM-only (one line per seed)")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    if cfg["replot"]:
        plot(read_json(cfg["replot"], "run the experiment again"), os.path.splitext(cfg["replot"])[0] + ".png")
        return
    if [a for a in cfg["arms"] if a not in ARMS] or not cfg["seeds"]:
        raise ConfigError(f"arms are some of {', '.join(ARMS)} and seeds at least one; got {cfg['arms']}, {cfg['seeds']}")
    try:
        base = Adversarial(**cfg["settings"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"settings: {e}")
    result = {"config": cfg, "code": code_version(__file__), "runs": {}}
    meta = open_dataset(cfg["data_dir"], cfg["dataset"], base.length)
    tokenizer = tokenizer_from_meta(meta)
    val_text = tokenizer.decode(np.fromfile(os.path.join(meta["folder"], "val.bin"), dtype=meta["dtype"]).tolist())
    val_grams = set(ngrams(val_text, OVERLAP_N))  # held out: a measure of the samples, never shown to a model
    result["real"] = real_reference(meta, tokenizer, base, cfg["measure_samples"], val_grams)
    png = os.path.splitext(cfg["results"])[0] + ".png"
    with StopRequest(print) as stop:
        path = generator_checkpoint(cfg["out"], cfg["generator_config"], cfg["generator_iters"], cfg["data_dir"],
                                    cfg["dataset"], stop)
        for seed in cfg["seeds"]:
            for arm in cfg["arms"]:
                if stop.requested:
                    break
                settings = dataclasses.replace(base, **ARMS[arm])
                result["runs"].setdefault(arm, {})[str(seed)] = run_arm(path, meta, tokenizer, settings, cfg, seed,
                                                                        val_grams, stop)
                result["summary"] = summary(result["runs"])
                write_json_atomic(cfg["results"], result)  # after every arm: a stop keeps what finished
                plot(result, png)
    for arm, s in result.get("summary", {}).items():
        print(f"{arm}: " + ", ".join(f"{k} {v['last_mean']:.3f}" + (f" ({v['change_mean']:+.3f})" if "change_mean" in v
                                                                   else "") for k, v in s.items()))
    print(f"real text: {result['real']}\nwrote {cfg['results']} and {png}")


if __name__ == "__main__":
    main(sys.argv[1:])
