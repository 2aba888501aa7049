"""
Can a small model reason over facts it is given instead of storing them? (research notes 002)

    nice -n 10 python experiments/reason_vs_knowledge.py --out=out/reason_vs_knowledge            # CPU, ~15 min
    bash experiments/analysis_gpu.sh OUT     # the GPU size (with issue 12's other experiments), ~9 min
    python experiments/reason_vs_knowledge.py --device=cuda --workers=3 --steps=8000 --batch_size=128 \
        --learning_rate=2e-3 --eval_docs=1000 --curve_every=500 "--sizes=[[2, 2, 64], [4, 4, 128]]" \
        --question_style=induction --n_bosses=0 --out=out/rvk_induction_gpu    # the lookup as an induction step (GPU)

Context models train on synthetic.py's facts corpus (fresh people and facts in every document) and are
tested on held-out documents whose people no training document names: accuracy of the answer city (the
argmax over the cities; chance 1/n_cities) for 1-hop and 2-hop questions, with the facts in the context
and with them removed (one question per document then: earlier answers would leak cities). A weights
model (the largest size) trains on a fixed world (the same people always live in the same city) and
is tested with the facts removed and with the facts changed in the context (does it follow the
context or its weights?); the context models take the same tests.
The loss is on the answers only (answers_only): the facts are random draws whose loss is noise.
Writes <out>/reason_vs_knowledge.json and .png.
"""
import os
import sys
from collections import Counter

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import synthetic  # noqa: E402
from checkpoint import write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from metrics import save_figure  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from training import fit  # noqa: E402
from runtime import resolve_device, run_in_processes  # noqa: E402

DEFAULTS = dict(
    out="out/reason_vs_knowledge",
    sizes=[[1, 2, 32], [2, 2, 64], [3, 4, 96]],  # [n_layer, n_head, n_embd] of each context model
    steps=1000,
    batch_size=24,
    learning_rate=3e-3,
    n_people=4,
    n_bosses=2,
    n_questions=4,
    n_cities=8,
    world_people=40,        # the fixed world of the weights model (training names)
    eval_docs=400,
    block_size=96,
    answers_only=True,      # loss on the answer tokens only
    question_style="where",  # where: "where does X live ?" | cloze: "? X lives in" | induction: "lives X C ." facts,
                             # "? lives X" questions (the answer one induction step away; synthetic.py)
    curve_every=0,          # > 0: accuracy on curve_docs test documents every this many steps (a lookup forms late)
    curve_docs=200,
    device="cpu",
    workers=1,              # models trained at once in separate processes (small models underuse a GPU)
    seed=1337,
)


def doc_batches(make_doc, vocab, batch_size, block_size, seed, answers_only):
    """next_batch(step) for training.fit: fresh documents drawn with a per-step generator. answers_only
    keeps the loss on the answers alone: the facts are random draws, their loss is noise that drowns
    the few answer tokens' signal."""
    def next_batch(step):
        rng = np.random.default_rng([seed, step])
        docs = [make_doc(rng) for _ in range(batch_size)]
        x, y = synthetic.pad_batch([vocab.encode(words) for words, _ in docs], block_size, 0)
        if answers_only:
            keep = torch.zeros_like(y, dtype=torch.bool)
            for i, (_, answers) in enumerate(docs):
                keep[i, [pos - 1 for pos, _, _ in answers]] = True
            y = y.masked_fill(~keep, -1)
        return x, y
    return next_batch


@torch.no_grad()
def accuracy(model, vocab, docs, device):
    """Answer accuracy (argmax over the cities) by hop count, and for answers that a changed fact moved,
    how often the model gave the old (fixed-world) answer instead: docs are (words, answers, old answers)."""
    cities = torch.tensor(vocab.encode(synthetic.CITIES), device=device)
    hits, olds, counts = {1: 0, 2: 0}, {1: 0, 2: 0}, {1: 0, 2: 0}
    block = model.config.block_size
    for start in range(0, len(docs), 64):
        chunk = docs[start:start + 64]
        x, _ = synthetic.pad_batch([vocab.encode(w) for w, _, _ in chunk], block, 0)
        logits = model(x.to(device))[0][..., cities].cpu()  # (B, T, n_cities); read on the host, one copy
        for b, (_, answers, old) in enumerate(chunk):
            for (pos, answer, hops), old_answer in zip(answers, old):
                guess = synthetic.CITIES[logits[b, pos - 1].argmax().item()]
                hits[hops] += guess == answer
                olds[hops] += old_answer is not None and guess == old_answer
                counts[hops] += 1
    # nan where a test asks no question of that kind (n_bosses=0: no 2-hop questions), so it is not read as 0
    return {f"{h}hop": hits[h] / counts[h] if counts[h] else float("nan") for h in (1, 2)} | \
           {f"{h}hop_old_answer": olds[h] / counts[h] if counts[h] else float("nan") for h in (1, 2)}


def eval_docs(cfg, world, names, seed):
    """The test sets: held-out people with facts / without; fixed-world people without facts / with changed facts.
    A document without facts asks one question: the answers to earlier questions would leak cities."""
    rng = np.random.default_rng(seed)
    P, B, Q, C = cfg["n_people"], cfg["n_bosses"], cfg["n_questions"], cfg["n_cities"]
    style = cfg["question_style"]
    sets = {}
    for key, with_facts in (("held_out_with_facts", True), ("held_out_facts_removed", False)):
        docs = []
        for _ in range(cfg["eval_docs"]):
            w, a = synthetic.facts_document(rng, synthetic.facts_world(rng, names, P, B, C), Q if with_facts else 1,
                                            with_facts, style)
            docs.append((w, a, [None] * len(a)))
        sets[key] = docs
    docs_removed, docs_changed = [], []
    for _ in range(cfg["eval_docs"]):
        w, a = synthetic.fixed_world_document(rng, world, P, 1, with_facts=False, style=style)
        docs_removed.append((w, a, [None] * len(a)))
        w, a = synthetic.fixed_world_document(rng, world, P, Q, with_facts=True, move_people=C, style=style)
        old = [world["home"][solve_person(w, pos)] for pos, _, _ in a]
        docs_changed.append((w, a, old))
    sets["world_facts_removed"], sets["world_facts_changed"] = docs_removed, docs_changed
    return sets


def solve_person(words, pos):
    """The person whose home the question ending before pos asks for, in the fixed world (through the boss)."""
    q = words[:pos]
    if "where" in q:  # where does X live ? | where does the boss of X live ?
        start = len(q) - 1 - q[::-1].index("where") + 2
    else:  # cloze: ? X lives in | ? the boss of X lives in; induction: ? lives X | ? lives boss X
        start = len(q) - 1 - q[::-1].index("?") + 1
        start += q[start] == "lives"
    if q[start] not in ("the", "boss"):
        return " ".join(q[start:start + 2])
    # asked through the boss: the boss is stated in the document
    worker = " ".join(q[start + 3:start + 5] if q[start] == "the" else q[start + 1:start + 3])
    for i in range(len(words) - 4):
        if " ".join(words[i:i + 2]) == worker and words[i + 2] == "works":  # X works for B .
            return " ".join(words[i + 4:i + 6])
        if words[i] == "boss" and " ".join(words[i + 1:i + 3]) == worker and words[i + 5] == ".":  # boss X B .
            return " ".join(words[i + 3:i + 5])
    raise AssertionError(f"no boss of {worker} in the document")


def plot(results, cfg, baseline, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.5))
    ax = axes[0]
    ctx = [r for r in results if r["kind"] == "context"]
    params = [r["params"] for r in ctx]
    for key, style, label in (("held_out_with_facts", "-", "facts in context"), ("held_out_facts_removed", ":", "facts removed")):
        for hop, color in ((1, "C0"), (2, "C1")):
            ax.plot(params, [r["tests"][key][f"{hop}hop"] for r in ctx], style, color=color, marker="o",
                    label=f"{hop}-hop, {label}")
    ax.axhline(1 / cfg["n_cities"], color="gray", lw=0.8, ls="--", label="chance")
    ax.axhline(baseline, color="black", lw=0.8, ls="-.", label="no lookup: the most often named city")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (without embeddings)")
    ax.set_ylabel("answer accuracy, held-out people")
    ax.set_ylim(0, 1.02)
    ax.set_title("context models: reasoning over given facts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    chosen = [ctx[-1], next(r for r in results if r["kind"] == "weights")]
    bars = [("world_facts_removed", "1hop", "facts removed"), ("world_facts_changed", "1hop", "changed: follows context"),
            ("world_facts_changed", "1hop_old_answer", "changed: gives old fact")]
    for i, r in enumerate(chosen):
        ax.bar([j + 0.4 * i for j in range(len(bars))], [r["tests"][k][m] for k, m, _ in bars], width=0.4,
               label=f"{r['kind']} model ({r['params'] / 1e3:.0f}k)")
    ax.set_xticks([j + 0.2 for j in range(len(bars))], [b[2] for b in bars])
    ax.axhline(1 / cfg["n_cities"], color="gray", lw=0.8, ls="--")
    ax.set_ylabel("1-hop accuracy, fixed-world people")
    ax.set_ylim(0, 1.02)
    ax.set_title("knowledge in the weights vs in the context")
    ax.legend(fontsize=8)
    ax = axes[2]
    for i, r in enumerate(results):
        for hop, style in ((1, "-"), (2, ":")):
            ax.plot([p["step"] for p in r["curve"]], [p[f"{hop}hop"] for p in r["curve"]], style, color=f"C{i}",
                    label=f"{r['kind']} {r['size'][0]}x{r['size'][2]}, {hop}-hop ({r['curve_test'].replace('_', ' ')})")
    ax.axhline(1 / cfg["n_cities"], color="gray", lw=0.8, ls="--")
    ax.axhline(baseline, color="black", lw=0.8, ls="-.")
    ax.set_xlabel("training step")
    ax.set_ylabel("answer accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("during training (curve_every > 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def named_city_baseline(docs):
    """Accuracy of the guess that needs no lookup: the city its facts name most often (ties split)."""
    hits = count = 0
    for words, answers, _ in docs:
        first_question = min(words.index(w) for w in ("where", "?") if w in words)
        named = Counter(w for w in words[:first_question] if w in synthetic.CITIES)
        top = max(named.values())
        for _, answer, _ in answers:
            hits += (named[answer] == top) / sum(n == top for n in named.values())
            count += 1
    return hits / max(1, count)


def setting(cfg):
    """What every run shares, rebuilt from the seed in each worker: the vocabulary, the name split, the
    fixed world and the test documents."""
    vocab = synthetic.facts_vocab()
    train_names, held_names = synthetic.split_names(cfg["seed"])
    world_rng = np.random.default_rng([cfg["seed"], 1])
    world = synthetic.facts_world(world_rng, train_names, cfg["world_people"], cfg["world_people"] // 2, cfg["n_cities"])
    return vocab, train_names, world, eval_docs(cfg, world, held_names, cfg["seed"] + 2)


def train_and_test(cfg, kind, size):
    """Train one model (context: fresh facts per document; weights: the fixed world) and test it on every set."""
    vocab, train_names, world, tests = setting(cfg)
    device = resolve_device(cfg["device"])
    P, B, Q, C = cfg["n_people"], cfg["n_bosses"], cfg["n_questions"], cfg["n_cities"]
    n_layer, n_head, n_embd = size
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=cfg["block_size"], n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd)).to(device)
    if kind == "context":
        make_doc = lambda rng: synthetic.facts_document(rng, synthetic.facts_world(rng, train_names, P, B, C), Q,  # noqa: E731
                                                        style=cfg["question_style"])
    else:
        make_doc = lambda rng: synthetic.fixed_world_document(rng, world, P, Q, style=cfg["question_style"])  # noqa: E731
    batches = doc_batches(make_doc, vocab, cfg["batch_size"], cfg["block_size"], cfg["seed"], cfg["answers_only"])
    # along training: the context model on held-out people with facts, the weights model on its world without
    curve_test = "held_out_with_facts" if kind == "context" else "world_facts_removed"
    curve = []

    def evaluate(step):
        curve.append({"step": step, **accuracy(model, vocab, tests[curve_test][:cfg["curve_docs"]], device)})
    loss, tok_s, _ = fit(model, batches, cfg["steps"], cfg["learning_rate"], device, evaluate=evaluate,
                                   eval_every=cfg["curve_every"])
    row = {"kind": kind, "size": list(size), "params": model.num_params(), "final_loss": loss, "tokens_per_s": tok_s,
           "tests": {k: accuracy(model, vocab, docs, device) for k, docs in tests.items()},
           "curve_test": curve_test, "curve": curve}
    print(f"{kind} {n_layer}x{n_embd} ({row['params']:,} params): loss {loss:.3f}; " +
          "; ".join(f"{k} {v['1hop']:.2f}/{v['2hop']:.2f}" for k, v in row["tests"].items()), flush=True)
    return row


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    synthetic.check_facts_settings(cfg["n_people"], cfg["n_bosses"], cfg["n_questions"], cfg["n_cities"])
    if cfg["question_style"] not in synthetic.STYLES:
        raise SystemExit(f"question_style must be one of {', '.join(synthetic.STYLES)}, got {cfg['question_style']!r}")
    resolve_device(cfg["device"])  # a missing device is an error before any worker starts
    os.makedirs(cfg["out"], exist_ok=True)
    runs = [("context", size) for size in cfg["sizes"]] + [("weights", cfg["sizes"][-1])]
    baseline = named_city_baseline(setting(cfg)[3]["held_out_with_facts"])
    results = []
    for row in run_in_processes(train_and_test, [(cfg, kind, size) for kind, size in runs], cfg["workers"]):
        results.append(row)
        results.sort(key=lambda r: runs.index((r["kind"], r["size"])))
        write_json_atomic(os.path.join(cfg["out"], "reason_vs_knowledge.json"),
                          {"config": cfg, "chance": 1 / cfg["n_cities"], "named_city_baseline": baseline,
                           "results": results})
    plot(results, cfg, baseline, os.path.join(cfg["out"], "reason_vs_knowledge.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
