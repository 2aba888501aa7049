"""
Does a looped model think longer at test time? Variable chains that need k hops, trained on k <= train_hops.

    nice -n 10 python experiments/loops.py config/loops_chains_cpu.py            # CPU, a few minutes
    python experiments/loops.py config/loops_chains_gpu.py                       # GPU, a few minutes
    python experiments/loops.py config/loops_chains_cpu.py --part=shakespeare    # + shakespeare_char val loss

A problem is n_chains chains of assignments "lhs rhs ;" (rhs a digit or an earlier variable) interleaved at
random, then a query "? v" whose answer is the digit at the root of v's chain (chance: 1 / n_chains). Answering
a chain of k hops needs k dependent lookups: depth, not knowledge. Every statement's rhs is also trained to
predict the value it carries (the value never appears in the input, so it cannot be copied forward).
The targets sit where one lookup is an induction step (Olsson et al. 2022: find the earlier position whose
previous token is my token, read what is there): at rhs `c` the model finds the position after `c`'s own
lhs, where `c`'s value was worked out one lookup earlier. A first version put the targets on the ';' and
'?' instead; the token to match was then one back, every position matched itself, and no model of any
depth learned a single hop in 5000 steps (EXPERIMENTS.md). Training only shows chains of <= train_hops
hops; the test asks up to test_hops.

Three models train on the same batches for the same steps:
  looped   n_prelude + n_core + n_coda distinct layers, the core applied `loops` times (sampled per step)
  params   a plain stack with the same parameters (n_prelude + n_core + n_coda layers)
  compute  a plain stack with the same compute per token at the training loop count
           (n_prelude + n_core * loops + n_coda layers)
Reported: exact-match accuracy per difficulty at each test-time loop count (the plain models have one
depth), written to <out_dir>/loops.json and plotted in <out_dir>/loops.png.
"""
import contextlib
import dataclasses
import json
import os
import random
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from architecture import DEFAULTS as MODEL_DEFAULTS  # noqa: E402
from architecture import build_model  # noqa: E402
from checkpoint import read_json, write_json_atomic  # noqa: E402
from configurator import configure, print_config, settings  # noqa: E402
from looped import LoopConfig  # noqa: E402
from metrics import save_figure  # noqa: E402
from runtime import resolve_device, resolve_dtype  # noqa: E402
from scripts import run_script  # noqa: E402
from training import lr_at as schedule  # noqa: E402

DEFAULTS = dict(
    out_dir="out/loops",
    part="chains",             # chains | shakespeare | both
    device="auto",
    dtype="auto",
    seed=1337,
    # the task
    n_chains=4,                # chains per problem (one asked, the rest distractors), distinct root digits
    n_vars=32,                 # variable names in the vocabulary
    train_hops=4,              # training chains have 1..train_hops hops
    test_hops=12,              # the test asks 1..test_hops hops
    test_problems=500,         # per difficulty
    test_loops=[1, 2, 3, 4, 6, 8, 12, 16, 20],
    # the models
    n_embd=128, n_head=4,
    n_prelude=1, n_core=1, n_coda=1,
    loops=6,                   # the looped model's mean training loop count (the compute baseline's depth)
    loops_sampling="uniform",
    loops_min=2, loops_max=10,
    backprop_loops=0,
    inject="add",
    # True: each training batch shares one hop count h and the looped model runs h + 1 loops, so it is never
    # given more loops than the problem needs and cannot learn to settle early (loops tied to the problem's
    # size, as in Fan et al. 2024 "Looped transformers for length generalization"); the plain models see
    # the same batches
    loops_follow_hops=False,
    models=["looped", "params", "compute"],
    # optimisation
    steps=2000, batch_size=64, learning_rate=2e-3, min_lr=1e-4, warmup_iters=100, weight_decay=0.1,
    # shakespeare_char: val loss of looped against dense at equal params and equal FLOPs (train.py runs
    # of these arguments; run `python prepare.py` first)
    shakespeare_args=["config/loops_shakespeare_char.py"],
    # the models can train in parallel processes (--models='["looped"]' ..., each its own out_dir); then
    # --merge='["a/loops.json", "b/loops.json", ...]' writes their combined summary, JSON and plot to out_dir
    merge=[],
)


# ----------------------------------------------------------------------------- the task

def vocabulary(n_vars):
    """Token ids: digits 0-9, then the variable names, then ';', '?' and the padding."""
    return {"vars": n_vars, "sep": 10 + n_vars, "query": 11 + n_vars, "pad": 12 + n_vars, "size": 13 + n_vars}


def max_statements(cfg):
    """Statements in the longest problem: the query chain at test_hops, every distractor at train_hops."""
    return cfg["test_hops"] + 1 + (cfg["n_chains"] - 1) * (cfg["train_hops"] + 1)


def chain_problem(rng, hops, cfg):
    """(tokens, targets) of one problem whose query needs `hops` lookups; targets are -1 where nothing is asked.

    n_chains chains with distinct root digits: the query's, of `hops` hops, and distractors of 1..train_hops
    hops (the query's training distribution, so nothing but the lookups tells the chains apart). They are
    interleaved in a uniformly random order that keeps each chain's own order (a variable is defined
    before it is used), and left-padded to one length for every difficulty.
    """
    voc = vocabulary(cfg["n_vars"])
    lengths = [hops + 1] + [rng.randint(1, cfg["train_hops"]) + 1 for _ in range(cfg["n_chains"] - 1)]
    names = iter(rng.sample(range(cfg["n_vars"]), sum(lengths)))
    chains = []
    for length, digit in zip(lengths, rng.sample(range(10), cfg["n_chains"])):  # [(lhs, rhs, value)]
        chain = [(next(names), digit, digit)]  # the root assigns a digit
        for _ in range(1, length):
            chain.append((next(names), 10 + chain[-1][0], digit))
        chains.append(chain)
    order = [c for c, chain in enumerate(chains) for _ in chain]
    rng.shuffle(order)
    tokens, targets, taken = [], [], [0] * len(chains)
    for c in order:
        lhs, rhs, value = chains[c][taken[c]]
        taken[c] += 1
        tokens += [10 + lhs, rhs, voc["sep"]]
        targets += [-1, value, -1]  # the rhs predicts the value it gives lhs
    query_var, answer = chains[0][-1][0], chains[0][-1][2]
    tokens += [voc["query"], 10 + query_var]
    targets += [-1, answer]
    pad = 3 * max_statements(cfg) + 2 - len(tokens)
    return [voc["pad"]] * pad + tokens, [-1] * pad + targets


def chain_batch(rng, batch_size, hops, cfg, device):
    """x, y (B, T): hops is an int, or a (lo, hi) range drawn per problem."""
    rows = [chain_problem(rng, hops if isinstance(hops, int) else rng.randint(*hops), cfg) for _ in range(batch_size)]
    x = torch.tensor([r[0] for r in rows], device=device)
    y = torch.tensor([r[1] for r in rows], device=device)
    return x, y


# ----------------------------------------------------------------------------- models

def model_configs(cfg):
    """Model options of each compared model (architecture.build_model's); the looped one first."""
    shape = dict(vocab_size=vocabulary(cfg["n_vars"])["size"], block_size=3 * max_statements(cfg) + 2,
                 n_embd=cfg["n_embd"], n_head=cfg["n_head"], dropout=0.0)
    distinct = cfg["n_prelude"] + cfg["n_core"] + cfg["n_coda"]
    configs = {
        "looped": dict(**shape, n_layer=distinct, n_prelude=cfg["n_prelude"], n_core=cfg["n_core"],
                       n_coda=cfg["n_coda"], loops=cfg["loops"], loops_sampling=cfg["loops_sampling"],
                       loops_min=cfg["loops_min"], loops_max=cfg["loops_max"],
                       backprop_loops=cfg["backprop_loops"], inject=cfg["inject"]),
        "params": dict(**shape, n_layer=distinct),
        "compute": dict(**shape, n_layer=cfg["n_prelude"] + cfg["n_core"] * cfg["loops"] + cfg["n_coda"]),
    }
    unknown = set(cfg["models"]) - set(configs)
    if unknown:
        raise SystemExit(f"models must be among {sorted(configs)}, got {sorted(unknown)}")
    return {name: configs[name] for name in cfg["models"]}


def lr_at(step, cfg):
    return schedule(step, cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], cfg["steps"])


def train_chains(name, config, cfg, device, autocast):
    """Train one model on chains of 1..train_hops hops; returns it (eval mode) and its loss curve."""
    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])  # every model sees the same batches
    model = build_model(config).to(device)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (0.9, 0.95), device.type)
    curve = []
    model.train()
    bar = tqdm(range(cfg["steps"]), desc=name, dynamic_ncols=True, mininterval=2)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        hops, loops = (1, cfg["train_hops"]), None
        if cfg["loops_follow_hops"]:
            hops = rng.randint(1, cfg["train_hops"])
            loops = hops + 1 if config.get("n_core") else None
        x, y = chain_batch(rng, cfg["batch_size"], hops, cfg, device)
        with autocast:
            loss = model(x, y, loops=loops)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == cfg["steps"] - 1:
            curve.append({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
    return model.eval(), curve


def test_sets(cfg, device):
    """{hops: (x, y)}: the same test problems for every model and loop count."""
    return {hops: chain_batch(random.Random(10_000 + hops), cfg["test_problems"], hops, cfg, device)
            for hops in range(1, cfg["test_hops"] + 1)}


@torch.no_grad()
def chain_accuracy(model, tests, autocast, loops=None):
    """{hops: exact-match accuracy of the query's answer} on the test sets."""
    accuracy = {}
    for hops, (x, y) in tests.items():
        with autocast:
            logits = model(x, loops=loops)[0][:, -1]  # (B, V) at the asked variable
        accuracy[hops] = (logits.argmax(-1) == y[:, -1]).float().mean().item()
    return accuracy


def run_chains(cfg, device, autocast):
    results, tests = {}, test_sets(cfg, device)
    for name, config in model_configs(cfg).items():
        t0 = time.perf_counter()
        model, curve = train_chains(name, config, cfg, device, autocast)
        loop_counts = cfg["test_loops"] if config.get("n_core") else [None]  # main() adds the training count
        accuracy = {str(n or "fixed"): chain_accuracy(model, tests, autocast, n) for n in loop_counts}
        results[name] = {"params": model.num_params(), "n_layer": config["n_layer"], "accuracy": accuracy,
                         "curve": curve, "train_seconds": time.perf_counter() - t0}
        at_train = accuracy[str(cfg["loops"]) if config.get("n_core") else "fixed"]
        print(f"{name}: {model.num_params():,} params; accuracy by hops "
              + " ".join(f"{h}:{a:.2f}" for h, a in at_train.items()), flush=True)
    return results


def summarize_chains(results, cfg):
    """The issue's targets, read off the results: gains on harder-than-training problems, parity at training."""
    summary = {}
    looped = results.get("looped")
    if looped is None:
        return summary
    at_train = looped["accuracy"][str(cfg["loops"])]
    best_loops = max(cfg["test_loops"])  # a fixed rule (the most loops), not the best on the test set
    at_most = looped["accuracy"][str(best_loops)]
    hard = [h for h in at_train if h > cfg["train_hops"]]
    summary["hard_hops"] = hard
    summary["looped_at_train_loops_hard"] = sum(at_train[h] for h in hard) / len(hard)
    summary[f"looped_at_{best_loops}_loops_hard"] = sum(at_most[h] for h in hard) / len(hard)
    summary["looped_at_train_loops_train_hops"] = sum(at_train[h] for h in at_train if h <= cfg["train_hops"]) / cfg["train_hops"]
    for name in ("params", "compute"):
        if name in results:
            acc = results[name]["accuracy"]["fixed"]
            summary[f"{name}_hard"] = sum(acc[h] for h in hard) / len(hard)
            summary[f"{name}_train_hops"] = sum(acc[h] for h in acc if h <= cfg["train_hops"]) / cfg["train_hops"]
    return summary


def plot_chains(results, cfg, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.cm.viridis([i / max(1, cfg["test_hops"] - 1) for i in range(cfg["test_hops"])])
    hops = list(range(1, cfg["test_hops"] + 1))
    if "looped" in results:
        acc = results["looped"]["accuracy"]
        for h in hops:
            left.plot(cfg["test_loops"], [acc[str(n)][h] for n in cfg["test_loops"]], "-o", ms=3, color=colors[h - 1],
                      label=f"{h} hops" + (" (trained)" if h <= cfg["train_hops"] else ""))
        left.axvline(cfg["loops"], color="gray", ls=":", lw=1)
    for name, style in (("params", "--"), ("compute", ":")):
        if name in results:  # a plain model has one depth: its accuracy is a flat line
            for h in hops:
                left.axhline(results[name]["accuracy"]["fixed"][h], color=colors[h - 1], ls=style, lw=0.8)
    left.set(xlabel="test-time loops (dotted vertical: training mean)", ylabel="exact-match accuracy",
             title="looped model; flat lines: same-params (--) and same-compute (:) plain models", ylim=(0, 1.02))
    left.title.set_fontsize(9)
    left.legend(fontsize=7, ncol=2)
    lines = {}
    if "looped" in results:
        lines[f"looped, {cfg['loops']} loops (training)"] = results["looped"]["accuracy"][str(cfg["loops"])]
        lines[f"looped, {max(cfg['test_loops'])} loops"] = results["looped"]["accuracy"][str(max(cfg["test_loops"]))]
    for name in ("params", "compute"):
        if name in results:
            lines[f"plain, same {name} ({results[name]['n_layer']} layers)"] = results[name]["accuracy"]["fixed"]
    for label, acc in lines.items():
        right.plot(hops, [acc[h] for h in hops], "-o", ms=3, label=label)
    right.axvspan(0.5, cfg["train_hops"] + 0.5, color="gray", alpha=0.15, lw=0)
    right.set(xlabel="hops (shaded: seen in training)", ylabel="exact-match accuracy", ylim=(0, 1.02),
              title="accuracy against difficulty")
    right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- shakespeare_char

def shakespeare_runs(cfg):
    """train.py overrides of the three shakespeare_char models (over shakespeare_args): looped, plain at equal
    params, at equal FLOPs."""
    base = MODEL_DEFAULTS | settings(cfg["shakespeare_args"]) | {"device": cfg["device"], "seed": cfg["seed"]}
    distinct = base["n_prelude"] + base["n_core"] + base["n_coda"]
    plain = {f.name: f.default for f in dataclasses.fields(LoopConfig)} | {"eval_loops": []}  # every loop option off
    looped = {"device": cfg["device"], "seed": cfg["seed"]}
    return {
        "looped": looped,
        "params": looped | plain | {"n_layer": distinct},
        "flops": looped | plain | {"n_layer": base["n_prelude"] + base["n_core"] * base["loops"] + base["n_coda"]},
    }


def run_shakespeare(cfg):
    """Train the three shakespeare_char models; their loss curves go to <out_dir>/shakespeare.png."""
    from metrics import plot_runs
    results = {}
    for name, overrides in shakespeare_runs(cfg).items():
        out_dir = os.path.join(cfg["out_dir"], f"shakespeare_{name}")
        if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            raise SystemExit(f"{out_dir} already holds a run: pick another --out_dir or remove it")
        print(f"shakespeare_char {name}: {overrides}")
        run_script("train.py", overrides | {"out_dir": out_dir}, args=cfg["shakespeare_args"])
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            evals = [row for row in map(json.loads, f) if "val_loss" in row]
        with open(os.path.join(out_dir, "config.json")) as f:
            n_layer = json.load(f)["n_layer"]
        results[name] = {"val_loss": evals[-1]["val_loss"], "last_eval": evals[-1], "n_layer": n_layer,
                         "train_time": evals[-1]["train_time"]}
    plot_runs([os.path.join(cfg["out_dir"], f"shakespeare_{name}") for name in results],
              os.path.join(cfg["out_dir"], "shakespeare.png"))
    return results


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    if cfg["part"] not in ("chains", "shakespeare", "both"):
        raise SystemExit(f"part must be chains, shakespeare or both, got {cfg['part']!r}")
    if not 1 <= cfg["train_hops"] < cfg["test_hops"] or not 2 <= cfg["n_chains"] <= 10:
        raise SystemExit("need 1 <= train_hops < test_hops and 2 <= n_chains <= 10 (chains have distinct root digits)")
    if max_statements(cfg) > cfg["n_vars"]:
        raise SystemExit(f"the longest problem has {max_statements(cfg)} statements, each defining a new variable: "
                         f"raise n_vars to at least that")
    cfg["test_loops"] = sorted(set(cfg["test_loops"]) | {cfg["loops"]})
    device = resolve_device(cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    os.makedirs(cfg["out_dir"], exist_ok=True)
    out = {"config": cfg, "command": "python experiments/loops.py " + " ".join(argv), "device": str(device),
           "dtype": dtype, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    json_path = os.path.join(cfg["out_dir"], "loops.json")
    if cfg["merge"]:
        out["merged_from"], out["chains"] = cfg["merge"], {}
        for path in cfg["merge"]:
            for name, r in read_json(path, "rerun that part, or leave it out of --merge")["chains"].items():
                # JSON keeps the hop counts as strings: back to ints, as run_chains makes them
                r["accuracy"] = {n: {int(h): a for h, a in acc.items()} for n, acc in r["accuracy"].items()}
                out["chains"][name] = r
        out["chains_summary"] = summarize_chains(out["chains"], cfg)
        print(json.dumps(out["chains_summary"], indent=1))
        plot_chains(out["chains"], cfg, os.path.join(cfg["out_dir"], "loops.png"))
        write_json_atomic(json_path, out)
        print(f"wrote {json_path}")
        return
    if cfg["part"] in ("chains", "both"):
        out["chains"] = run_chains(cfg, device, autocast)
        out["chains_summary"] = summarize_chains(out["chains"], cfg)
        print(json.dumps(out["chains_summary"], indent=1))
        plot_chains(out["chains"], cfg, os.path.join(cfg["out_dir"], "loops.png"))
        write_json_atomic(json_path, out)
    if cfg["part"] in ("shakespeare", "both"):
        out["shakespeare"] = run_shakespeare(cfg)
        for name, r in out["shakespeare"].items():
            print(f"shakespeare_char {name:8s} {r['n_layer']} layers: val {r['val_loss']:.4f} ({r['train_time']:.0f} s)")
        write_json_atomic(json_path, out)
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
