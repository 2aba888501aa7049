"""
How does the prompt shape the model's predictions? For each prompt: the next-token distribution
(entropy, top tokens) and the loss at each position of one continuation scored after it.

    python analyze.py --out_dir=out/shakespeare_char --prompts=prompts.txt --continuation=" the king"

prompts.txt holds one prompt per line (write a newline inside a prompt as \\n). Writes
<out>/analyze.json (every number) and <out>/analyze.png (entropy per prompt, the top tokens' probabilities,
and the continuation's loss by position for each prompt).
"""
import math
import os
import sys

import torch

from checkpoint import knn_store_dir, load_checkpoint, load_model, write_json_atomic
from configurator import configure, print_config
from metrics import save_figure
from runtime import resolve_device, set_threads
from tokenizer import tokenizer_from_meta

DEFAULTS = dict(
    out_dir="out/run",
    ckpt="ckpt",             # ckpt (latest) | best (lowest val loss) | a path to a .pt file
    prompts="prompts.txt",   # a text file, one prompt per line (\n inside a line is a newline)
    continuation="",         # text scored after every prompt: its loss at each position
    top_k=8,                 # top tokens shown per prompt
    out="",                  # output folder; default <out_dir>/analyze
    device="auto",
    threads=0,               # torch CPU threads; 0: the cores the load average leaves idle (runtime.set_threads)
)


def read_prompts(path):
    if not os.path.exists(path):
        raise SystemExit(f"prompt file {path} does not exist: write one prompt per line and pass --prompts=FILE")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit(f"prompt file {path} holds no prompts (one per line)")
    return prompts


@torch.no_grad()
def analyze_prompt(model, prompt_ids, continuation_ids, top_k):
    """Next-token entropy (bits) and top tokens after the prompt; loss (nats) at each continuation token."""
    if not continuation_ids:
        raise SystemExit("loss by position needs targets: give a non-empty --continuation to score after each prompt")
    ids = (prompt_ids + continuation_ids)[-model.config.block_size - 1:]  # the last block_size + 1 tokens fit
    n_prompt = len(ids) - len(continuation_ids)
    if n_prompt < 1:
        raise SystemExit(f"the continuation ({len(continuation_ids)} tokens) leaves no room for a prompt in "
                         f"block_size={model.config.block_size}; shorten it")
    x = torch.tensor([ids[:-1]], device=next(model.parameters()).device)
    y = torch.tensor([ids[1:]], device=x.device)
    logits, token_losses = model(x, y, reduction="none")
    probs = logits[0, n_prompt - 1].float().softmax(-1)  # the distribution of the first continuation token
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum().item() / math.log(2)
    top = probs.topk(min(top_k, probs.numel()))
    return {"entropy_bits": entropy, "top": [(int(i), float(p)) for p, i in zip(top.values, top.indices)],
            "continuation_loss": token_losses[0, n_prompt - 1:].tolist()}


def plot(results, continuation_tokens, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [r["label"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.barh(range(len(results)), [r["entropy_bits"] for r in results])
    ax.set_yticks(range(len(results)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("next-token entropy (bits)")
    ax.set_title("uncertainty after each prompt")
    ax = axes[1]
    tokens = sorted({t for r in results for t, _ in r["top_tokens"]})
    grid = [[dict(r["top_tokens"]).get(t, 0.0) for t in tokens] for r in results]
    im = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=0)
    ax.set_yticks(range(len(results)), labels)
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90)
    ax.set_xlabel("token (each prompt's top tokens)")
    ax.set_title("next-token probability")
    fig.colorbar(im, ax=ax, label="probability")
    ax = axes[2]
    for r in results:
        ax.plot(range(len(r["continuation_loss"])), r["continuation_loss"], marker=".", label=r["label"])
    ax.set_xticks(range(len(continuation_tokens)), [repr(t)[1:-1] for t in continuation_tokens], rotation=90)
    ax.set_xlabel("continuation token")
    ax.set_ylabel("loss (nats)")
    ax.set_title("continuation loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    prompts = read_prompts(cfg["prompts"])
    path = os.path.join(cfg["out_dir"], f"{cfg['ckpt']}.pt") if cfg["ckpt"] in ("ckpt", "best") else cfg["ckpt"]
    device = resolve_device(cfg["device"])
    set_threads(cfg["threads"])
    state = load_checkpoint(path, map_location=device)
    model = load_model(state, device, knn_store=knn_store_dir(path))
    tokenizer = tokenizer_from_meta(state["tokenizer"])
    continuation_ids = tokenizer.encode(cfg["continuation"])
    results = []
    for prompt in prompts:
        r = analyze_prompt(model, tokenizer.encode(prompt), continuation_ids, cfg["top_k"])
        label = prompt.replace("\n", "\\n")
        results.append({"prompt": prompt, "label": label if len(label) <= 24 else label[:21] + "...",
                        "entropy_bits": r["entropy_bits"], "continuation_loss": r["continuation_loss"],
                        "top_tokens": [(tokenizer.decode([i]), p) for i, p in r["top"]]})
        top = ", ".join(f"{t!r} {p:.2f}" for t, p in results[-1]["top_tokens"][:4])
        print(f"{label!r}: entropy {r['entropy_bits']:.2f} bits, top {top}; continuation loss "
              f"{sum(r['continuation_loss']) / len(r['continuation_loss']):.3f} nats/token")
    out = cfg["out"] or os.path.join(cfg["out_dir"], "analyze")
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "analyze.json"), {"config": cfg, "checkpoint": path, "results": results})
    plot(results, [tokenizer.decode([i]) for i in continuation_ids], os.path.join(out, "analyze.png"))
    print(f"wrote {out}/analyze.json and analyze.png")


if __name__ == "__main__":
    main(sys.argv[1:])
