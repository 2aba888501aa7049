"""
What do the evaluation instruments cost? training.estimate_loss with loss-by-position and the token-probability
watch on, against it off, on the same model and batches (target: <= 1.2x).

    python experiments/instrument_overhead.py --out=out/instrument_overhead.json                   # CPU, cpu_quick shape
    python experiments/instrument_overhead.py --device=cuda --n_layer=6 --n_head=6 --n_embd=384 \\
        --block_size=256 --batch_size=64 --eval_iters=100 --out=out/instrument_overhead_gpu.json

Alternates plain and instrumented evaluations `repeats` times and reports the median seconds of each.
"""
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from data import open_dataset  # noqa: E402
from instruments import EvalInstruments, unigram  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from training import estimate_loss  # noqa: E402
from runtime import resolve_device  # noqa: E402

DEFAULTS = dict(
    out="out/instrument_overhead.json",
    dataset="shakespeare_char", data_dir="data",
    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, eval_iters=20,  # config/cpu_quick.py's eval
    position_buckets=32,
    repeats=5,
    device="cpu",
)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    device = resolve_device(cfg["device"])
    meta = open_dataset(cfg["data_dir"], cfg["dataset"], cfg["block_size"])
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"])).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    instruments = EvalInstruments(cfg["block_size"], cfg["position_buckets"], True, True, unigram(meta))
    args = (model, meta, cfg["batch_size"], cfg["block_size"], cfg["eval_iters"], device, autocast)

    def timed(inst):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        estimate_loss(*args, instruments=inst)
        if inst is not None:
            inst.summary()  # the metrics are read every evaluation, so their host sync counts
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    timed(None), timed(instruments)  # warm-up
    plain, instrumented = [], []
    for _ in range(cfg["repeats"]):
        plain.append(timed(None))
        instrumented.append(timed(instruments))
    result = {"config": cfg, "device": str(device), "torch": torch.__version__, "plain_s": statistics.median(plain),
              "instrumented_s": statistics.median(instrumented), "all_plain_s": plain, "all_instrumented_s": instrumented}
    result["ratio"] = result["instrumented_s"] / result["plain_s"]
    write_json_atomic(cfg["out"], result)
    print(f"eval without instruments {result['plain_s']:.3f} s, with {result['instrumented_s']:.3f} s: {result['ratio']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
