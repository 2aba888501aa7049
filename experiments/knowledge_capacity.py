"""
How many bits of knowledge does a model store per parameter and per training FLOP: dense MLPs against
a product-key memory layer and a kNN memory layer? (Allen-Zhu & Li 2024, "Physics of Language Models
3.3": about 2 bits per parameter for dense GPT-2-style models given ~1000 exposures per person.)

    nice -n 10 python experiments/knowledge_capacity.py --out=out/knowledge_capacity        # CPU, tiny
    bash experiments/analysis_gpu.sh OUT     # the GPU size (with issue 12's other experiments), ~9 min

synthetic.py's bios corpus: n_people people x 6 attributes, every exposure a fresh rendering (random
templates and order). Each model trains the same steps on the same batches; then every person's
every attribute is recalled after its first template. Bits stored (synthetic.bits_of_knowledge) are
reported from the value's cross-entropy and from accuracy. Training FLOPs: 6 x active parameters x
tokens (a PKM counts its query, sub-key scoring and the rows it reads, not its whole table; a kNN layer
its projections and the store search). Tokens/s are measured first, each model alone on the device
(models then train in `workers` processes at once, sharing it). The target: PKM >= 2x the dense model's bits at equal FLOPs,
at >= 0.8x its tokens/s; `profile` lists the slowest ops of each memory model to say why not.
A kNN layer stores no knowledge in its weights: it recalls a fact only while the store still holds a
rendering of it, and every position of every biography (~55 pairs) is written, so the store keeps the
last knn_capacity / 55 biographies. For recall after the first template to be possible for most people
it needs knn_capacity of roughly n_people x 600 (100 people: 65,536 holds 99% of the first-template
facts, 4,096 only 27%; EXPERIMENTS.md); the exact search costs time in proportion to it. On a GPU:
    python experiments/knowledge_capacity.py --device=cuda --workers=3 --n_people=100 "--sizes=[[1, 2, 32]]" \
        --steps=1200 --batch_size=64 --memory_slots=4096 --memory_key_dim=32 --knn_capacity=65536 --out=out/kc_knn_gpu
Writes <out>/knowledge_capacity.json and .png. Runs of one kind each drawn together, training nothing:
    python experiments/knowledge_capacity.py --replot="['experiments/results/knowledge_capacity_gpu_dense.json', \
        'experiments/results/knowledge_capacity_gpu_pkm.json']"    # -> knowledge_capacity_gpu_pkm.png
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import synthetic  # noqa: E402
from checkpoint import read_json, write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from metrics import save_figure  # noqa: E402
from architecture import build_model  # noqa: E402
from memory import KNNMemory, ProductKeyMemory  # noqa: E402
from training import fit  # noqa: E402
from runtime import resolve_device, run_in_processes  # noqa: E402

DEFAULTS = dict(
    out="out/knowledge_capacity",
    n_people=400,
    sizes=[[1, 2, 16], [1, 2, 32], [2, 2, 48]],  # [n_layer, n_head, n_embd] of each dense model
    kinds=["dense", "pkm", "knn"],                # the last layer's MLP becomes a memory layer in pkm / knn
    steps=400,
    batch_size=32,
    learning_rate=3e-3,
    block_size=64,
    memory_slots=1024,
    memory_heads=2,
    memory_key_dim=16,
    memory_topk=8,
    knn_capacity=8192,
    knn_threshold=0.01,     # a kNN pair is written only if its key is farther than this from every stored key
    profile_steps=3,
    speed_warmup=5,         # steps before the tokens/s timing (allocations; a kNN store fills)
    speed_steps=10,
    device="cpu",
    workers=1,              # models trained at once in separate processes (small models underuse a GPU)
    seed=1337,
    replot=[],              # knowledge_capacity JSONs: draw their rows together in the PNG beside the last, train nothing
)


def active_params(model, vocab_size):
    """Parameters a token's forward touches (the head included): a PKM reads topk rows per head, not all."""
    n = model.num_params() + vocab_size * model.config.n_embd
    for m in model.modules():
        if isinstance(m, ProductKeyMemory):
            n += m.heads * m.topk * m.values.weight.size(1) - m.values.weight.numel()
        if isinstance(m, KNNMemory):
            n += len(m.store) * m.store.keys.size(1)  # the exact search scores every stored key
    return n


def profile(model, next_batch, steps, device):
    """The ops taking most time (device time on a GPU, CPU time otherwise) over a few training steps."""
    from torch.profiler import profile as torch_profile
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    with torch_profile() as prof:
        for step in range(steps):
            x, y = (t.to(device) for t in next_batch(step))
            model(x, y)[1].backward()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key) for e in events) or 1
    return [{"op": e.key, "share": getattr(e, key) / total} for e in sorted(events, key=lambda e: -getattr(e, key))[:8]]


def build(cfg, size, kind, vocab_size, device):
    """The dense model of this size, or the same with its last MLP replaced by a PKM or kNN memory layer."""
    n_layer, n_head, n_embd = size
    memory = {} if kind == "dense" else dict(
        memory_layers=[n_layer - 1], memory=kind, memory_slots=cfg["memory_slots"], memory_heads=cfg["memory_heads"],
        memory_key_dim=cfg["memory_key_dim"], memory_topk=cfg["memory_topk"], knn_capacity=cfg["knn_capacity"],
        knn_key_dim=cfg["memory_key_dim"], knn_threshold=cfg["knn_threshold"])
    torch.manual_seed(cfg["seed"])
    return build_model(dict(vocab_size=vocab_size, block_size=cfg["block_size"], n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd, **memory)).to(device)


def speed(cfg, size, kind):
    """Training tokens/s of one model alone on the device, on one fixed batch (the data generator apart),
    timed with a device sync after warmup steps that also fill a kNN store; and its op profile."""
    device = resolve_device(cfg["device"])
    vocab = synthetic.bios_vocab()
    names, values = synthetic.bios_people(cfg["n_people"], cfg["seed"])
    batch = synthetic.bios_batches(vocab, names, values, cfg["batch_size"], cfg["block_size"], cfg["seed"])(0)
    model = build(cfg, size, kind, len(vocab), device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    fit(model, lambda step: batch, cfg["speed_warmup"], cfg["learning_rate"], device)
    sync()
    t0 = time.perf_counter()
    fit(model, lambda step: batch, cfg["speed_steps"], cfg["learning_rate"], device)
    sync()
    tokens_per_s = cfg["speed_steps"] * int((batch[1] >= 0).sum()) / (time.perf_counter() - t0)
    ops = profile(model, lambda step: batch, cfg["profile_steps"], device) if kind != "dense" else None
    return tokens_per_s, ops


def train_and_recall(cfg, size, kind):
    """Train one model on the bios for cfg's steps, then recall every attribute of every person."""
    device = resolve_device(cfg["device"])
    vocab = synthetic.bios_vocab()
    names, values = synthetic.bios_people(cfg["n_people"], cfg["seed"])
    model = build(cfg, size, kind, len(vocab), device)
    next_batch = synthetic.bios_batches(vocab, names, values, cfg["batch_size"], cfg["block_size"], cfg["seed"])
    loss, tok_s, tokens = fit(model, next_batch, cfg["steps"], cfg["learning_rate"], device)
    accuracy, loss_bits = synthetic.recall(model, vocab, names, values, device)
    per_attribute = synthetic.bits_of_knowledge(len(names), accuracy, loss_bits)
    row = {"kind": kind, "size": list(size), "params": model.num_params(),
           "active_params": active_params(model, len(vocab)), "final_loss": loss, "train_tokens_per_s_shared": tok_s,
           "exposures_per_person": cfg["steps"] * cfg["batch_size"] / len(names),
           "bits_by_loss": sum(a["bits_by_loss"] for a in per_attribute.values()),
           "bits_by_accuracy": sum(a["bits_by_accuracy"] for a in per_attribute.values()),
           "bits_available": len(names) * sum(np.log2(len(v)) for v, _ in synthetic.ATTRIBUTES.values()),
           "attributes": per_attribute}
    row["train_flops"] = 6 * row["active_params"] * tokens
    row["bits_per_param"] = row["bits_by_loss"] / row["params"]
    row["bits_per_flop"] = row["bits_by_loss"] / row["train_flops"]
    print(f"{kind} {size[0]}x{size[2]}: {row['params']:,} params, loss {loss:.3f}, {row['bits_by_loss']:,.0f} bits "
          f"({row['bits_per_param']:.3f}/param; {row['bits_by_accuracy']:,.0f} by accuracy)", flush=True)
    return row


def plot(results, path):
    """Bits stored against parameters and FLOPs, and tokens/s: one line per kind (per kind and run where the rows
    carry a "run" name, as --replot gives them). Returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    lines = dict.fromkeys((r["kind"], r.get("run")) for r in results)
    for i, (kind, run) in enumerate(lines):
        rows = [r for r in results if (r["kind"], r.get("run")) == (kind, run)]
        label = f"{kind} ({run})" if run else kind
        axes[0].plot([r["params"] for r in rows], [r["bits_by_loss"] for r in rows], marker="o", color=f"C{i}", label=label)
        axes[1].plot([r["train_flops"] for r in rows], [r["bits_by_loss"] for r in rows], marker="o", color=f"C{i}", label=label)
        axes[2].plot([r["params"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", color=f"C{i}", label=label)
    xs = np.array(sorted(r["params"] for r in results))
    axes[0].plot(xs, 2 * xs, "k--", lw=0.8, label="2 bits/param (Allen-Zhu & Li)")
    axes[0].axhline(results[0]["bits_available"], color="gray", ls=":", label="all the corpus holds")
    for ax, xlabel, ylabel in ((axes[0], "parameters (without embeddings; PKM: whole table)", "bits of knowledge stored"),
                               (axes[1], "training FLOPs (6 x active params x tokens)", "bits of knowledge stored"),
                               (axes[2], "parameters", "training tokens/s, each model alone")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("capacity")
    axes[1].set_title("knowledge per compute")
    axes[2].set_title("speed")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def replot(paths):
    """The rows of several runs' JSONs in one PNG beside the last (a run of one kind is drawn beside another's)."""
    results = []
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0].removeprefix("knowledge_capacity_")
        results += [r | {"run": name} for r in read_json(path, "give JSONs knowledge_capacity.py wrote").get("results", [])]
    if not results:
        raise SystemExit(f"no results in {paths}: a run cut before its first model finished has only speeds")
    png = os.path.splitext(paths[-1])[0] + ".png"
    plot(results, png)
    print(f"wrote {png}")


def main(argv):
    cfg = configure(DEFAULTS, argv)
    if cfg["replot"]:
        return replot(cfg["replot"])
    print_config(cfg)
    unknown = set(cfg["kinds"]) - {"dense", "pkm", "knn"}
    if unknown:
        raise SystemExit(f"kinds must be among dense, pkm, knn; got {sorted(unknown)}")
    synthetic.bios_people(cfg["n_people"], cfg["seed"])  # an impossible n_people is an error before any run
    resolve_device(cfg["device"])
    os.makedirs(cfg["out"], exist_ok=True)
    json_path = os.path.join(cfg["out"], "knowledge_capacity.json")
    runs = [(size, kind) for size in cfg["sizes"] for kind in cfg["kinds"]]
    # speeds first, one model at a time, while this experiment's training runs do not share the device yet
    speeds = {}
    for size, kind in runs:
        speeds[str(size), kind] = speed(cfg, size, kind)
        print(f"{kind} {size}: {speeds[str(size), kind][0]:,.0f} training tokens/s alone", flush=True)
    # every write keeps the speeds: a run cut by a time limit still has the tokens/s of the models it did not train
    speed_rows = [{"size": s, "kind": k, "tokens_per_s": v[0]} for (s, k), v in speeds.items()]
    write_json_atomic(json_path, {"config": cfg, "speeds": speed_rows})
    results = []
    for row in run_in_processes(train_and_recall, [(cfg, size, kind) for size, kind in runs], cfg["workers"]):
        row["tokens_per_s"], profile_ops = speeds[str(row["size"]), row["kind"]]
        if profile_ops:
            row["profile"] = profile_ops
        results.append(row)
        results.sort(key=lambda r: runs.index((r["size"], r["kind"])))
        write_json_atomic(json_path, {"config": cfg, "speeds": speed_rows, "results": results})
    targets = []
    for size in cfg["sizes"]:
        dense = next((r for r in results if r["size"] == size and r["kind"] == "dense"), None)
        for r in (r for r in results if r["size"] == size and r["kind"] != "dense" and dense):
            targets.append({"size": size, "kind": r["kind"],
                            "bits_ratio_at_equal_steps": r["bits_by_loss"] / max(dense["bits_by_loss"], 1e-9),
                            "bits_per_flop_ratio": r["bits_per_flop"] / max(dense["bits_per_flop"], 1e-30),
                            "tokens_per_s_ratio": r["tokens_per_s"] / dense["tokens_per_s"]})
    write_json_atomic(json_path, {"config": cfg, "speeds": speed_rows, "results": results, "vs_dense": targets})
    for t in targets:
        print(f"{t['kind']} {t['size']}: {t['bits_ratio_at_equal_steps']:.2f}x the dense bits at equal steps, "
              f"{t['bits_per_flop_ratio']:.2f}x bits/FLOP, {t['tokens_per_s_ratio']:.2f}x tokens/s")
    plot(results, os.path.join(cfg["out"], "knowledge_capacity.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
