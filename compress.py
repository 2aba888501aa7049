"""
Shrink a trained µLM: an inference export (float, int8 or int4 weights), or pruning then retraining.

    python compress.py --ckpt=out/cpu_quick/ckpt.pt --format=int8                # -> out/cpu_quick/ckpt_int8.pt
    python compress.py --ckpt=out/run/ckpt.pt --format=int4 --group_size=128 --out=model_int4.pt
    python sample.py --ckpt=out/cpu_quick/ckpt_int8.pt --start="ROMEO:"
    python compress.py --ckpt=out/cpu_quick/ckpt.pt --format=hf                  # -> out/cpu_quick/ckpt_hf/ (transformers)
    python compress.py --mode=prune --ckpt=out/cpu_quick/ckpt.pt --method=magnitude --sparsity=0.5 \\
        --out_dir=out/pruned50                                                   # then retrain it:
    python train.py config/cpu_quick.py --init_from=resume --out_dir=out/pruned50 --max_iters=100

export: a file with only what inference needs (weights in the chosen format, model args, tokenizer),
written atomically; checkpoint.load_model and sample.py read it. int8 is per output channel, int4 per
group of group_size input columns (the blocks' linear layers; embedding, head and product-key values
stay int8). prune: magnitude (each matrix's smallest weights, to the target sparsity), structured
(whole heads and MLP neurons with the smallest weight norms: they are removed, the model gets
smaller) or 2:4 (two of every four consecutive weights, what the H100's sparse tensor cores run). The
pruned checkpoint is a train.py checkpoint at step 0 with a fresh optimizer: train.py resumes it with
the masks kept fixed. hf: a folder transformers loads (hf_export.py: safetensors, config, tokenizer,
modeling code, model card), checked against µLM's logits before it is renamed into place. Each other
command ends with a report: size, val loss and tokens/s before and after, and the peak memory to load
each file and generate (measured in a fresh process).
"""
import json
import os
import resource
import shlex
import subprocess
import sys
import time

import torch
import torch.nn as nn

from checkpoint import load_checkpoint, load_model, save_checkpoint, write_json_atomic
from configurator import configure, print_config
from data import get_batch, open_dataset
from generation import decode_speed
from looped import LoopedGPT
from model import MLP
from runtime import claim_out_dir, progress, resolve_device, resolve_dtype, set_threads
from shrink import INT4_GROUP_SIZES, quantize_model, two_four_mask
from training import make_optimizers

DEFAULTS = dict(
    mode="export",          # export | prune | measure (one file's load + generate memory, speed and loss, as JSON)
    ckpt="out/run/ckpt.pt",  # the source checkpoint; never modified
    # export
    format="int8",          # float32 | bfloat16 | int8 | int4 | hf (a Hugging Face folder; float32 unless dtype=bfloat16)
    group_size=128,         # int4: input columns sharing one scale and zero (32, 64, 128 or 256)
    out="",                 # the export file (hf: folder); "" means beside the source: ckpt_int8.pt, ckpt_hf/
    # prune
    method="magnitude",     # magnitude | structured | 2:4
    sparsity=0.5,           # the fraction of the blocks' weights (magnitude), heads and neurons (structured) removed
    out_dir="",             # the run folder that gets the pruned ckpt.pt (must not hold one)
    # measuring
    dtype="auto",           # float weights' dtype: auto (bfloat16 on CUDA, else float32) | float32 | bfloat16
    device="auto",
    threads=0,              # torch CPU threads (both measurements use the same); 0: the cores the load average leaves
                            # idle (runtime.set_threads)
    eval_iters=20,          # val batches for the loss (0 skips it)
    eval_batch_size=16,
    gen_tokens=128,         # greedy tokens generated at batch 1 for tokens/s
    compile=False,          # compile the decode step (CUDA graphs on a GPU; inductor's C++ on a CPU, int8's fast path)
    measure=True,           # measure before/after in fresh processes (False: just write the file)
    report="",              # also write the report as JSON here
)
EVAL_SEED = 1234  # the same val batches as train.py's evaluation


# ----------------------------------------------------------------------------- checks

def check_source(state, path):
    if state.get("kind") == "export":
        fmt = state["quantization"]["format"]
        raise SystemExit(f"{path} is already an inference export ({fmt}); compress the training checkpoint "
                         f"it came from instead (quantizing twice only adds error)")


def check_export_args(cfg, state):
    if cfg["format"] not in ("float32", "bfloat16", "int8", "int4", "hf"):
        raise SystemExit(f"format must be float32, bfloat16, int8, int4 or hf, got {cfg['format']!r}")
    if cfg["format"] != "int4":
        return
    if cfg["group_size"] not in INT4_GROUP_SIZES:
        raise SystemExit(f"group_size must be one of {INT4_GROUP_SIZES} (torch's int4 kernels), got {cfg['group_size']}")
    for name, w in state["model"].items():
        if name.startswith("blocks.") and name.endswith(".weight") and w.dim() == 2 and w.size(1) % cfg["group_size"]:
            raise SystemExit(f"group_size={cfg['group_size']} does not divide {name}'s width {w.size(1)}: "
                             f"pick a group size that divides every layer's input width")
    device = resolve_device(cfg["device"])
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"int4 has no kernel on {device.type}: use --format=int8, or --device=cpu or cuda")


def check_prune_args(cfg, state):
    if cfg["method"] not in ("magnitude", "structured", "2:4"):
        raise SystemExit(f"method must be magnitude, structured or 2:4, got {cfg['method']!r}")
    if not 0 <= cfg["sparsity"] < 1:
        raise SystemExit(f"sparsity must be in [0, 1) (the fraction removed), got {cfg['sparsity']}")
    if not cfg["out_dir"]:
        raise SystemExit("give --out_dir: the run folder for the pruned checkpoint, which train.py then resumes")
    if os.path.exists(os.path.join(cfg["out_dir"], "ckpt.pt")):
        raise SystemExit(f"{cfg['out_dir']} already holds a ckpt.pt; pick a new --out_dir")
    if "optimizer" not in state.get("config", {}):
        raise SystemExit("prune a checkpoint written by train.py (it needs the run's config to retrain)")


# ----------------------------------------------------------------------------- export

def export_state(state, fmt, group_size, dtype):
    """The inference checkpoint dict: weights in fmt, model args, tokenizer, where it came from."""
    model = load_model(state)
    if fmt in ("int8", "int4"):
        quantize_model(model, fmt, group_size, dtype)
    cast = {}  # one cast per tensor, so a tied embedding and head stay one tensor in the file
    weights = {k: cast.setdefault(id(v), v.to(dtype) if v.is_floating_point() else v)
               for k, v in model.state_dict().items() if not k.endswith("weight_mask")}  # masks only matter in training
    config = state.get("config", {})
    return {"model_args": state["model_args"], "model": weights, "tokenizer": state.get("tokenizer"),
            "quantization": {"format": fmt, "group_size": group_size if fmt == "int4" else None},
            "step": state.get("step", 0), "val_loss": state.get("val_loss"),
            "config": {k: config[k] for k in ("dataset", "data_dir") if k in config}}


def export_path(cfg):
    return cfg["out"] or f"{os.path.splitext(cfg['ckpt'])[0]}_{cfg['format']}" + ("" if cfg["format"] == "hf" else ".pt")


def export_hf(cfg, state):
    """--format=hf: a folder transformers loads (hf_export.py); float32 weights unless --dtype=bfloat16."""
    import hf_export  # needs the optional transformers: only imported for this format
    out = export_path(cfg)
    dtype = torch.bfloat16 if cfg["dtype"] == "bfloat16" else torch.float32
    command = shlex.join(["python", "compress.py", f"--ckpt={cfg['ckpt']}", "--format=hf"] +
                         ([f"--out={cfg['out']}"] if cfg["out"] else []) +
                         (["--dtype=bfloat16"] if dtype == torch.bfloat16 else []))
    error = hf_export.export_hf(state, cfg["ckpt"], out, dtype, command)
    print(f"wrote {out}: transformers' logits match µLM's to {error:.1e} (relative). Load it with\n"
          f"  AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)")
    return out


def check_export_out(out, source):
    """An export goes beside training checkpoints, never over one: only an older export may be replaced."""
    if os.path.abspath(out) == os.path.abspath(source):
        raise SystemExit("--out is the source checkpoint; the source is never overwritten: pick another path")
    if os.path.basename(out) in ("ckpt.pt", "best.pt") or os.path.isdir(out):
        raise SystemExit(f"--out={out} is a training run's checkpoint name (or a folder): name the export "
                         f"otherwise, e.g. {os.path.join(os.path.dirname(out), 'model_int8.pt')}")
    if os.path.exists(out):
        try:
            kind = torch.load(out, map_location="cpu", weights_only=True, mmap=True).get("kind")
        except Exception:
            kind = "unreadable"
        if kind != "export":
            raise SystemExit(f"--out={out} already holds a file that is not an export ({kind or 'no kind'}): "
                             f"compress.py replaces only its own exports; pick another --out")


def export(cfg):
    state = load_checkpoint(cfg["ckpt"])
    if cfg["format"] == "hf":
        return export_hf(cfg, state)
    check_source(state, cfg["ckpt"])
    check_export_args(cfg, state)
    # a float format is its dtype; int8/int4 keep their scales (and any float weights) in --dtype
    float_format = cfg["format"] if cfg["format"] in ("float32", "bfloat16") else None
    dtype = getattr(torch, float_format or resolve_dtype(cfg["dtype"], resolve_device(cfg["device"])))
    out = export_path(cfg)
    check_export_out(out, cfg["ckpt"])
    with progress(2, f"export {cfg['format']}", "stage") as bar:
        exported = export_state(state, cfg["format"], cfg["group_size"], dtype)
        bar.update(1)
        save_checkpoint(out, exported, kind="export")
        bar.update(1)
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.2f} MiB)")
    return out


# ----------------------------------------------------------------------------- pruning

def prunable(model):
    """(name, nn.Linear) of the blocks' linear layers: what pruning touches (embedding and head stay dense)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


def magnitude_mask(weight, sparsity):
    """Keep the largest (1 - sparsity) of the weights by magnitude (Han et al. 2015)."""
    keep = weight.numel() - round(sparsity * weight.numel())
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[weight.abs().flatten().topk(keep).indices] = True
    return mask.view_as(weight)


@torch.no_grad()
def mask_model(model, method, sparsity):
    """Zero the pruned weights and attach each layer's mask (a `weight_mask` buffer, saved with the weights)."""
    for _, layer in prunable(model):
        mask = two_four_mask(layer.weight) if method == "2:4" else magnitude_mask(layer.weight, sparsity)
        if hasattr(layer, "weight_mask"):  # pruning a pruned model: the old zeros stay zeros
            mask &= layer.weight_mask
        layer.weight.mul_(mask)
        layer.register_buffer("weight_mask", mask)


def slice_linear(layer, rows=None, cols=None):
    """A smaller nn.Linear holding the given output rows and input columns of layer."""
    w = layer.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.size(1), w.size(0), bias=False, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    return new


def head_scores(attn):
    """Importance of each kv group (a kv head and its query heads): the norm of its output path,
    |V rows| * |c_proj columns| (q and k are RMS-normed, so their weight norms say nothing)."""
    hs, n_kv, group = attn.head_size, attn.n_kv_head, attn.n_head // attn.n_kv_head
    v = attn.kv_proj.weight[n_kv * hs:].view(n_kv, hs, -1).norm(dim=(1, 2))
    out = attn.c_proj.weight.view(-1, n_kv, group * hs).norm(dim=(0, 2))
    return v * out


@torch.no_grad()
def remove_heads(attn, keep):
    """Keep only the kv groups `keep` (sorted indices): q, k, v rows and c_proj columns of the rest go."""
    hs, n_kv, group = attn.head_size, attn.n_kv_head, attn.n_head // attn.n_kv_head
    q_rows = torch.cat([torch.arange(g * group * hs, (g + 1) * group * hs) for g in keep])
    kv_rows = torch.cat([torch.arange(g * hs, (g + 1) * hs) + half * n_kv * hs for half in (0, 1) for g in keep])
    attn.q_proj, attn.c_proj = slice_linear(attn.q_proj, rows=q_rows), slice_linear(attn.c_proj, cols=q_rows)
    attn.kv_proj = slice_linear(attn.kv_proj, rows=kv_rows)
    attn.n_head, attn.n_kv_head = len(keep) * group, len(keep)


def neuron_scores(mlp):
    """|c_fc row|^2 * |c_proj column|: squared ReLU makes a neuron's output scale with its input norm squared."""
    return mlp.c_fc.weight.norm(dim=1) ** 2 * mlp.c_proj.weight.norm(dim=0)


@torch.no_grad()
def remove_neurons(mlp, keep):
    mlp.c_fc, mlp.c_proj = slice_linear(mlp.c_fc, rows=keep), slice_linear(mlp.c_proj, cols=keep)


def structured_prune(model, sparsity):
    """Remove the fraction `sparsity` of each layer's kv groups and MLP neurons, lowest importance first."""
    if isinstance(model, LoopedGPT):
        raise SystemExit("structured pruning of a looped model is not supported (its core blocks share one cache "
                         "layout per loop); use --method=magnitude or 2:4")
    for block in model.blocks:
        for module, scores, remove in ((block.attn, head_scores, remove_heads), (block.ffn, neuron_scores, remove_neurons)):
            if module is block.ffn and not isinstance(module, MLP):
                continue  # memory layers keep their slots
            s = scores(module)
            n_keep = max(1, s.numel() - round(sparsity * s.numel()))
            remove(module, s.topk(n_keep).indices.sort().values)


def pruned_state(state, model, cfg, val_loss):
    """A train.py checkpoint at step 0 with a fresh optimizer for the pruned model: train.py resumes it."""
    train_cfg = {**state["config"], "out_dir": cfg["out_dir"], "init_from": "resume"}
    optimizer, memory_optimizer = make_optimizers(model, train_cfg["weight_decay"], train_cfg["learning_rate"],
                                                  (train_cfg["beta1"], train_cfg["beta2"]), "cpu",
                                                  train_cfg["optimizer"], train_cfg["muon_lr"],
                                                  train_cfg["memory_lr_scale"])
    sampler = torch.Generator().manual_seed(train_cfg["seed"])
    return {"model_args": state["model_args"], "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "memory_optimizer": memory_optimizer.state_dict() if memory_optimizer else None,
            "config": train_cfg, "step": 0, "best_val": float("inf"), "train_time": 0.0, "val_loss": val_loss,
            "rng": {"torch": torch.get_rng_state(), "sampler": sampler.get_state()},
            "tokenizer": state.get("tokenizer"),
            "pruning": {"method": cfg["method"], "sparsity": cfg["sparsity"], "source": cfg["ckpt"]}}


def sparsity_of(model):
    """(zero fraction of the blocks' linear weights, parameters in the blocks)."""
    weights = [m.weight for _, m in prunable(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    return zeros / total, total


def prune(cfg):
    state = load_checkpoint(cfg["ckpt"])
    check_source(state, cfg["ckpt"])
    check_prune_args(cfg, state)
    model = load_model(state)
    _, dense_params = sparsity_of(model)
    with progress(2, f"prune {cfg['method']}", "stage") as bar:
        if cfg["method"] == "structured":
            structured_prune(model, cfg["sparsity"])
        else:
            mask_model(model, cfg["method"], cfg["sparsity"])
        bar.update(1)
        zeros, params = sparsity_of(model)
        loss = val_loss_of(model, state, cfg, torch.device("cpu"))
        path = os.path.join(cfg["out_dir"], "ckpt.pt")
        lock = claim_out_dir(cfg["out_dir"], resuming=True)  # a run starting there meanwhile waits for this one
        try:
            if os.path.exists(path):
                raise SystemExit(f"{cfg['out_dir']} got a ckpt.pt while pruning; pick a new --out_dir")
            save_checkpoint(path, pruned_state(state, model, cfg, loss))
        finally:
            lock.close()
        bar.update(1)
    removed = 1 - params * (1 - zeros) / dense_params
    print(f"wrote {path}: {removed:.1%} of the blocks' weights removed ({params:,} of {dense_params:,} left, "
          f"{zeros:.1%} of those zero); val loss {loss:.4f} before retraining. Retrain with the masks fixed:\n"
          f"  python train.py <its config> --init_from=resume --out_dir={cfg['out_dir']} --max_iters=N")
    return path


# ----------------------------------------------------------------------------- measuring

def peak_rss_gib():
    """This process's peak resident memory: VmHWM on Linux (ru_maxrss would carry the parent's peak across exec)."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**30  # bytes on macOS


@torch.no_grad()
def val_loss_of(model, state, cfg, device):
    """Mean val loss over eval_iters fixed batches of the dataset the model was trained on, or None."""
    config = state.get("config", {})
    block_size = state["model_args"]["block_size"]
    if not cfg["eval_iters"] or not os.path.exists(os.path.join(config.get("data_dir", "data"), config.get("dataset", ""), "meta.json")):
        return None
    meta = open_dataset(config.get("data_dir", "data"), config["dataset"], block_size)
    generator = torch.Generator().manual_seed(EVAL_SEED)
    total = 0.0
    for _ in range(cfg["eval_iters"]):
        x, y = get_batch(meta, "val", cfg["eval_batch_size"], block_size, generator, device)
        total += model(x, y)[1].item()
    return total / cfg["eval_iters"]


def weight_bytes(weights):
    """Bytes of the weights, each shared tensor (a tied embedding and head) counted once, masks not at all."""
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in weights.values() if t.dtype != torch.bool}
    return sum(unique.values())


@torch.no_grad()
def measure(cfg):
    """Load a checkpoint or export, generate gen_tokens greedy tokens at batch 1, then the val loss: a dict."""
    device = resolve_device(cfg["device"])
    dtype = getattr(torch, resolve_dtype(cfg["dtype"], device))
    rss_start = peak_rss_gib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state = load_checkpoint(cfg["ckpt"], map_location=device)
    weights_mib = weight_bytes(state["model"]) / 2**20  # before load_model: an export's weights move into the model
    model = load_model(state, device)
    if state.get("kind") != "export":
        model.to(dtype)
    state.pop("optimizer", None)
    tokens, tokens_per_s = decode_speed(model, cfg["gen_tokens"], cfg["compile"])
    result = {"file": cfg["ckpt"], "file_mib": os.path.getsize(cfg["ckpt"]) / 2**20,
              "weights_mib": weights_mib,
              "format": state.get("quantization", {}).get("format", str(dtype).removeprefix("torch.")),
              "device": str(device), "decode_tokens_per_s": tokens_per_s,
              "peak_rss_gib": peak_rss_gib(), "rss_at_start_gib": rss_start, "tokens": tokens}
    if device.type == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30  # what the device lent
    result["val_loss"] = val_loss_of(model, state, cfg, device)
    return result


def measure_in_subprocess(path, cfg):
    """measure() in a fresh Python, so its peak memory is that file's alone."""
    args = [f"--{k}={cfg[k]}" for k in ("device", "dtype", "threads", "eval_iters", "eval_batch_size", "gen_tokens",
                                        "compile")]
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--mode=measure", f"--ckpt={path}", *args],
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"measuring {path} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def print_report(before, after):
    """The before/after table, and how many greedy tokens agree."""
    rows = [("file MiB", "file_mib", "{:.2f}"), ("weights MiB", "weights_mib", "{:.2f}"),
            ("val loss", "val_loss", "{:.4f}"), ("decode tokens/s", "decode_tokens_per_s", "{:.1f}"),
            ("peak RSS GiB (load+generate)", "peak_rss_gib", "{:.3f}"), ("peak GPU GiB", "peak_gpu_gib", "{:.3f}"),
            ("peak GPU reserved GiB", "peak_gpu_reserved_gib", "{:.3f}")]
    print(f"\n{'':30s} {'before (' + before['format'] + ')':>18s} {'after (' + after['format'] + ')':>18s}")
    for label, key, fmt in rows:
        if key in before:
            cell = [fmt.format(r[key]) if r.get(key) is not None else "-" for r in (before, after)]
            print(f"{label:30s} {cell[0]:>18s} {cell[1]:>18s}")
    agree = next((i for i, (a, b) in enumerate(zip(before["tokens"], after["tokens"])) if a != b), len(before["tokens"]))
    print(f"greedy tokens identical to the source's: the first {agree} of {len(before['tokens'])}")
    print(f"(python started at {before['rss_at_start_gib']:.3f} GiB RSS before loading anything)")
    return agree


def main(argv):
    cfg = configure(DEFAULTS, argv)
    cfg["threads"] = set_threads(cfg["threads"])  # resolved once: the before and after measurements use as many
    if cfg["mode"] == "measure":
        result = measure(cfg)
        if cfg["report"]:
            write_json_atomic(cfg["report"], result)
        print(json.dumps(result))
        return
    print_config(cfg)
    if cfg["mode"] not in ("export", "prune"):
        raise SystemExit(f"mode must be export, prune or measure, got {cfg['mode']!r}")
    out = export(cfg) if cfg["mode"] == "export" else prune(cfg)
    if not cfg["measure"] or (cfg["mode"] == "export" and cfg["format"] == "hf"):  # hf checked its logits already
        return
    before = measure_in_subprocess(cfg["ckpt"], cfg)
    after = measure_in_subprocess(out, cfg)
    agree = print_report(before, after)
    if cfg["report"]:
        write_json_atomic(cfg["report"], {"config": cfg, "before": before, "after": after, "greedy_agree": agree})


if __name__ == "__main__":
    main(sys.argv[1:])
