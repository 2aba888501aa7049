"""
Sample from a trained µLM, streaming tokens to stdout as they come.

    python sample.py --out_dir=out/shakespeare_char --start="ROMEO:" --num_samples=2
    python sample.py --out_dir=out/run --ckpt=best --start=FILE:prompt.txt --temperature=0.7 --top_p=0.9
"""
import codecs
import os
import sys
import time

import torch

from checkpoint import knn_store_dir, load_checkpoint, load_model
from configurator import configure
from generation import check_runs, check_sampling_args, host_tokens
from looped import LoopedGPT
from tokenizer import tokenizer_from_meta
from runtime import resolve_device, set_threads

DEFAULTS = dict(
    out_dir="out/run",
    ckpt="ckpt",            # ckpt (latest) | best (lowest val loss) | a path to a .pt file
    start="\n",             # the prompt, or FILE:path to read it from a file
    num_samples=1,
    max_new_tokens=500,
    temperature=0.8,        # 0 = greedy
    top_k=200,              # sample from the k likeliest tokens; None disables
    top_p=1.0,              # nucleus sampling; 1.0 disables
    seed=1337,
    device="auto",
    threads=0,              # torch CPU threads; 0: the cores the load average leaves idle (runtime.set_threads)
    use_cache=True,         # the KV cache; False recomputes the whole context each token
    compile=False,          # compile the cached decode step (inductor: seconds to a minute, once; long samples);
                            # on a CPU, int8 exports' fast path
    graph=True,             # on a GPU, replay the cached decode step as one CUDA graph per token; False launches
                            # its kernels one by one (the path before BENCHMARKS.md's round three)
    stop_at_eot=True,       # end a sample at the end-of-text token
    knn_store="",           # kNN memory models: a store folder to run with; "" uses the one beside the checkpoint
    loops=0,                # looped models: test-time loop count (think longer per token); 0 = the trained count
    halt=False,             # looped models with a halting probe: each token loops until the probe is sure, at most
                            # --loops (0: 4x the trained count); needs --use_cache=False
)


def checkpoint_path(out_dir, ckpt):
    if ckpt in ("ckpt", "best"):
        return os.path.join(out_dir, f"{ckpt}.pt")
    return ckpt


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        if not os.path.isfile(path):
            what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
            raise SystemExit(f"prompt file {path} {what}: --start=FILE:path names a text file")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as e:
            raise SystemExit(f"prompt file {path} is not UTF-8 text (bad byte at offset {e.start})")
    return start


def describe(state, path):
    """One line on what a checkpoint of any kind is: its kind, and its step and val loss where it has them."""
    parts = [f"{state.get('kind', 'train')} checkpoint {path}"]
    if state.get("step") is not None:
        parts.append(f"step {state['step']}")
    if state.get("val_loss") is not None:
        parts.append(f"val loss {state['val_loss']:.4f}")
    return ", ".join(parts)


def stream_sample(model, tokenizer, prompt_ids, cfg, device, out=sys.stdout, loops_used=None):
    """Write one sample to `out` as it is generated; returns (new token ids, seconds). With --halt, the loops
    each token took are appended to loops_used."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # BPE tokens can split a character
    new_ids, t0 = [], time.perf_counter()
    stream = model.generate_stream(idx, cfg["max_new_tokens"], temperature=cfg["temperature"],
                                   top_k=cfg["top_k"], top_p=cfg["top_p"], seed=cfg["seed"],
                                   stop_token=tokenizer.eot if cfg["stop_at_eot"] else None,
                                   use_cache=cfg["use_cache"], compile=cfg["compile"],
                                   graph=None if cfg["graph"] else False,  # None: where it can (a GPU)
                                   loops=cfg["loops"] or None, halt=True if cfg.get("halt") else None)
    # a GPU's tokens are read a few steps behind it, so it never waits for the printing; --halt reads each
    # step's loop count as it happens, so it reads each token at once
    for row in host_tokens(stream, lag=0 if loops_used is not None else 8):
        if loops_used is not None:
            loops_used.append(int(model.loops_used[0]))
        token_id = row[0]
        if cfg["stop_at_eot"] and token_id == tokenizer.eot:
            break
        new_ids.append(token_id)
        out.write(decoder.decode(tokenizer.decode_bytes([token_id])))
        out.flush()
    out.write(decoder.decode(b"", final=True))
    return new_ids, time.perf_counter() - t0


def main(argv):
    cfg = configure(DEFAULTS, argv, optional=("top_k",))
    try:
        check_sampling_args(cfg["temperature"], cfg["top_k"], cfg["top_p"])
    except ValueError as e:
        raise SystemExit(str(e))
    if cfg["num_samples"] < 1 or cfg["max_new_tokens"] < 1:
        raise SystemExit("num_samples and max_new_tokens must be at least 1")
    prompt = read_prompt(cfg["start"])
    device = resolve_device(cfg["device"])
    threads = set_threads(cfg["threads"])
    path = checkpoint_path(cfg["out_dir"], cfg["ckpt"])
    state = load_checkpoint(path, map_location=device)
    if "tokenizer" not in state:
        raise SystemExit(f"{path} records no tokenizer, so its token ids cannot be turned into text")
    model = load_model(state, device, knn_store=cfg["knn_store"] or knn_store_dir(path))
    try:
        check_runs(model)
    except ValueError as e:
        raise SystemExit(f"{path}: {e}")
    tokenizer = tokenizer_from_meta(state["tokenizer"])
    looped = isinstance(model, LoopedGPT)
    if cfg["loops"] and not looped:
        raise SystemExit(f"--loops={cfg['loops']} needs a looped model; {path} has no looped core (n_core=0)")
    if cfg["loops"] < 0:
        raise SystemExit(f"--loops={cfg['loops']} must be >= 1 (or 0 for the trained loop count)")
    if cfg["halt"] and not (looped and model.loop.halt):
        raise SystemExit(f"--halt=True needs a looped model trained with a halting probe (halt=True); {path} has none")
    if cfg["halt"] and cfg["use_cache"]:
        raise SystemExit("--halt=True stops each token's loops early, which works without the KV cache only: "
                         "add --use_cache=False")
    if cfg["halt"] and not cfg["loops"]:
        cfg["loops"] = 4 * model.loop.loops  # the cap on a token's loops
    if looped and model.loop.exit_tol and cfg["use_cache"]:
        raise SystemExit("this model exits loops per token (exit_tol), which works without the KV cache only: "
                         "add --use_cache=False")
    try:
        prompt_ids = tokenizer.encode(prompt) or [tokenizer.eot]  # an empty prompt starts a fresh document
    except ValueError as e:
        raise SystemExit(f"prompt: {e}")
    print(f"{describe(state, path)} on {device} ({threads} CPU thread{'s' if threads > 1 else ''})", file=sys.stderr)
    for i in range(cfg["num_samples"]):
        sys.stdout.write(prompt)
        loops_used = [] if cfg["halt"] else None
        new_ids, seconds = stream_sample(model, tokenizer, prompt_ids, {**cfg, "seed": cfg["seed"] + i}, device,
                                         loops_used=loops_used)
        thought = f", {sum(loops_used) / len(loops_used):.1f} loops per token (at most {cfg['loops']})" \
            if loops_used else ""
        print(f"\n---------- {len(new_ids)} tokens, {len(new_ids) / seconds:.1f} tokens/s{thought}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
