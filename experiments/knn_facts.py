"""
Knowledge outside the weights: does a kNN memory layer answer from its store?

    python experiments/knn_facts.py --out=out/knn_facts.json

A synthetic world of facts, "the capital of X is Y .", one word per token. Three kinds of country:
  trained  the model trains on their facts (fixed capitals), which are also written into the store
  rotated  their capitals are drawn afresh every step and written into the store before the step,
           so the only way to predict them is to read the store: this teaches the layer to rely on it
  held-out never in training; their facts exist only in the store written at test time
Recall is greedy decoding of the token after "the capital of X is", measured for
  (a) trained facts, store of all true facts     (a0) trained facts, empty store (what the weights hold)
  (b) held-out facts, only in the store           (c) every fact changed, in a swapped store
"""
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, print_config  # noqa: E402
from architecture import build_model  # noqa: E402
from memory import knn_stores, memorize  # noqa: E402

DEFAULTS = dict(
    out="out/knn_facts.json",
    seed=1337,
    n_trained=100, n_rotated=300, n_held_out=100, n_cities=300,
    facts_per_sequence=1,   # facts per training sequence; more packs several, so read and stored contexts differ
    batch_size=64,
    steps=300,
    learning_rate=2e-3,
    warmup=50,
    n_layer=4, n_head=4, n_embd=128,
    memory_layers=[2],
    memory_topk=1,           # nearest neighbour: with top-8 the read did not learn in 400 steps (BENCHMARKS.md)
    knn_key_dim=64,
    knn_capacity=16384,
    knn_threshold=0.01,
    log_interval=100,
    threads=1,              # a model this small runs fastest on one CPU thread (no synchronisation)
)
WORDS = ["<bos>", "the", "capital", "of", "is", "."]


def build_world(cfg, rng):
    """Vocabulary and the three country sets with their true capitals (token ids)."""
    countries = [f"country{i}" for i in range(cfg["n_trained"] + cfg["n_rotated"] + cfg["n_held_out"])]
    cities = [f"city{i}" for i in range(cfg["n_cities"])]
    vocab = {w: i for i, w in enumerate(WORDS + countries + cities)}
    ids = [vocab[c] for c in countries]
    rng.shuffle(ids)
    a, r = cfg["n_trained"], cfg["n_trained"] + cfg["n_rotated"]
    city_ids = [vocab[c] for c in cities]
    world = {"trained": ids[:a], "rotated": ids[a:r], "held_out": ids[r:], "cities": city_ids}
    world["capital"] = {c: rng.choice(city_ids) for c in ids}
    return vocab, world


def fact(country, city):
    return [0, 1, 2, 3, country, 4, city, 5]  # <bos> the capital of X is Y .


def memorize_facts(model, facts):
    """A fresh store holding exactly these facts, each written as its own document."""
    for store in knn_stores(model).values():
        store.clear()
    if facts:
        memorize(model, torch.tensor([fact(c, y) for c, y in facts.items()]))


@torch.no_grad()
def recall(model, facts):
    """Fraction of countries whose greedy next token after 'the capital of X is' is facts[X]."""
    prompts = torch.tensor([fact(c, 0)[:6] for c in facts])
    answers = model.generate(prompts, 1, temperature=0.0)[:, -1]
    return (answers == torch.tensor(list(facts.values()))).float().mean().item()


def train_model(cfg, vocab, world, rng):
    torch.manual_seed(cfg["seed"])
    model = build_model(dict(vocab_size=len(vocab), block_size=8 * cfg["facts_per_sequence"], n_layer=cfg["n_layer"],
                             n_head=cfg["n_head"], n_embd=cfg["n_embd"], memory_layers=cfg["memory_layers"],
                             memory="knn", memory_topk=cfg["memory_topk"], knn_key_dim=cfg["knn_key_dim"],
                             knn_capacity=cfg["knn_capacity"], knn_threshold=cfg["knn_threshold"]))
    optimizer = model.configure_optimizers(0.1, cfg["learning_rate"], (0.9, 0.95), "cpu")
    trained = {c: world["capital"][c] for c in world["trained"]}
    t0, history = time.time(), []
    for step in range(cfg["steps"]):
        # a new episode: rotated countries get new capitals, and the store holds this episode's true facts
        rotated = {c: rng.choice(world["cities"]) for c in world["rotated"]}
        model.eval()
        memorize_facts(model, trained | rotated)
        model.train()
        pool = list(trained.items()) + list(rotated.items())
        seqs = [sum((fact(*rng.choice(pool)) for _ in range(cfg["facts_per_sequence"])), [])
                for _ in range(cfg["batch_size"])]
        x = torch.tensor(seqs)
        # only the answers are unknown; the template tokens would dominate the loss otherwise
        y = torch.full_like(x, -1)
        y[:, 5::8] = x[:, 6::8]
        for group in optimizer.param_groups:
            # warmup, then linear decay to a tenth: at a constant lr the read degraded after its peak
            decay = 1 - 0.9 * max(0, step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
            group["lr"] = cfg["learning_rate"] * min(1.0, (step + 1) / cfg["warmup"], decay)
        loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg["log_interval"] == 0:
            model.eval()
            memorize_facts(model, trained | rotated)
            row = {"step": step + 1, "loss": loss.item(), "rotated_recall": recall(model, rotated),
                   "seconds": round(time.time() - t0, 1)}
            history.append(row)
            print(row, flush=True)
    return model.eval(), history


def evaluate(model, world, rng):
    trained = {c: world["capital"][c] for c in world["trained"]}
    held_out = {c: world["capital"][c] for c in world["held_out"]}
    results = {}
    memorize_facts(model, {})
    results["a0_trained_empty_store"] = recall(model, trained)
    memorize_facts(model, trained | held_out)
    results["a_trained"] = recall(model, trained)
    results["b_store_only"] = recall(model, held_out)
    # swap the store: every trained and held-out fact gets a different capital
    changed = {c: rng.choice([y for y in world["cities"] if y != old]) for c, old in (trained | held_out).items()}
    memorize_facts(model, changed)
    results["c_changed_trained"] = recall(model, {c: changed[c] for c in trained})
    results["c_changed_held_out"] = recall(model, {c: changed[c] for c in held_out})
    results["c_changed_all"] = recall(model, changed)
    results["c_still_old_answer_trained"] = recall(model, trained)
    return results


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    torch.set_num_threads(cfg["threads"])
    rng = random.Random(cfg["seed"])
    vocab, world = build_world(cfg, rng)
    t0 = time.time()
    model, history = train_model(cfg, vocab, world, rng)
    results = evaluate(model, world, rng)
    results["train_seconds"] = round(time.time() - t0, 1)
    for k, v in results.items():
        print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
    with open(cfg["out"], "w") as f:
        json.dump({"config": cfg, "command": "python experiments/knn_facts.py " + " ".join(argv),
                   "torch": torch.__version__, "history": history, "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
