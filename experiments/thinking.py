"""
Thinking by iterating (issue 28): does a looped model solve problems harder than any it was trained on by
running more loops at test time?

    python experiments/thinking.py config/thinking_parity.py --seed=1337 --out_dir=out/thinking/parity_s1337
    python experiments/thinking.py config/thinking_chains.py --models="['looped','params','compute']"
    python experiments/thinking.py --merge="['out/a/thinking.json','out/b/thinking.json']" --out_dir=out/ab

Tasks (problems.py): parity (running parity trained at train_length, tested at test_lengths: the
calibration on a known positive, Bansal et al. 2022), chains (variable chains at one fixed length, trained
on train_hops, tested to test_hops: the headline), addition (reversed addition, trained on train_digits,
tested at test_digits). Models: looped (prelude + core x loops + coda, with issue 28's step training), params
(the same distinct layers run once: the same parameters) and compute (prelude + core x loops + coda distinct
layers: the same compute at the training loop count). Each trains with training.fit on fresh problems every
step, then is scored by exact match at every difficulty and, for the looped model, at every test loop count
(and with its halting probe when it has one). Writes <out_dir>/thinking.json and thinking.png: accuracy
against test-time loops, one line per difficulty, the baselines as dashed lines.
"""
import json
import os
import random
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import problems  # noqa: E402
from architecture import build_model, model_args  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from runtime import code_version, resolve_device  # noqa: E402
from training import fit  # noqa: E402

DEFAULTS = dict(
    task="parity",            # parity | chains | addition
    models=["looped"],        # looped | params | compute
    out_dir="out/thinking",
    merge=[],                 # thinking.json files to draw together (nothing is trained): runs of one name from
                              # several seeds are averaged (mean and std over seeds)
    seed=1337,
    device="auto",
    compile=False,            # compile each block (fewer kernel launches: these models are launch-bound on a GPU)
    budget_s=0,               # > 0: training stops after this many seconds (the schedule unfinished; steps_done says)
    save=True,                # each trained model as <out_dir>/<model>.pt (a checkpoint sample.py and serve.py read)
    # the looped model (looped.py's options); the baselines take its width and distinct layers
    n_embd=64,
    n_head=4,
    n_prelude=1,
    n_core=1,
    n_coda=1,
    attn_window=0,            # every layer's attention window (0: full); a local operator for parity
    loops=8,                  # the training loop count (mean, with loops_sampling)
    loops_sampling="fixed",
    loops_min=1,
    loops_max=0,
    loop_loss="progressive",  # last | every | progressive
    progressive_alpha=0.5,
    init_state="zero",
    state_noise=0.0,
    halt=False,
    halt_threshold=0.9,
    halt_rule="all",          # a row stops when the probe is sure at every answer position (all) or on their mean;
                              # the evaluation also scores the other rule (halting_other in the JSON)
    prefix_lm=True,           # chains and addition: the problem is read both ways (the END token ends it)
    attn_scale=0.0,           # every model's attention logit scale (model.py; 0: 1/sqrt(head size))
    # training
    steps=2000,
    batch_size=64,
    learning_rate=1e-3,
    warmup=100,
    weight_decay=0.0,
    # parity
    train_length=16,
    test_lengths=[16, 32, 64],
    # chains
    n_statements=16,
    n_vars=24,
    separators=False,         # each statement ends with `;`, so a position can tell a name from a value
    every_statement=False,    # training scores every statement's variable's value, not only the asked one
    rhs_targets=False,        # values scored at each statement's right-hand side and the answer at the asked name
                              # (one induction step per hop), not at `;` and END
    train_statements=[],      # problem sizes training draws from, one per batch (empty: n_statements only); the test
                              # is always n_statements long. Small problems make the lookup easy to find first
    curriculum=0.0,           # > 0: train_statements is a ladder, climbed one size once the model answers this share
                              # of a size's problems (every curriculum_every steps); each batch is the current
                              # size half the time, an earlier one otherwise (so the small ones are not forgotten)
    curriculum_every=250,
    train_hops=[1, 4],
    test_hops=[1, 2, 4, 6, 8, 12],
    # addition
    train_digits=[1, 8],
    test_digits=[8, 16, 24],
    # evaluation
    test_loops=[1, 2, 4, 8, 16, 32],
    test_problems=256,
)


# ----------------------------------------------------------------------------- the task

def task_spec(cfg):
    """(vocab size, block size, the problem's end token or -1, difficulties to test, train batch(step, rng),
    test batch(difficulty, n, rng)); the chains-only options on another task are a SystemExit."""
    device = cfg["device_obj"]
    if cfg["task"] != "chains" and (cfg["curriculum"] or cfg["rhs_targets"]):
        raise SystemExit("curriculum and rhs_targets are options of the chains task")
    if cfg["task"] == "parity":
        def train_batch(rng, gen):
            return problems.parity_batch(cfg["batch_size"], cfg["train_length"], gen, device)

        def test_batch(length, n, rng, gen):
            return problems.parity_batch(n, length, gen, device)
        block = max(cfg["test_lengths"] + [cfg["train_length"]]) + 1  # BOS
        return problems.PARITY_VOCAB, block, -1, cfg["test_lengths"], train_batch, test_batch
    if cfg["task"] == "chains":
        vocab, sep = problems.chains_vocab(cfg["n_vars"], cfg["separators"]), cfg["separators"]
        sizes = cfg["train_statements"] or [cfg["n_statements"]]
        if not all(1 <= n <= cfg["n_statements"] for n in sizes):
            raise SystemExit(f"train_statements={sizes} must lie in 1..n_statements={cfg['n_statements']}")
        if cfg["curriculum"] and (not 0 < cfg["curriculum"] <= 1 or len(set(cfg["train_statements"])) < 2
                                  or cfg["curriculum_every"] < 1):
            raise SystemExit(f"curriculum={cfg['curriculum']} climbs train_statements={cfg['train_statements']}: it "
                             f"needs a share of answers in (0, 1], two sizes or more and curriculum_every >= 1")

        def train_batch(rng, gen, allowed=None, answers_only=False):
            n = rng.choice(allowed or sizes)
            hops = tuple(min(h, n) for h in cfg["train_hops"])  # a small problem holds chains of n hops at most
            return problems.chains_batch(cfg["batch_size"], hops, n, cfg["n_vars"], rng, device, separators=sep,
                                         every_statement=cfg["every_statement"] and not answers_only,
                                         rhs_targets=cfg["rhs_targets"])

        def test_batch(hops, n, rng, gen):
            return problems.chains_batch(n, hops, cfg["n_statements"], cfg["n_vars"], rng, device, separators=sep,
                                         rhs_targets=cfg["rhs_targets"])
        block = (3 if sep else 2) * cfg["n_statements"] + 4
        return vocab["size"], block, vocab["end"], cfg["test_hops"], train_batch, test_batch
    if cfg["task"] == "addition":
        vocab = problems.addition_vocab()

        def train_batch(rng, gen):
            return problems.addition_batch(cfg["batch_size"], rng.randint(*cfg["train_digits"]), gen, device)

        def test_batch(digits, n, rng, gen):
            return problems.addition_batch(n, digits, gen, device)
        block = 3 * max(cfg["test_digits"] + [cfg["train_digits"][1]]) + 3
        return vocab["size"], block, vocab["end"], cfg["test_digits"], train_batch, test_batch
    raise SystemExit(f"task must be parity, chains or addition, got {cfg['task']!r}")


def model_options(cfg, name, vocab_size, block_size, end_token):
    """architecture.build_model's options for one compared model."""
    distinct = cfg["n_prelude"] + cfg["n_core"] + cfg["n_coda"]
    n_layer = {"looped": distinct, "params": distinct,
               "compute": cfg["n_prelude"] + cfg["n_core"] * cfg["loops"] + cfg["n_coda"]}[name]
    options = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=cfg["n_head"],
                   n_embd=cfg["n_embd"], dropout=0.0, attn_scale=cfg["attn_scale"],
                   attn_windows=[cfg["attn_window"]] * n_layer if cfg["attn_window"] else [])
    prefix = end_token if cfg["prefix_lm"] else -1
    if name == "looped":
        keys = ("n_prelude", "n_core", "n_coda", "loops", "loops_sampling", "loops_min", "loops_max", "loop_loss",
                "progressive_alpha", "init_state", "state_noise", "halt", "halt_threshold", "halt_rule")
        return options | {k: cfg[k] for k in keys} | dict(prefix_token=prefix)
    # a plain stack with the same attention: a looped model of one loop whose core is every layer
    return options | dict(n_core=n_layer, loops=1, prefix_token=prefix) if prefix >= 0 else options


# ----------------------------------------------------------------------------- train and score

@torch.no_grad()
def accuracy(model, test_batch, difficulty, cfg, **options):
    """Exact-match accuracy over test_problems fresh problems (the same ones for every loop count)."""
    rng, gen = random.Random(cfg["seed"] + 7919 * difficulty), torch.Generator().manual_seed(cfg["seed"] + difficulty)
    x, y = test_batch(difficulty, cfg["test_problems"], rng, gen)
    if cfg["task"] == "chains":  # the problem up to END; its last position says the answer
        x, y = x[:, :-1], y[:, :-1]
    right, used = [], []
    for start in range(0, x.size(0), 128):
        logits = model(x[start:start + 128], **options)[0]
        right.append(problems.exact_match(logits, y[start:start + 128]))
        if options.get("halt"):
            used.append(model.loops_used.float())
    return right and torch.cat(right).float().mean().item(), used and torch.cat(used).mean().item()


def evaluate(model, name, difficulties, test_batch, cfg):
    """{difficulty: {loops: accuracy}} (a looped model at each test loop count, a baseline once: "fixed"),
    and with a halting probe {difficulty: {accuracy, mean loops}}."""
    looped = name == "looped"
    table, halting, other = {}, {}, {}
    for d in difficulties:
        counts = sorted(set(cfg["test_loops"]) | {cfg["loops"]}) if looped else [None]
        table[str(d)] = {str(r) if r else "fixed": accuracy(model, test_batch, d, cfg, **({"loops": r} if r else {}))[0]
                         for r in counts}
        if looped and cfg["halt"]:
            acc, used = accuracy(model, test_batch, d, cfg, loops=max(cfg["test_loops"]), halt=True)
            halting[str(d)] = {"accuracy": acc, "mean_loops": used}
            rule = model.loop.halt_rule
            model.loop.halt_rule = {"all": "mean", "mean": "all"}[rule]  # the same model under the other rule
            try:
                acc, used = accuracy(model, test_batch, d, cfg, loops=max(cfg["test_loops"]), halt=True)
                other[str(d)] = {"rule": model.loop.halt_rule, "accuracy": acc, "mean_loops": used}
            finally:
                model.loop.halt_rule = rule
        print(f"  {name} difficulty {d}: " + " ".join(f"{k}:{v:.2f}" for k, v in table[str(d)].items())
              + (f" | halt {halting[str(d)]} | other rule {other[str(d)]}" if str(d) in halting else ""), flush=True)
    return table, halting, other


@torch.no_grad()
def scored_token_accuracy(model, x, y):
    """The share of scored tokens (y != -1) the model gets right."""
    predicted = model(x)[0].argmax(-1)
    scored = y != -1
    return ((predicted == y) & scored).sum().item() / max(1, scored.sum().item())


class Curriculum:
    """The chains' problem sizes as a ladder (issue 28): training starts on the smallest of train_statements and
    takes the next once the model answers `threshold` of a fresh batch's asked variables at the current size (the
    asked variable only: a causal model cannot resolve a statement whose chain goes on later in the problem, so
    the share of every statement right has a ceiling below 1).
    Each batch is the current size half the time and an earlier one otherwise. `climbed` says at which step each
    size was reached. Why: trained on a mix of sizes the models found the lookup on small problems and never
    carried it to the largest; a ladder spends the steps where the model is, and moves on only once it has it."""

    def __init__(self, sizes, threshold, train_batch, seed):
        self.sizes, self.threshold, self.train_batch = sorted(sizes), threshold, train_batch
        self.stage, self.climbed = 0, {str(self.sizes[0]): 0}
        self.rng = random.Random(seed + 104729)  # its own problems: the training stream stays the same

    def allowed(self, rng):
        current = self.sizes[self.stage]
        return [current] if self.stage == 0 or rng.random() < 0.5 else self.sizes[:self.stage]

    def check(self, model, step):
        if self.stage + 1 == len(self.sizes):
            return
        x, y = self.train_batch(self.rng, None, [self.sizes[self.stage]], answers_only=True)
        score = scored_token_accuracy(model, x, y)
        print(f"  curriculum step {step}: {score:.3f} of size {self.sizes[self.stage]}'s answers right", flush=True)
        if score >= self.threshold:
            self.stage += 1
            self.climbed[str(self.sizes[self.stage])] = step


def size_accuracy(model, cfg, train_batch):
    """{size: scored-token accuracy} on fresh training problems of each train_statements size (the training
    difficulty, where the test reads only n_statements)."""
    rng = random.Random(cfg["seed"] + 15485863)
    return {str(n): scored_token_accuracy(model, *train_batch(rng, None, [n])) for n in cfg["train_statements"]}


def run_model(name, cfg, spec):
    vocab_size, block_size, end_token, difficulties, train_batch, test_batch = spec
    torch.manual_seed(cfg["seed"])
    model = build_model(model_options(cfg, name, vocab_size, block_size, end_token)).to(cfg["device_obj"])
    rng, gen = random.Random(cfg["seed"]), torch.Generator().manual_seed(cfg["seed"])
    if cfg["compile"]:
        torch._dynamo.config.recompile_limit = 64  # a graph per problem size and grad mode; past 8 it runs eager
        for block in model.blocks:
            block.compile(dynamic=False)
    ladder = Curriculum(cfg["train_statements"], cfg["curriculum"], train_batch, cfg["seed"]) if cfg["curriculum"] \
        else None
    batches = {}

    def next_batch(step):  # fit asks for each step's batch once, in order
        if step not in batches:
            batches.clear()
            batches[step] = train_batch(rng, gen, ladder.allowed(rng)) if ladder else train_batch(rng, gen)
        return batches[step]
    t0 = time.time()
    loss, tok_s, _ = fit(model, next_batch, cfg["steps"], cfg["learning_rate"], cfg["device_obj"], warmup=cfg["warmup"],
                         weight_decay=cfg["weight_decay"], log_every=max(1, cfg["steps"] // 20), name=name,
                         deadline=t0 + cfg["budget_s"] if cfg["budget_s"] else None,
                         evaluate=(lambda step: ladder.check(model, step)) if ladder else None,
                         eval_every=cfg["curriculum_every"] if ladder else 0)
    seconds, steps_done = time.time() - t0, max(batches) - 1
    print(f"{name}: {model.num_params():,} parameters, loss {loss:.4f} after {cfg['steps']} steps ({seconds:.0f} s)",
          flush=True)
    sizes = size_accuracy(model, cfg, train_batch) if cfg["task"] == "chains" and cfg["train_statements"] else {}
    if sizes:
        print(f"  {name} scored-token accuracy by training size: {sizes}", flush=True)
    table, halting, halting_other = evaluate(model, name, difficulties, test_batch, cfg)
    if cfg["save"]:
        save_checkpoint(os.path.join(cfg["out_dir"], f"{name}.pt"),
                        {"model_args": model_args(model), "model": model.state_dict(), "step": steps_done,
                         "config": {k: v for k, v in cfg.items() if k != "device_obj"}, "val_loss": None,
                         "tokenizer": {"tokenizer": "ids", "vocab_size": vocab_size}}, kind="thinking")
    return {"params": model.num_params(), "final_loss": loss, "train_seconds": seconds, "steps_done": steps_done,
            "accuracy": table, "halting": halting, "halting_other": halting_other, "size_accuracy": sizes,
            "curriculum_climbed": ladder.climbed if ladder else {}}


# ----------------------------------------------------------------------------- several runs, the plot

def combine(results):
    """One result from several thinking.json results: the runs of one name (seeds of one configuration)
    averaged, with the spread over seeds beside (accuracy_std, and halting's per-seed values)."""
    seeded = {}
    for result in results:
        for name, run in result["runs"].items():
            seeded.setdefault(name, []).append(run | {"seed": result["config"]["seed"]})
    runs = {}
    for name, group in seeded.items():
        tables = [run["accuracy"] for run in group]
        cells = {d: list(tables[0][d]) for d in tables[0]}
        runs[name] = {"seeds": [run["seed"] for run in group],
                      "params": group[0]["params"],
                      "accuracy": {d: {k: statistics.mean(t[d][k] for t in tables) for k in ks} for d, ks in cells.items()},
                      "accuracy_std": {d: {k: statistics.pstdev(t[d][k] for t in tables) for k in ks}
                                       for d, ks in cells.items()},
                      "halting": {d: {key: statistics.mean(run["halting"][d][key] for run in group)
                                      for key in ("accuracy", "mean_loops")} | {"per_seed": [run["halting"][d]
                                                                                             for run in group]}
                                  for d in group[0]["halting"]},
                      "halting_other": {d: {key: statistics.mean(run["halting_other"][d][key] for run in group)
                                            for key in ("accuracy", "mean_loops")}
                                        for d in group[0].get("halting_other", {})
                                        if all(d in run.get("halting_other", {}) for run in group)},
                      "per_seed": group}
    return results[0] | {"runs": runs}



def halting_summary(run):
    """The halting probe against the best fixed loop count (issue 28's target: accuracy within 2 points at <= 60%
    of its compute). The best fixed count is the one loop count, the same for every difficulty, with the highest
    mean accuracy (the smallest such); compute is loops, so the ratio is the probe's mean loops over it."""
    table, halting = run["accuracy"], run["halting"]
    loops = sorted({int(k) for d in table for k in table[d]})
    mean_at = {k: statistics.mean(table[d][str(k)] for d in table) for k in loops}
    best = min(loops, key=lambda k: (-round(mean_at[k], 6), k))
    accuracy = statistics.mean(halting[d]["accuracy"] for d in halting)
    used = statistics.mean(halting[d]["mean_loops"] for d in halting)
    return {"best_fixed_loops": best, "best_fixed_accuracy": mean_at[best], "halt_accuracy": accuracy,
            "halt_mean_loops": used, "compute_ratio": used / best, "accuracy_gap": mean_at[best] - accuracy}


def plot(result, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = result["runs"]
    halting = runs.get("looped", {}).get("halting")
    fig, axes = plt.subplots(1, 2 if halting else 1, figsize=(13 if halting else 8, 5), squeeze=False)
    ax = axes[0][0]
    colors = plt.cm.viridis_r
    difficulties = list(next(iter(runs.values()))["accuracy"])
    for i, d in enumerate(difficulties):
        color = colors(i / max(1, len(difficulties) - 1))
        if "looped" in runs:
            looped = runs["looped"]
            loops = sorted(int(k) for k in looped["accuracy"][d])
            mean = [looped["accuracy"][d][str(k)] for k in loops]
            seeds = len(looped.get("seeds", [0]))
            ax.plot(loops, mean, marker="o", color=color, label=f"{result['difficulty']} {d}")
            if seeds > 1:  # the spread over seeds
                std = [looped["accuracy_std"][d][str(k)] for k in loops]
                ax.fill_between(loops, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=color, alpha=0.15, linewidth=0)
        for name, style in (("params", "--"), ("compute", ":")):
            if name in runs:
                ax.axhline(runs[name]["accuracy"][d]["fixed"], color=color, linestyle=style, linewidth=1)
    ax.axvline(result["config"]["loops"], color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test-time loops (grey: the training loop count)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.02, 1.02)
    seeds = len(next(iter(runs.values())).get("seeds", [0]))
    drawn = [label for name, label in (("looped", "looped (solid)"), ("params", "same params (--)"),
                                       ("compute", "same compute (:)")) if name in runs]
    ax.set_title(f"{result['config']['task']}: " + ", ".join(drawn)
                 + (f"; mean and std over {seeds} seeds" if seeds > 1 else ""), fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    if halting:  # the probe's loops against difficulty, beside the best fixed count's
        ax, summary = axes[0][1], halting_summary(runs["looped"])
        ds = list(halting)
        ax.plot([float(d) for d in ds], [halting[d]["mean_loops"] for d in ds], marker="o",
                label="halting probe: mean loops used")
        for d in ds:
            ax.annotate(f"{halting[d]['accuracy']:.2f}", (float(d), halting[d]["mean_loops"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.axhline(summary["best_fixed_loops"], color="grey", linestyle="--",
                   label=f"best fixed count ({summary['best_fixed_loops']} loops, mean acc "
                         f"{summary['best_fixed_accuracy']:.2f})")
        ax.set_xlabel(result["difficulty"])
        ax.set_ylabel("loops (labels: the probe's exact-match accuracy)")
        ax.set_title(f"halting: mean acc {summary['halt_accuracy']:.2f} at "
                     f"{summary['compute_ratio']:.0%} of the best fixed count's loops", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


DIFFICULTY = {"parity": "length", "chains": "hops", "addition": "digits"}


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    if cfg["merge"]:
        result = combine([json.load(open(path)) for path in cfg["merge"]])
    else:
        cfg["device_obj"] = resolve_device(cfg["device"])
        spec = task_spec(cfg)
        result = {"config": {k: v for k, v in cfg.items() if k != "device_obj"}, "difficulty": DIFFICULTY[cfg["task"]],
                  "code": code_version(__file__), "runs": {}}
        for name in cfg["models"]:
            result["runs"][name] = run_model(name, cfg, spec)
            with open(os.path.join(cfg["out_dir"], "thinking.json"), "w") as f:
                json.dump(result, f, indent=1)
    for run in result["runs"].values():
        if run.get("halting"):
            run["halting_summary"] = halting_summary(run)
        if run.get("halting_other"):  # the other halting rule, scored the same way
            run["halting_other_summary"] = halting_summary(run | {"halting": run["halting_other"]})
    with open(os.path.join(cfg["out_dir"], "thinking.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(cfg["out_dir"], "thinking.png"))
    print(f"wrote {cfg['out_dir']}/thinking.json and thinking.png")


if __name__ == "__main__":
    main(sys.argv[1:])
