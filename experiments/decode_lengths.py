"""
Cached greedy decoding at a run of different lengths, each call timed whole with its first-call costs: what a
caller of generate (sample.py, world.py, swarm.py; not serve.py, whose batcher keeps one block-sized cache) sees
when one generation asks for 100 new tokens and the next for 300. bench.py's
sample part times the steady state at one length; this times what a new length costs.

    python experiments/decode_lengths.py --out=decode_lengths_after.json
    cd ../old_tree && python ../main/experiments/decode_lengths.py --out=decode_lengths_before.json

It imports model.py from the working directory, so run from another checkout's root it measures that tree
(issue 16's target 4 compared main with the commit before the issue this way); the JSON's "code" names that
tree's commit, and whether its .py files had uncommitted changes. The lengths run twice: the
first pass pays what each new KV cache length costs (on a GPU, a cuDNN attention plan for the eager step), the
second shows the steady state.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime import code_version  # noqa: E402  this script's own: an older measured tree's runtime.py lacks it
sys.path.insert(0, os.getcwd())  # the tree being measured: its model.py, configurator.py and checkpoint.py
import torch  # noqa: E402

from checkpoint import write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

DEFAULTS = dict(
    device="cuda",
    dtype="bfloat16",          # bfloat16 | float16 | float32
    n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,  # gpu_124m's shape, random weights
    batch=1,
    prompt_tokens=16,
    lengths=[100, 200, 300, 400, 500],  # new tokens of each call, in this order, run twice
    out="out/decode_lengths.json",
)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_lengths(model, prompt, lengths):
    """[{new_tokens, seconds, tokens_per_s}] of one greedy eager cached generation per length, in order."""
    calls = []
    for n in lengths:
        sync(prompt.device)
        t0 = time.perf_counter()
        model.generate(prompt, n, temperature=0.0)
        sync(prompt.device)
        dt = time.perf_counter() - t0
        calls.append(dict(new_tokens=n, seconds=dt, tokens_per_s=prompt.size(0) * n / dt))
        print(f"  {n} new tokens: {dt:.3f} s, {prompt.size(0) * n / dt:.1f} tokens/s", flush=True)
    return calls


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    device = torch.device(cfg["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device=cpu (and --dtype=float32)")
    if cfg["dtype"] not in ("bfloat16", "float16", "float32"):
        raise SystemExit(f"dtype must be bfloat16, float16 or float32, got {cfg['dtype']!r}")
    torch.manual_seed(0)
    shape = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    with device:
        model = GPT(GPTConfig(**shape, dropout=0.0)).eval()
    model = model.to(getattr(torch, cfg["dtype"]))
    prompt = torch.randint(cfg["vocab_size"], (cfg["batch"], cfg["prompt_tokens"]), device=device)
    model.generate(prompt, 2, temperature=0.0)  # the device's one-time start (context, library handles)
    first, second = time_lengths(model, prompt, cfg["lengths"]), time_lengths(model, prompt, cfg["lengths"])
    # the commit of the checkout whose model.py ran (a tree copied without its .git has none: say so)
    result = dict(config=cfg, tree=os.getcwd(), code=code_version(sys.modules[GPT.__module__].__file__),
                  torch=torch.__version__,
                  device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  first_pass=first, second_pass=second,
                  first_pass_s=sum(c["seconds"] for c in first), second_pass_s=sum(c["seconds"] for c in second))
    os.makedirs(os.path.dirname(cfg["out"]) or ".", exist_ok=True)
    write_json_atomic(cfg["out"], result)
    print(f"first pass {result['first_pass_s']:.3f} s, second pass {result['second_pass_s']:.3f} s -> {cfg['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
