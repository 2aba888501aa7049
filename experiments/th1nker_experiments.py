"""
Th1nker experiments (issue 29; th1nker.py). One script, three experiments:

    python experiments/th1nker_experiments.py config/th1nker_parity.py --seed=1     # (1) probe vs fixed schedules, (4) RL on steps
    python experiments/th1nker_experiments.py config/th1nker_store.py --seed=1      # (2) medium-term memory: with/without the store
    python experiments/th1nker_experiments.py config/th1nker_longterm.py --seed=1   # (3) long-term memory: facts, then questions
    python experiments/th1nker_experiments.py --merge="['a/th1nker.json','b/th1nker.json']" --out_dir=out/th1nker/all

parity: running parity (problems.py, BOS) of 1..max_length bits in one batch (a PAD token after each row's end),
    every layer seeing its own position and the one before (window 2), so a row of l bits needs about l loops.
    The blocks train on the schedule (R P O) x loops (a loss at every Output), the probe imitates the fixed
    schedule (R P) x loops O S, then REINFORCE with reward correct / blocks run. Scored per length: the fixed
    schedule at every loop count, the probe (greedy): accuracy and blocks used.
store: two sub-problems: read digits a, then the latent is reset (a context switch: the latent cannot carry a),
    read digits b; the answer at each position is a + b (0-18). With the store the schedule ends in a
    ReadLatent (L), without it in one more Process (the same block count).
longterm: episodes of n_facts facts `name value`; run 1 compresses each fact into one memory token (R P P at a
    MEM token) kept in a long-term store; run 2 asks `? name` and reads the memory (M). Compared with the facts
    in context and with no memory.
Writes <out_dir>/th1nker.json, th1nker.png and (parity) th1nker.pt.
"""
import json
import math
import os
import random
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import problems  # noqa: E402
import th1nker  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from th1nker import Th1nker, ThinkerConfig, looped_schedule  # noqa: E402

DEFAULTS = dict(
    experiment="parity",      # parity | store | longterm
    out_dir="out/th1nker",
    merge=[],                 # th1nker.json files (seeds of one experiment) to average and draw; nothing is trained
    seed=1337,
    n_embd=32,
    n_head=2,
    attn_window=2,            # every layer's attention window (0: full)
    loops=10,                 # parity: the fixed schedule's (R P) pairs, and the training schedule's
    init_state="random",
    state_noise=0.0,
    backprop_steps=0,
    steps=1500,               # training steps of the blocks
    batch_size=64,
    learning_rate=2e-3,
    # parity: the probe
    max_length=8,
    imitation_steps=150,
    rl_steps=400,
    rl_learning_rate=3e-3,
    rl_batch=128,
    step_cost=0.0,            # > 0: reward correct - step_cost x blocks instead of note 004's correct / blocks
    max_steps=32,             # the probe's cap on blocks per row
    test_problems=512,
    # store
    digits=4,
    phase_steps=3,            # Process blocks per sub-problem
    store_windows=[0, 2],     # the store's gradient windows to compare (0: every step)
    # longterm
    n_facts=4,
    n_names=16,
    retrieve_k=[1, 4],        # tokens retrieved from the long-term store per question (k = n_facts: all)
)

PAD = 3  # parity: after a row's last bit (PARITY_VOCAB is 3)


# ----------------------------------------------------------------------------- parity: probe vs fixed, RL

def parity_rows(n, max_length, gen, lengths=None):
    """Running parity rows of 1..max_length bits (each row's own length, PAD after it): x, y (n, 1 + max_length)
    and the lengths (n,)."""
    x, y = problems.parity_batch(n, max_length, gen)
    if lengths is None:
        lengths = torch.randint(1, max_length + 1, (n,), generator=gen)
    past = torch.arange(max_length + 1)[None] > lengths[:, None]
    return x.masked_fill(past, PAD), y.masked_fill(past, -1), lengths


def model_args(cfg, vocab_size, block_size, n_layer=3):
    return dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=cfg["n_head"],
                n_embd=cfg["n_embd"], dropout=0.0, n_prelude=1, n_core=n_layer - 2, n_coda=1, loops=cfg["loops"],
                attn_windows=[cfg["attn_window"]] * n_layer if cfg["attn_window"] else [])


def thinker_config(cfg, **extra):
    return ThinkerConfig(init_state=cfg["init_state"], state_noise=cfg["state_noise"],
                         backprop_steps=cfg["backprop_steps"], max_steps=cfg["max_steps"], **extra)


def train_blocks(thinker, cfg, loss_of, name):
    """AdamW on loss_of(step) (a training forward's loss); warmup then cosine to a tenth. Returns the optimizer
    and the loss curve."""
    opt = torch.optim.AdamW(thinker.parameters(), lr=cfg["learning_rate"], betas=(0.9, 0.95), weight_decay=0.0)
    curve, t0 = [], time.time()
    for step in range(cfg["steps"]):
        progress = math.cos(math.pi * step / cfg["steps"])
        lr = cfg["learning_rate"] * min(1, (step + 1) / 100) * (0.55 + 0.45 * progress)
        for group in opt.param_groups:
            group["lr"] = lr
        thinker.train()
        loss = loss_of(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(thinker.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
        if (step + 1) % max(1, cfg["steps"] // 10) == 0:
            print(f"{name} step {step + 1}/{cfg['steps']}: loss {statistics.mean(curve[-50:]):.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return opt, curve


@torch.no_grad()
def score_parity(thinker, cfg, lengths_to_test):
    """{length: {fixed: {loops: accuracy}, probe: {accuracy, blocks}}} on fresh problems."""
    thinker.eval()
    table = {}
    for length in lengths_to_test:
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + length)
        n = cfg["test_problems"]
        x, y, _ = parity_rows(n, cfg["max_length"], gen, torch.full((n,), length))
        fixed = {}
        for loops in range(1, cfg["loops"] + 1):
            logits = thinker.run(x, looped_schedule(loops))[0]
            fixed[str(loops)] = problems.exact_match(logits, y).float().mean().item()
        s, _, _ = thinker.run_probe(x)
        table[str(length)] = {"fixed": fixed, "probe": {
            "accuracy": problems.exact_match(s.logits, y).float().mean().item(),
            "blocks": s.steps.float().mean().item()}}
        print(f"  length {length}: fixed {' '.join(f'{v:.2f}' for v in fixed.values())} | probe "
              f"{table[str(length)]['probe']}", flush=True)
    return table


def train_probe(thinker, cfg, gen):
    """Imitation of (R P) x loops O S, then REINFORCE (reward correct / blocks, or correct - step_cost x blocks;
    a running-mean baseline).
    Returns the RL curve: per logged step mean reward, mean blocks, accuracy."""
    opt = torch.optim.Adam(thinker.probe.parameters(), lr=cfg["rl_learning_rate"])
    teacher = looped_schedule(cfg["loops"])
    for step in range(cfg["imitation_steps"]):
        x, _, _ = parity_rows(cfg["rl_batch"], cfg["max_length"], gen)
        _, _, loss = thinker.train().run_probe(x, teacher=teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == cfg["imitation_steps"] - 1:
            print(f"imitation: cross-entropy {loss.item():.4f}", flush=True)
    baseline, curve = None, []
    for step in range(cfg["rl_steps"]):
        x, y, lengths = parity_rows(cfg["rl_batch"], cfg["max_length"], gen)
        thinker.eval()  # the blocks as trained (no noise); the probe samples its choices
        s, logp, _ = thinker.run_probe(x, sample=True)
        correct = problems.exact_match(s.logits, y)
        reward_mean = th1nker.step_reward(correct, s.steps, cfg["step_cost"]).mean().item()
        baseline = reward_mean if baseline is None else 0.9 * baseline + 0.1 * reward_mean
        loss, reward = th1nker.reinforce_loss(logp, correct, s.steps, baseline, cfg["step_cost"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append({"step": step, "reward": reward.mean().item(), "blocks": s.steps.float().mean().item(),
                      "accuracy": correct.float().mean().item()})
        if (step + 1) % max(1, cfg["rl_steps"] // 10) == 0:
            last = curve[-20:]
            print(f"rl step {step + 1}: reward {statistics.mean(c['reward'] for c in last):.4f} blocks "
                  f"{statistics.mean(c['blocks'] for c in last):.1f} acc "
                  f"{statistics.mean(c['accuracy'] for c in last):.2f}", flush=True)
    return curve


def run_parity(cfg):
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    args = model_args(cfg, vocab_size=4, block_size=cfg["max_length"] + 1)
    thinker = Th1nker(args, thinker_config(cfg))
    schedule = looped_schedule(cfg["loops"], output_every=True)

    def loss_of(step):
        x, y, _ = parity_rows(cfg["batch_size"], cfg["max_length"], gen)
        return thinker.run(x, schedule, y)[1]
    opt, loss_curve = train_blocks(thinker, cfg, loss_of, "blocks")
    lengths = list(range(1, cfg["max_length"] + 1))
    print("after imitation:", flush=True)
    rl_gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    imitation_cfg = cfg | {"rl_steps": 0}
    train_probe(thinker, imitation_cfg, rl_gen)
    imitated = score_parity(thinker, cfg, lengths)
    rl_curve = train_probe(thinker, cfg | {"imitation_steps": 0}, rl_gen)
    print("after RL:", flush=True)
    table = score_parity(thinker, cfg, lengths)
    th1nker.save_thinker(os.path.join(cfg["out_dir"], "th1nker.pt"), thinker, args,
                         {"tokenizer": "char", "chars": "01^."}, opt, step=cfg["steps"])
    return {"loss_curve": loss_curve[::10], "imitated": imitated, "scores": table, "rl_curve": rl_curve,
            "summary": parity_summary(table, cfg["loops"])}


def parity_summary(table, loops):
    """Headline: the probe's accuracy and blocks over every length against the fixed schedule's."""
    fixed_blocks = 2 * loops + 1
    fixed = statistics.mean(row["fixed"][str(loops)] for row in table.values())
    probe = statistics.mean(row["probe"]["accuracy"] for row in table.values())
    blocks = statistics.mean(row["probe"]["blocks"] for row in table.values())
    # the fixed schedule given about the probe's mean blocks: is the probe better than simply thinking less?
    matched = min(loops, max(1, round((blocks - 1) / 2)))
    return {"fixed_accuracy": fixed, "fixed_blocks": fixed_blocks, "probe_accuracy": probe, "probe_blocks": blocks,
            "blocks_ratio": blocks / fixed_blocks, "matched_fixed_loops": matched,
            "matched_fixed_accuracy": statistics.mean(row["fixed"][str(matched)] for row in table.values())}


# ----------------------------------------------------------------------------- medium-term memory

def digit_pairs(n, digits, gen):
    """Two digit strings a, b (n, digits) and the answer a + b (0-18) at each position. Not mod 10: then b
    alone says nothing and the loss gave no signal to start from (300 steps at chance, seed 1); a + b lets a
    model that reads only b learn its half, and only one that recalls a gets the rest."""
    a = torch.randint(0, 10, (n, digits), generator=gen)
    b = torch.randint(0, 10, (n, digits), generator=gen)
    return a, b, a + b


def two_phases(thinker, a, b, y, phase_steps, last):
    """Read a and think; a context switch (a fresh latent: it cannot carry a); read b and think; then `last`
    (L: read the latent store, P: one more Process) and Output. Returns (logits, loss)."""
    s = thinker.start(a)
    for block in "R" + "P" * phase_steps:
        thinker.step(s, block)
    s.idx, s.latent = b, thinker.start(b).latent
    for block in "R" + "P" * phase_steps + last + "O":
        thinker.step(s, block)
    loss = torch.nn.functional.cross_entropy(s.outputs[-1].flatten(0, 1), y.flatten())
    return s.logits, loss


def run_store(cfg):
    """With the store at each gradient window, and without it: token and exact-match accuracy, and the bytes
    autograd keeps for backward in one training forward."""
    variants = {f"store, window {w or 'all'}": w for w in cfg["store_windows"]} | {"no store": None}
    results = {}
    for name, window in variants.items():
        torch.manual_seed(cfg["seed"])
        gen = torch.Generator().manual_seed(cfg["seed"])
        thinker = Th1nker(model_args(cfg, vocab_size=19, block_size=cfg["digits"]),
                          thinker_config(cfg, store=window is not None, store_window=window or 0))
        last = "P" if window is None else "L"

        def loss_of(step):
            a, b, y = digit_pairs(cfg["batch_size"], cfg["digits"], gen)
            return two_phases(thinker, a, b, y, cfg["phase_steps"], last)[1]
        _, curve = train_blocks(thinker, cfg, loss_of, name)
        thinker.train()
        _, saved = th1nker.activation_bytes(lambda: loss_of(-1))
        thinker.eval()
        a, b, y = digit_pairs(cfg["test_problems"], cfg["digits"], torch.Generator().manual_seed(cfg["seed"] + 99))
        with torch.no_grad():
            logits, _ = two_phases(thinker, a, b, y, cfg["phase_steps"], last)
        results[name] = {"token_accuracy": (logits.argmax(-1) == y).float().mean().item(),
                         "exact_match": (logits.argmax(-1) == y).all(1).float().mean().item(),
                         "saved_bytes": saved, "loss_curve": curve[::10]}
        print(f"{name}: {results[name]['token_accuracy']:.3f} per digit, {results[name]['exact_match']:.3f} exact, "
              f"{saved / 1e6:.2f} MB kept for backward", flush=True)
    summary = {f"{name}: {key}": r[key] for name, r in results.items()
               for key in ("token_accuracy", "exact_match", "saved_bytes")}
    return {"variants": results, "summary": summary}


# ----------------------------------------------------------------------------- long-term memory

def facts_vocab(n_names):
    """Digits 0-9, the names, '?' and MEM (the compressed signal token's position)."""
    return {"names": 10, "query": 10 + n_names, "mem": 11 + n_names, "size": 12 + n_names}


def fact_episodes(n, n_facts, n_names, gen):
    """n episodes of n_facts facts: names (n, F) distinct, values (n, F), and which fact is asked (n,)."""
    names = torch.stack([torch.randperm(n_names, generator=gen)[:n_facts] for _ in range(n)]) + 10
    values = torch.randint(0, 10, (n, n_facts), generator=gen)
    asked = torch.randint(0, n_facts, (n,), generator=gen)
    return names, values, asked


def compress_facts(thinker, names, values, vocab):
    """Run 1: each fact `name value MEM` read and processed (R P P) into one memory token: (n, F, C)."""
    n, f = names.shape
    sections = torch.stack((names, values, torch.full_like(names, vocab["mem"])), -1).view(n * f, 3)
    return th1nker.compress(thinker, sections, "RPP").view(n, f, -1)


def ask(thinker, names, asked, vocab, memory=None, retrieve=None):
    """Run 2: `? name`, R P, then read the memory (M: every token given, or the k that retrieve(query) finds),
    P, O. Returns the logits at the question's end (n, V)."""
    question = torch.stack((torch.full_like(asked, vocab["query"]), names.gather(1, asked[:, None])[:, 0]), 1)
    s = thinker.start(question)
    for block in "RP":
        thinker.step(s, block)
    if retrieve is not None:
        memory = retrieve(thinker.read_memory.q(th1nker.norm(s.latent[:, -1])))
    s.memory = memory
    for block in "MPO":
        thinker.step(s, block)
    return s.outputs[-1][:, -1]


def in_context(thinker, names, values, asked, vocab, with_facts):
    """The baselines: the facts and the question in one sequence (or the question alone), R P P P O."""
    question = torch.stack((torch.full_like(asked, vocab["query"]), names.gather(1, asked[:, None])[:, 0]), 1)
    x = torch.cat((torch.stack((names, values), -1).flatten(1), question), 1) if with_facts else question
    return thinker.run(x, "RPPPO")[2].outputs[-1][:, -1]


def store_across_runs(thinker, names, values, asked, vocab, k, path):
    """Run 1 writes each episode's memory tokens to its own long-term store, saved to disk; run 2 loads the
    stores and answers each episode's question from the k retrieved tokens. Returns logits (n, V)."""
    tokens = compress_facts(thinker, names, values, vocab)  # (n, F, C)
    keys = thinker.read_memory.k(th1nker.norm(tokens))  # retrieval compares the ReadMemory block's own keys
    stores = []
    for i in range(tokens.size(0)):
        memory = th1nker.LongTermMemory(keys.size(-1), tokens.size(-1), capacity=names.size(1))
        memory.write(keys[i], tokens[i])
        stores.append(memory.state_dict())
    torch.save(stores, path)
    del tokens, keys, stores  # run 2 starts from the file only
    logits = []
    for i, state in enumerate(torch.load(path)):
        memory = th1nker.LongTermMemory(state["keys"].size(1), state["values"].size(1))
        memory.load_state_dict(state)
        logits.append(ask(thinker, names[i:i + 1], asked[i:i + 1], vocab, retrieve=lambda q: memory.retrieve(q, k)))
    return torch.cat(logits)


def run_longterm(cfg):
    vocab = facts_vocab(cfg["n_names"])
    F_, results = cfg["n_facts"], {}
    answers = {}
    for name in ("long-term memory", "facts in context", "no memory"):
        torch.manual_seed(cfg["seed"])
        gen = torch.Generator().manual_seed(cfg["seed"])
        block = 2 * F_ + 2
        thinker = Th1nker(model_args(cfg, vocab["size"], block), thinker_config(cfg, memory=name == "long-term memory"))

        def answer(names, values, asked):
            if name == "long-term memory":
                return ask(thinker, names, asked, vocab, memory=compress_facts(thinker, names, values, vocab))
            return in_context(thinker, names, values, asked, vocab, with_facts=name == "facts in context")

        def loss_of(step):
            names, values, asked = fact_episodes(cfg["batch_size"], F_, cfg["n_names"], gen)
            target = values.gather(1, asked[:, None])[:, 0]
            return torch.nn.functional.cross_entropy(answer(names, values, asked), target)
        _, curve = train_blocks(thinker, cfg, loss_of, name)
        thinker.eval()
        names, values, asked = fact_episodes(cfg["test_problems"], F_, cfg["n_names"],
                                             torch.Generator().manual_seed(cfg["seed"] + 99))
        target = values.gather(1, asked[:, None])[:, 0]
        with torch.no_grad():
            results[name] = (answer(names, values, asked).argmax(-1) == target).float().mean().item()
            if name == "long-term memory":
                for k in cfg["retrieve_k"]:
                    path = os.path.join(cfg["out_dir"], "longterm_stores.pt")
                    logits = store_across_runs(thinker, names, values, asked, vocab, k, path)
                    results[f"long-term store across runs, top-{k}"] = \
                        (logits.argmax(-1) == target).float().mean().item()
        answers[name] = curve[::10]
        print({k: round(v, 3) for k, v in results.items()}, flush=True)
    C = cfg["n_embd"]
    bits = {"stored_bits_per_token": 32 * C, "fact_bits": math.log2(cfg["n_names"]) + math.log2(10)}
    return {"accuracy": results, "loss_curves": answers, "bits": bits, "summary": results | bits}


# ----------------------------------------------------------------------------- the plot, several seeds

def plot_parity(result, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = result["runs"]
    loops = result["config"]["loops"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, (seed, run) in enumerate(runs.items()):
        color = f"C{i}"
        lengths = [int(k) for k in run["scores"]]
        axes[0].plot(lengths, [run["scores"][str(n)]["probe"]["blocks"] for n in lengths], marker="o", color=color,
                     label=f"probe after RL, seed {seed}")
        axes[0].plot(lengths, [run["imitated"][str(n)]["probe"]["blocks"] for n in lengths], linestyle=":",
                     color="grey")
        axes[1].plot(lengths, [run["scores"][str(n)]["probe"]["accuracy"] for n in lengths], marker="o",
                     color=color, label=f"probe, seed {seed}")
        axes[1].plot(lengths, [run["scores"][str(n)]["fixed"][str(loops)] for n in lengths], linestyle="--",
                     color=color, label=f"fixed {2 * loops + 1} blocks, seed {seed}")
        axes[1].plot(lengths, [run["scores"][str(n)]["fixed"]["1"] for n in lengths], linestyle=":", color=color,
                     label=f"fixed 3 blocks (R P O), seed {seed}")
        steps = [c["step"] for c in run["rl_curve"]]
        smooth = [statistics.mean(c["reward"] for c in run["rl_curve"][max(0, i - 19):i + 1]) for i in steps]
        blocks = [statistics.mean(c["blocks"] for c in run["rl_curve"][max(0, i - 19):i + 1]) for i in steps]
        axes[2].plot(steps, smooth, color=color, label=f"reward, seed {seed}")
        twin = axes[2].twinx() if seed == next(iter(runs)) else twin
        twin.plot(steps, blocks, linestyle="--", alpha=0.7, color=color)
    axes[0].axhline(2 * loops + 1, color="black", linewidth=0.8, label="fixed schedule")
    axes[0].set(xlabel="difficulty: bits in the row", ylabel="blocks run per row (grey dotted: after imitation)",
                title="blocks used against difficulty")
    axes[1].set(xlabel="difficulty: bits in the row", ylabel="exact-match accuracy", ylim=(-0.02, 1.02),
                title="accuracy: probe (solid), fixed 17 (dashed) and 3 blocks (dotted)")
    cost = result["config"].get("step_cost", 0.0)
    reward_name = f"correct - {cost:g} x blocks" if cost > 0 else "correct / blocks"
    axes[2].set(xlabel="REINFORCE step", ylabel=f"reward = {reward_name} (solid, 20-step mean)",
                title="RL on steps")
    twin.set_ylabel("mean blocks per row (dashed)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def merge(results):
    """Runs of several seeds in one result, with mean and std of each summary number."""
    runs = {str(r["config"]["seed"]): r["runs"][str(r["config"]["seed"])] for r in results}
    if results[0]["config"]["experiment"] == "parity":  # the summary again from the scores (its newest form)
        for run in runs.values():
            run["summary"] = parity_summary(run["scores"], results[0]["config"]["loops"])
    keys = next(iter(runs.values()))["summary"]
    summary = {k: {"mean": statistics.mean(run["summary"][k] for run in runs.values()),
                   "std": statistics.pstdev(run["summary"][k] for run in runs.values()),
                   "per_seed": [run["summary"][k] for run in runs.values()]} for k in keys}
    return results[0] | {"runs": runs, "summary": summary}


def plot_bars(result, png):
    """Each summary accuracy as a bar (mean over seeds, with every seed's value as a dot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = list(result["runs"].values())
    keys = [k for k in runs[0]["summary"] if "bytes" not in k and "bits" not in k]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys)), 4.8))
    for i, key in enumerate(keys):
        values = [run["summary"][key] for run in runs]
        ax.bar(i, statistics.mean(values), color="tab:blue", alpha=0.6)
        ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(keys)), [k.replace(": ", "\n").replace(", ", ",\n") for k in keys], fontsize=7)
    ax.set_ylabel("accuracy (bar: mean over seeds; dots: each seed)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Th1nker {result['config']['experiment']}: {len(runs)} seed(s)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


PLOTS = {"parity": plot_parity, "store": plot_bars, "longterm": plot_bars}
RUNS = {"parity": run_parity, "store": run_store, "longterm": run_longterm}


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    torch.set_num_threads(1)
    if cfg["merge"]:
        result = merge([json.load(open(path)) for path in cfg["merge"]])
    else:
        if cfg["experiment"] not in RUNS:
            raise SystemExit(f"experiment must be one of {', '.join(RUNS)}, got {cfg['experiment']!r}")
        if cfg["step_cost"] < 0:
            raise SystemExit(f"step_cost must be 0 (reward correct / blocks) or a price per block > 0, "
                             f"got {cfg['step_cost']}")
        random.seed(cfg["seed"])
        t0 = time.time()
        run = RUNS[cfg["experiment"]](cfg)
        run["seconds"] = time.time() - t0
        result = {"config": cfg, "runs": {str(cfg["seed"]): run}, "summary": run["summary"]}
    with open(os.path.join(cfg["out_dir"], "th1nker.json"), "w") as f:
        json.dump(result, f, indent=1)
    PLOTS[result["config"]["experiment"]](result, os.path.join(cfg["out_dir"], "th1nker.png"))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {cfg['out_dir']}/th1nker.json and th1nker.png")


if __name__ == "__main__":
    main(sys.argv[1:])
