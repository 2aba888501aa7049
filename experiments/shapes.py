"""
Does every layer need the same shape? Per-layer widths and windows, layerwise feedback, growing heads (issue 10).

    python experiments/shapes.py --experiment=layouts     # uniform vs diamond/hourglass widths vs narrow-early windows
    python experiments/shapes.py --experiment=feedback    # feedback vs dense on shakespeare_char
    python experiments/shapes.py --experiment=parity      # running parity over streams longer than the block
    python experiments/shapes.py --experiment=heads       # heads grown from 2 per layer vs fixed 2/4/6 heads
    python experiments/shapes.py --experiment=heads --device=cuda --base_config=config/shakespeare_char.py \\
        --train_overrides="{}" --head_size_heads=6 --max_iters=300 --eval_interval=50  # larger, on a GPU

Each writes <out_dir>/<experiment>.json (config, command, numbers) and <experiment>.png, with the training
runs under <out_dir>/<experiment>/. Every run is train.py on base_config (config/cpu_quick.py: 4 layers,
block 64, Muon; here 64 wide, batch 8, 150 steps) plus the variant's model keys, at the same seed and
steps. "Equal time" reads each val curve at the shortest run's training seconds (linear between
evaluations); on a shared CPU those seconds are noisy, so compare tokens/s with care.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from architecture import DEFAULTS as MODEL_DEFAULTS  # noqa: E402
from architecture import build_model  # noqa: E402
from checkpoint import load_checkpoint, load_model, read_json, write_json_atomic  # noqa: E402
from configurator import configure, print_config, settings  # noqa: E402
from metrics import read_metrics, save_figure  # noqa: E402
from runtime import claim_out_dir, resolve_device  # noqa: E402
from scripts import run_script  # noqa: E402

DEFAULTS = dict(
    experiment="layouts",         # layouts | feedback | parity | heads
    out_dir="out/shapes",
    overwrite=False,              # True: move an earlier result of the same experiment aside and rerun
    base_config="config/cpu_quick.py",
    device="cpu",
    seed=1337,
    max_iters=150,
    eval_interval=25,
    eval_iters=10,
    # other train.py keys over base_config: by default half cpu_quick's width and batch, so a run takes a
    # minute or two on a busy 2-core CPU; pass "{}" to train base_config's own shape
    train_overrides={"n_embd": 64, "batch_size": 8},
    # heads: head size n_embd // head_size_heads; the growing model starts with start_heads per layer
    head_size_heads=4,            # 64 / 4 = 16
    start_heads=2,
    fixed_heads=[2, 4, 6],
    max_heads=8,
    grow_patience=20,
    # feedback: running parity of a bit stream, trained on block-long streams, tested on longer ones
    parity_block=16,
    parity_test_blocks=4,         # test streams are this many blocks long; state crosses blocks only by feedback
    parity_steps=2000,
    parity_batch=32,
    parity_layers=2,
    parity_embd=32,
)


# ----------------------------------------------------------------------------- the variants

def width_layout(kind, n_layer):
    """MLP ratios with mean 4 (equal parameters): diamond is small-large-small, hourglass large-small-large."""
    edge = [min(i, n_layer - 1 - i) for i in range(n_layer)]  # distance from the nearer end
    weights = [1 + e for e in edge] if kind == "diamond" else [1 + max(edge) - e for e in edge]
    return [round(4 * w * n_layer / sum(weights), 3) for w in weights]


def narrow_early_windows(n_layer, block_size):
    """Narrow context at the ends (parsing, writing), full in the middle: block/4 per step out from the middle."""
    edge = [min(i, n_layer - 1 - i) for i in range(n_layer)]
    return [0 if e == max(edge) else max(1, block_size // 4 ** (max(edge) - e)) for e in edge]


def variants(cfg, base):
    """{name: train.py model keys} of the chosen experiment."""
    L, block = base["n_layer"], base["block_size"]
    if cfg["experiment"] == "layouts":
        return {"uniform": {}, "diamond": {"mlp_ratios": width_layout("diamond", L)},
                "hourglass": {"mlp_ratios": width_layout("hourglass", L)},
                "narrow_early_windows": {"attn_windows": narrow_early_windows(L, block)}}
    if cfg["experiment"] == "feedback":
        return {"dense": {}, "feedback": {"feedback": 1}}
    if cfg["experiment"] == "parity":
        return {}  # no shakespeare runs: see parity_run
    if cfg["experiment"] == "heads":
        heads = {"n_head": cfg["head_size_heads"], "max_heads": cfg["max_heads"]}
        runs = {"grown": heads | {"head_gates": True, "grow_heads": True, "grow_patience": cfg["grow_patience"],
                                  "layer_heads": [cfg["start_heads"]] * L}}
        for h in cfg["fixed_heads"]:
            runs[f"fixed_{h}"] = heads | {"layer_heads": [h] * L}
        return runs
    raise SystemExit(f"experiment must be layouts, feedback, parity or heads, got {cfg['experiment']!r}")


# ----------------------------------------------------------------------------- runs and their numbers

def run_variant(name, model_keys, cfg, overrides, folder):
    """Train one variant (train.py on base_config with the overrides); its curve, speed and size."""
    out_dir = os.path.join(folder, name)
    print(f"\n=== {name}: {model_keys or 'the base model'}", flush=True)
    run_script("train.py", overrides | model_keys | {"out_dir": out_dir, "seed": cfg["seed"]}, args=[cfg["base_config"]])
    run = read_json(os.path.join(out_dir, "config.json"), fix="the run did not finish: run the experiment again")
    rows = read_metrics(out_dir)
    evals = [r for r in rows if "val_loss" in r]
    state = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    tokens = evals[-1]["step"] * run["batch_size"] * run["block_size"] * run["gradient_accumulation_steps"]
    return {"model_keys": model_keys, "params": load_model(state).num_params(), "final_val_loss": evals[-1]["val_loss"],
            "train_time": evals[-1]["train_time"], "tokens_per_s": tokens / evals[-1]["train_time"],
            "curve": [{k: r[k] for k in ("step", "train_time", "val_loss")} for r in evals],
            "layer_heads": [(0, model_keys.get("layer_heads"))] + [(r["step"], r["layer_heads"]) for r in rows
                                                                   if "layer_heads" in r],
            "final_layer_heads": state["model_args"]["layer_heads"]}


def val_at_time(curve, seconds):
    """Val loss at a number of training seconds, linear between evaluations."""
    for a, b in zip(curve, curve[1:]):
        if a["train_time"] <= seconds <= b["train_time"]:
            f = (seconds - a["train_time"]) / max(b["train_time"] - a["train_time"], 1e-9)
            return a["val_loss"] + f * (b["val_loss"] - a["val_loss"])
    return curve[-1]["val_loss"]


# ----------------------------------------------------------------------------- running parity past the block

def parity_batch(batch, length, generator):
    """Random bits (B, length) and their running parity: the target at t is the XOR of bits 0..t."""
    bits = torch.randint(0, 2, (batch, length), generator=generator)
    return bits, bits.cumsum(1) % 2


def stream_logits(model, bits):
    """Logits (B, L, 2) of a stream longer than block_size, one block at a time with a fresh KV cache each.

    Attention never crosses a block; with feedback, each block starts from the previous block's last outputs
    (the cache's slot 0), so a recurrent state can."""
    block, out, cache = model.config.block_size, [], None
    for start in range(0, bits.size(1), block):
        fresh = model.make_cache(bits.size(0), block, bits.device, torch.float32)
        if cache is not None:  # feedback.FeedbackCache: each layer's outputs
            for new, old in zip(getattr(fresh, "outputs", []), getattr(cache, "outputs", [])):
                new[:, 0] = old[:, -1]
        cache = fresh
        out.append(model.lm_head(model.hidden(bits[:, start:start + block], cache))[..., :2])
    return torch.cat(out, 1)


def parity_run(feedback, cfg, device):
    """Train on block-long parity streams; accuracy at each position of streams parity_test_blocks blocks long."""
    torch.manual_seed(cfg["seed"])
    model = build_model(dict(vocab_size=2, block_size=cfg["parity_block"], n_layer=cfg["parity_layers"], n_head=4,
                             n_embd=cfg["parity_embd"], feedback=feedback)).to(device)
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), device.type)
    generator = torch.Generator().manual_seed(cfg["seed"])
    t0, losses = time.perf_counter(), []
    for step in range(cfg["parity_steps"]):
        bits, parity = (t.to(device) for t in parity_batch(cfg["parity_batch"], cfg["parity_block"], generator))
        loss = model(bits, parity)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"  parity feedback={feedback} step {step}: loss {loss.item():.4f}", flush=True)
    train_time = time.perf_counter() - t0
    model.eval()
    test = torch.Generator().manual_seed(cfg["seed"] + 1)
    bits, parity = (t.to(device) for t in parity_batch(256, cfg["parity_block"] * cfg["parity_test_blocks"], test))
    with torch.no_grad():
        correct = (stream_logits(model, bits).argmax(-1) == parity).float().mean(0)  # (L,) accuracy per position
    block = cfg["parity_block"]
    return {"feedback": feedback, "params": model.num_params(), "train_time": train_time, "final_train_loss": losses[-1],
            "accuracy_first_block": correct[:block].mean().item(), "accuracy_past_first_block": correct[block:].mean().item(),
            "accuracy_by_position": [round(a, 4) for a in correct.tolist()]}


# ----------------------------------------------------------------------------- plot and main

def plot(cfg, results, parity, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = 1 if parity else 3 if cfg["experiment"] == "heads" else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = axes[0]
    for i, (name, r) in enumerate(results.items()):
        label = f"{name} ({r['params'] / 1e6:.2f}M, {r['tokens_per_s']:,.0f} tok/s)"
        for ax, x in zip(axes, ("step", "train_time")):
            ax.plot([c[x] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], marker="o", ms=3, color=f"C{i}",
                    label=label)
            ax.set_xlabel("step" if x == "step" else "training seconds")
            ax.set_ylabel("val loss")
            ax.grid(alpha=0.3)
    if results:
        axes[0].legend(fontsize=7)
    if cfg["experiment"] == "heads":
        grown = results["grown"]
        points = [(s, sum(h)) for s, h in grown["layer_heads"]] + [(grown["curve"][-1]["step"], sum(grown["final_layer_heads"]))]
        axes[2].step([p[0] for p in points], [p[1] for p in points], where="post")
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("live heads, all layers")
        axes[2].grid(alpha=0.3)
    if parity:
        for i, r in enumerate(parity.values()):
            axes[0].plot(r["accuracy_by_position"], color=f"C{i}", label=f"feedback={r['feedback']}")
        for edge in range(cfg["parity_block"], len(r["accuracy_by_position"]), cfg["parity_block"]):
            axes[0].axvline(edge, color="gray", lw=0.5)
        axes[0].set_xlabel("position in the stream (gray: block edges)")
        axes[0].set_ylabel("running-parity accuracy")
        axes[0].legend()
    fig.suptitle(f"experiments/shapes.py --experiment={cfg['experiment']} (seed {cfg['seed']})")
    fig.tight_layout()
    save_figure(fig, png)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    folder = os.path.join(cfg["out_dir"], cfg["experiment"])
    json_path = os.path.join(cfg["out_dir"], f"{cfg['experiment']}.json")
    lock = claim_out_dir(folder, resuming=False, overwrite=cfg["overwrite"], run_files=("runs",))  # noqa: F841
    if os.path.exists(json_path) and not cfg["overwrite"]:
        raise SystemExit(f"{json_path} exists: pass --overwrite=True to rerun (the old runs are moved aside)")
    overrides = cfg["train_overrides"] | {k: cfg[k] for k in ("device", "max_iters", "eval_interval", "eval_iters")} | {
        "log_interval": cfg["eval_interval"]}
    base = MODEL_DEFAULTS | settings([cfg["base_config"]]) | overrides  # the model the variants change
    runs = os.path.join(folder, "runs")
    results = {name: run_variant(name, keys, cfg, overrides, runs) for name, keys in variants(cfg, base).items()}
    equal_time = min((r["train_time"] for r in results.values()), default=0.0)
    for r in results.values():
        r["val_loss_at_equal_time"] = val_at_time(r["curve"], equal_time)
    parity = None
    if cfg["experiment"] == "parity":
        device = resolve_device(cfg["device"])
        parity = {f"feedback={k}": parity_run(k, cfg, device) for k in (0, 1)}
    print(f"\n{'variant':22s} {'params':>9s} {'tokens/s':>9s} {'val @ equal steps':>18s} {'val @ ' + format(equal_time, '.0f') + ' s':>10s}")
    for name, r in results.items():
        print(f"{name:22s} {r['params'] / 1e6:8.3f}M {r['tokens_per_s']:9,.0f} {r['final_val_loss']:18.4f} "
              f"{r['val_loss_at_equal_time']:10.4f}" + (f"  heads {r['final_layer_heads']}" if cfg["experiment"] == "heads" else ""))
    for name, r in (parity or {}).items():
        print(f"parity {name}: accuracy {r['accuracy_first_block']:.3f} in the first block, "
              f"{r['accuracy_past_first_block']:.3f} past it")
    summary = {"equal_time_s": equal_time, "device": str(resolve_device(cfg["device"])), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if torch.cuda.is_available() and "cuda" in cfg["device"]:
        summary["gpu"] = torch.cuda.get_device_name()
    write_json_atomic(json_path, {"config": cfg, "base": base, "command": "python experiments/shapes.py " + " ".join(argv),
                                  "summary": summary, "results": results, "parity": parity})
    png = os.path.join(cfg["out_dir"], f"{cfg['experiment']}.png")
    plot(cfg, results, parity, png)
    print(f"wrote {json_path} and {png}")


if __name__ == "__main__":
    main(sys.argv[1:])
