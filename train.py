"""
Train a µLM, or resume one.

    python train.py config/shakespeare_char.py --max_iters=2000
    python train.py config/shakespeare_char.py --init_from=resume
    torchrun --standalone --nproc_per_node=2 train.py config/gpu_124m.py

The story: config -> data -> model -> optimizer -> loop -> save. Everything lands in out_dir:
config.json, metrics.jsonl, loss.png, ckpt.pt (latest) and best.pt (lowest val loss).
"""
import contextlib
import dataclasses
import functools
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import (knn_store_dir, load_checkpoint, load_knn_stores, load_model, save_checkpoint, save_knn_stores,
                        write_json_atomic)
from configurator import check_ranges, configure, print_config
from data import get_batch, open_dataset
from instruments import EvalInstruments, log_scalars, open_tensorboard, plot_instruments, unigram
from model import GPT, GPTConfig
from noise import InputNoise
from plot import plot_runs
from runtime import (StopRequest, append_jsonl, claim_out_dir, float8_training, read_jsonl, resolve_device,
                     resolve_dtype, truncate_jsonl)
from shrink import apply_masks, fit_to_state_dict, masked_weights

MODEL_KEYS = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]
DEFAULTS = dict(
    # run and data
    out_dir="out/run",
    dataset="shakespeare_char",   # a folder under data_dir made by prepare.py
    data_dir="data",
    init_from="scratch",          # scratch | resume (from out_dir/ckpt.pt)
    overwrite=False,              # a fresh run into an out_dir holding a run moves the old one aside (else: refused)
    eval_interval=250,
    eval_iters=100,
    log_interval=10,
    eval_loops=[],                # looped models: also val loss at these test-time loop counts (val_loss_loops{N})
    # model: every GPTConfig field is a key (vocab_size comes from the dataset)
    **{k: v for k, v in dataclasses.asdict(GPTConfig()).items() if k in MODEL_KEYS},
    # optimization
    batch_size=12,
    gradient_accumulation_steps=1,  # global; divided among DDP processes
    max_iters=5000,
    learning_rate=6e-4,
    min_lr=6e-5,
    schedule="cosine",            # cosine | wsd (warmup, stable, then linear decay over decay_frac)
    warmup_iters=100,
    decay_frac=0.2,
    lr_decay_iters=0,             # the schedule's length; 0 means max_iters
    weight_decay=0.1,
    optimizer="adamw",            # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    muon_lr=0.02,                 # Muon's peak learning rate; the schedule scales it like learning_rate
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,                # 0 disables clipping (sparse memory-value gradients are never clipped)
    memory_lr_scale=10.0,         # memory value tables train at this multiple of the lr (they see few updates per row)
    knn_store="",                 # a saved kNN store folder to run with instead of the one beside the checkpoint
    # distillation: learn from a teacher's logits (KL at a temperature) plus the data loss
    teacher="",                   # a run folder (its ckpt.pt) or a checkpoint path; "" trains on data only
    distill_alpha=0.5,            # loss = (1 - alpha) * data loss + alpha * T^2 * KL(teacher || student)
    distill_temperature=2.0,
    # analysis (noise.py, instruments.py): all off by default
    noise={},                     # input-noise family -> probability, e.g. {"mask": 0.1, "delete": 0.02}; training inputs only
    eval_position_loss=False,     # val loss by position in the context, in position_buckets buckets
    position_buckets=32,
    eval_token_watch=False,       # mean predicted distribution vs the val unigram: KL, entropies, p(correct)
    tensorboard=False,            # also write metrics to out_dir/tensorboard (needs tensorboard installed)
    # system
    device="auto",                # auto | cpu | cuda | cuda:N | mps
    dtype="auto",                 # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16
    compile=False,
    compile_options={},           # Inductor options, e.g. {"triton.cudagraphs": True} (CUDA graphs for the step, as
                                  # mode="reduce-overhead") or {"coordinate_descent_tuning": True}; bench.py's levers
    fp8=False,                    # float8 matmuls through torchao (H100-class GPUs; see BENCHMARKS.md for the gain)
    fp8_head=True,                # with fp8, the tied head/embedding matmul in fp8 too
    seed=1337,
)
EVAL_SEED = 1234  # evaluation draws the same batches every time, so evals compare exactly


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def estimate_loss(model, meta, eval_iters, batch_size, block_size, device, autocast, loops=None,
                  splits=("train", "val"), instruments=None):
    """Mean loss over eval_iters fixed batches of each split (a looped model run at `loops` loops);
    instruments (EvalInstruments) watch val."""
    was_training = model.training
    model.eval()
    losses = {}
    for split in splits:
        generator = torch.Generator().manual_seed(EVAL_SEED)
        total = torch.zeros((), device=device)
        for _ in range(eval_iters):
            x, y = get_batch(meta, split, batch_size, block_size, generator, device)
            with autocast:
                if instruments is not None and split == "val":  # per-token losses and logits for the instruments
                    logits, token_losses = model(x, y, reduction="none", loops=loops)
                    instruments.update(logits, y, token_losses)
                    total += token_losses.mean()
                else:
                    total += model(x, y, loops=loops)[1]
        losses[split] = (total / eval_iters).item()
    model.train(was_training)
    return losses


# ----------------------------------------------------------------------------- distillation

def load_teacher(path, meta, device):
    """The teacher GPT (eval mode, frozen) from a run folder or checkpoint path; its vocab must match the data's."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    state = load_checkpoint(path, map_location=device)
    if state["model_args"]["vocab_size"] != meta["vocab_size"]:
        raise SystemExit(f"teacher {path} has vocab {state['model_args']['vocab_size']} but the dataset has "
                         f"{meta['vocab_size']}: distill on the data the teacher was trained on")
    teacher = load_model(state, device, knn_store=knn_store_dir(path))
    teacher.requires_grad_(False)
    return teacher


def distill_kl(logits, teacher_logits, temperature, vocab_size):
    """T^2 * KL(teacher || student) per token at temperature T (Hinton et al. 2015), over the real vocab."""
    s = (logits[..., :vocab_size].float() / temperature).log_softmax(-1).flatten(0, -2)
    t = (teacher_logits[..., :vocab_size].float() / temperature).log_softmax(-1).flatten(0, -2)
    # T^2 keeps the soft targets' gradient scale independent of T
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def distill_loss(teacher, temperature, alpha, vocab_size, x, logits, loss):
    """The data loss mixed with the KL to the teacher's logits (train_step's `distill`, with the first four bound)."""
    with torch.no_grad():
        teacher_logits = teacher(x)[0]
    return (1 - alpha) * loss + alpha * distill_kl(logits, teacher_logits, temperature, vocab_size)


# ----------------------------------------------------------------------------- schedule

def lr_at(step, cfg):
    """Linear warmup, then cosine decay to min_lr, or (wsd) constant then linear decay at the end."""
    lr, min_lr, warmup = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"]
    total = cfg["lr_decay_iters"] or cfg["max_iters"]
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg["schedule"] == "wsd":
        decay_start = total - int(cfg["decay_frac"] * total)
        if step < decay_start:
            return lr
        return min_lr + (lr - min_lr) * (total - step) / max(1, total - decay_start)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- config checks

CHOICES = {"init_from": ("scratch", "resume"), "optimizer": ("adamw", "muon"), "schedule": ("cosine", "wsd")}
AT_LEAST_ONE = ("batch_size", "eval_interval", "eval_iters", "log_interval", "gradient_accumulation_steps",
                "n_layer", "n_head", "n_embd", "block_size")
NOT_NEGATIVE = ("max_iters", "learning_rate", "min_lr", "muon_lr", "warmup_iters", "lr_decay_iters", "weight_decay",
                "grad_clip", "memory_lr_scale", "n_kv_head")
FRACTIONS = ("decay_frac", "distill_alpha", "beta1", "beta2")  # each in [0, 1]


def check_config(cfg):
    """Every value the loop relies on, checked before anything is read or written: an error names the key."""
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise SystemExit(f"{key} must be {' or '.join(allowed)}, got {cfg[key]!r}")
    check_ranges(cfg, AT_LEAST_ONE, NOT_NEGATIVE, FRACTIONS)
    if not 0 <= cfg["dropout"] < 1:
        raise SystemExit(f"dropout must be in [0, 1), got {cfg['dropout']}")
    if cfg["compile_options"] and not cfg["compile"]:
        raise SystemExit("compile_options are torch.compile's: set compile=True too")
    if cfg["ce_chunks"] and cfg["teacher"]:
        raise SystemExit("ce_chunks (the fused chunked loss) makes no logits for distillation: set ce_chunks=0")
    if cfg["distill_temperature"] <= 0:
        raise SystemExit(f"distill_temperature must be positive, got {cfg['distill_temperature']}")


RESUME_MAY_CHANGE = ("dropout", "checkpoint_activations")  # model keys that shape training, not the weights


def resume_model_args(cfg, state, meta):
    """The model_args a resumed run builds: the checkpoint's, with RESUME_MAY_CHANGE keys from cfg where set.
    A model key is set when it differs from DEFAULTS; a set key that would change the weights' shape, or a
    dataset with another tokenizer, is an error. block_size may shrink (shorter windows, same weights)."""
    model_args = state["model_args"]
    if cfg["block_size"] > model_args["block_size"]:
        raise SystemExit(f"block_size={cfg['block_size']} is larger than the checkpoint model's "
                         f"{model_args['block_size']}")
    saved = {k: model_args.get(k, DEFAULTS[k]) for k in MODEL_KEYS}  # an older checkpoint may lack newer keys
    # layer_heads is the checkpoint's: head growth rewrites it, while the run's config names the starting heads
    set_keys = [k for k in MODEL_KEYS if k not in ("block_size", "layer_heads") and cfg[k] != DEFAULTS[k]
                and cfg[k] != saved[k]]
    changed = [k for k in set_keys if k not in RESUME_MAY_CHANGE]
    if changed:
        raise SystemExit("resuming keeps the checkpoint's model, but you set " +
                         ", ".join(f"{k}={cfg[k]!r} (checkpoint: {saved[k]!r})" for k in changed) +
                         ": drop those keys, or start a fresh run in another --out_dir")
    trained_on = state.get("tokenizer", {})
    ours = {k: meta[k] for k in ("tokenizer", "vocab_size", "eot", "chars") if k in meta}
    if trained_on != ours:
        what = "a different character vocabulary" if trained_on.get("tokenizer") == ours["tokenizer"] == "char" \
            else f"tokenizer {trained_on.get('tokenizer')!r} with vocab {trained_on.get('vocab_size')}"
        raise SystemExit(f"dataset {cfg['dataset']} ({ours['tokenizer']}, vocab {ours['vocab_size']}) does not "
                         f"match the checkpoint, which was trained with {what}: its token ids would mean other "
                         f"text. Resume on the dataset the run was trained on")
    if state["config"].get("optimizer", "adamw") != cfg["optimizer"]:
        raise SystemExit(f"the checkpoint was trained with optimizer={state['config'].get('optimizer', 'adamw')}; "
                         f"resume with that (its state cannot move to {cfg['optimizer']})")
    return model_args | {k: cfg[k] for k in set_keys}


def out_of_memory(e):
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e)))


def memory_advice(cfg):
    return (f"out of memory with batch_size={cfg['batch_size']}, block_size={cfg['block_size']}: lower --batch_size "
            f"(raise --gradient_accumulation_steps to keep the tokens per step), or --block_size, or the model "
            f"(n_layer, n_embd)")


# ----------------------------------------------------------------------------- the loop's state and checkpoints

@dataclasses.dataclass
class LoopState:
    """What the loop carries from step to step; a checkpoint keeps it, so a resumed run continues exactly."""
    step: int = 0
    best_val: float = float("inf")
    train_time: float = 0.0        # seconds of training steps (not evaluation, not compilation)
    logged_step: int = -1          # the step whose eval is already in metrics.jsonl (a resumed checkpoint's)
    sampler_state: torch.Tensor = None  # the batch generator's state before the current batch


def rng_states(sampler_state):
    states = {"torch": torch.get_rng_state(), "sampler": sampler_state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states, generator):
    torch.set_rng_state(states["torch"])
    generator.set_state(states["sampler"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def fetch_batch(loop, meta, cfg, generator, device, rank=0, world_size=1, noise=None):
    """The next training micro-batch; remembers in loop the sampler state before it, which a checkpoint keeps.
    noise (InputNoise) corrupts its inputs, keyed by that sampler state, so a resumed run re-draws it exactly."""
    loop.sampler_state = generator.get_state()
    x, y = get_batch(meta, "train", cfg["batch_size"], cfg["block_size"], generator, device, rank, world_size)
    return (x, y) if noise is None else noise(x, y, loop.sampler_state)


def save_run(path, raw_model, optimizers, cfg, meta, loop, val_loss):
    """ckpt.pt or best.pt: the model, both optimizers and the loop state (kNN stores in a folder beside it)."""
    optimizer, memory_optimizer = optimizers
    # model_args: the model's shape as it is now (head growth rewrites config.layer_heads)
    save_checkpoint(path, {"model_args": dataclasses.asdict(raw_model.config), "model": raw_model.state_dict(),
                           "optimizer": optimizer.state_dict(), "config": cfg, "step": loop.step,
                           "memory_optimizer": memory_optimizer.state_dict() if memory_optimizer else None,
                           "best_val": loop.best_val, "train_time": loop.train_time, "val_loss": val_loss,
                           "rng": rng_states(loop.sampler_state),
                           "tokenizer": {k: meta[k] for k in ("tokenizer", "vocab_size", "eot", "chars") if k in meta}})
    if raw_model.knn_stores():
        save_knn_stores(raw_model, knn_store_dir(path))


# ----------------------------------------------------------------------------- setup

def setup_distributed():
    """(rank, local_rank, world_size); torchrun sets RANK, and then one process drives one GPU."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    import torch.distributed as dist
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


# ----------------------------------------------------------------------------- the run

def train(cfg):
    """Run one training job from a resolved config; returns the final {'train', 'val'} losses.

    One run per out_dir: the folder is locked while the run lives, and a fresh run refuses to replace
    one already there (resume it, or pass overwrite=True to move it aside)."""
    check_config(cfg)
    rank = int(os.environ.get("RANK", 0))
    lock = claim_out_dir(cfg["out_dir"], resuming=cfg["init_from"] == "resume", overwrite=cfg["overwrite"]) \
        if rank == 0 else None
    try:
        return run_training(cfg)
    except BaseException as e:
        if out_of_memory(e):
            raise SystemExit(memory_advice(cfg)) from None
        raise
    finally:
        if lock is not None:
            lock.close()  # releases the out_dir for the next run in this process (a test, world.py's imitation)


def run_training(cfg):
    rank, local_rank, world_size = setup_distributed()
    master = rank == 0
    device = resolve_device(f"cuda:{local_rank}" if world_size > 1 and torch.cuda.is_available() else cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    if cfg["gradient_accumulation_steps"] % world_size:
        raise SystemExit(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be a "
                         f"multiple of the {world_size} processes")
    accum = cfg["gradient_accumulation_steps"] // world_size
    out_dir = cfg["out_dir"]
    ckpt_path, best_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "best.pt")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")

    torch.manual_seed(cfg["seed"] + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()

    # data
    meta = open_dataset(cfg["data_dir"], cfg["dataset"], cfg["block_size"])
    generator = torch.Generator().manual_seed(cfg["seed"])  # shared by all processes: see get_batch

    # model (from the checkpoint's shape when resuming)
    state = None
    if cfg["init_from"] == "resume":
        state = load_checkpoint(ckpt_path)
        model_args = resume_model_args(cfg, state, meta)
        # config.json records the model that runs, not flags the checkpoint overrode
        cfg = cfg | {k: model_args[k] for k in MODEL_KEYS if k != "block_size" and k in model_args}
    else:
        model_args = {k: cfg[k] for k in MODEL_KEYS} | {"vocab_size": meta["vocab_size"]}
    try:
        model = GPT(GPTConfig(**model_args)).to(device)
    except ValueError as e:
        raise SystemExit(f"bad model shape: {e}")
    if cfg["eval_loops"] and (not model_args.get("n_core") or min(cfg["eval_loops"]) < 1):
        raise SystemExit(f"eval_loops={cfg['eval_loops']} needs a looped model (n_core > 0) and loop counts >= 1")
    if state is not None:  # a pruned checkpoint (compress.py): its smaller layers and its masks, kept fixed
        fit_to_state_dict(model, state["model"])
    masked = masked_weights(model)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                           device.type, cfg["optimizer"], cfg["muon_lr"], cfg["memory_lr_scale"])
    # product-key values with sparse gradients get a SparseAdam beside it (AdamW cannot take sparse gradients)
    memory_optimizer = model.configure_memory_optimizer(cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                                        cfg["memory_lr_scale"])
    optimizers = [o for o in (optimizer, memory_optimizer) if o is not None]
    # kNN stores are not weights: they come from a folder beside the checkpoint or from --knn_store
    store_dir = cfg["knn_store"] or (knn_store_dir(ckpt_path) if state is not None else "")
    if store_dir and model.knn_stores():
        load_knn_stores(model, store_dir)
    distill = None
    if cfg["teacher"]:
        teacher = load_teacher(cfg["teacher"], meta, device)
        distill = functools.partial(distill_loss, teacher, cfg["distill_temperature"], cfg["distill_alpha"],
                                    meta["vocab_size"])
    loop = LoopState()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if memory_optimizer is not None:
            memory_optimizer.load_state_dict(state["memory_optimizer"])
        loop = LoopState(step=state["step"], best_val=state["best_val"], train_time=state["train_time"],
                         logged_step=state["step"])
        set_rng_states(state["rng"], generator)
        if master:
            truncate_jsonl(metrics_path, loop.step)
        del state
    raw_model = model
    if model.config.grow_heads and (cfg["compile"] or cfg["fp8"] or world_size > 1):
        raise SystemExit("grow_heads changes parameter shapes during training, which torch.compile (fixed graphs), "
                         "fp8 (converted layers) and DDP (fixed gradient buckets) cannot follow: use compile=False, "
                         "fp8=False and one process")
    if cfg["fp8"]:
        float8_training(model, head=cfg["fp8_head"])
    if cfg["compile"]:
        model = torch.compile(model, options=cfg["compile_options"] or None)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        # the only buffers (rotary tables) are constants: no need to broadcast them every forward
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                        broadcast_buffers=False, gradient_as_bucket_view=True)

    noise = InputNoise(cfg["noise"], meta, cfg["seed"] + rank, raw_model.config.padded_vocab_size) if cfg["noise"] else None
    fetch = functools.partial(fetch_batch, loop, meta, cfg, generator, device, rank, world_size, noise)
    batch = fetch()  # before config.json: a batch too large for memory fails with the out_dir untouched
    tokens_per_step = cfg["batch_size"] * cfg["block_size"] * accum * world_size
    if master:
        write_json_atomic(os.path.join(out_dir, "config.json"),
                          {**cfg, "model_args": model_args, "device": str(device), "dtype": dtype,
                           "world_size": world_size})
        print(f"device {device} ({dtype}), {raw_model.num_params() / 1e6:.2f}M parameters without embeddings "
              f"({raw_model.num_params(False) / 1e6:.2f}M with), {tokens_per_step:,} tokens per step")

    save = functools.partial(save_run, raw_model=raw_model, optimizers=(optimizer, memory_optimizer),
                             cfg=cfg, meta=meta, loop=loop)
    instruments = EvalInstruments(cfg["block_size"], cfg["position_buckets"], cfg["eval_position_loss"], cfg["eval_token_watch"],
                                  unigram(meta) if cfg["eval_token_watch"] else None) \
        if cfg["eval_position_loss"] or cfg["eval_token_watch"] else None
    board = open_tensorboard(out_dir) if cfg["tensorboard"] and master else None
    losses = {"train": float("nan"), "val": float("nan")}
    window_steps, window_time = 0, 0.0  # steps and seconds since the last log line, for tokens/s
    compiling = cfg["compile"]  # the first step compiles; its time is logged apart from training time
    # the bar hides itself when stdout is not a terminal (logs get the eval lines only)
    bar = tqdm(total=cfg["max_iters"], initial=loop.step, disable=None if master else True, dynamic_ncols=True,
               unit="step")
    model.train()
    with StopRequest(tqdm.write) as stop:
        while True:
            step = loop.step
            due = step % cfg["eval_interval"] == 0 or step == cfg["max_iters"] or stop.requested
            if master and due and step != loop.logged_step:
                losses = estimate_loss(model, meta, cfg["eval_iters"], cfg["batch_size"], cfg["block_size"],
                                       device, autocast, instruments=instruments)
                if not all(map(math.isfinite, losses.values())):
                    stop_on_bad_loss(step, losses, ckpt_path)
                row = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                       "train_time": loop.train_time, **(instruments.summary() if instruments else {})}
                for n in cfg["eval_loops"]:  # test-time compute: the same model thinking for n loops
                    row[f"val_loss_loops{n}"] = estimate_loss(model, meta, cfg["eval_iters"], cfg["batch_size"],
                                                              cfg["block_size"], device, autocast, n, ("val",))["val"]
                append_jsonl(metrics_path, row)
                if board is not None:
                    log_scalars(board, row)
                tqdm.write(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f} "
                           f"({loop.train_time:.1f} s of training)")
                if losses["val"] < loop.best_val:
                    loop.best_val = losses["val"]
                    save(best_path, val_loss=losses["val"])
                save(ckpt_path, val_loss=losses["val"])
                plot_runs([out_dir], os.path.join(out_dir, "loss.png"))
                if instruments:
                    plot_instruments(read_jsonl(metrics_path), os.path.join(out_dir, "instruments.png"))
            if step >= cfg["max_iters"] or stop.requested:
                break

            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in (g for opt in optimizers for g in opt.param_groups):
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss, batch = train_step(model, optimizers, batch, fetch, accum, autocast, cfg["grad_clip"], world_size > 1,
                                     distill, static_grads=cfg["compile_options"].get("triton.cudagraphs", False))
            if raw_model.config.grow_heads and (changes := raw_model.update_heads(optimizers)) and master:
                tqdm.write(f"step {step + 1}: " + "; ".join(changes))
                append_jsonl(metrics_path, {"step": step + 1, "layer_heads": list(raw_model.config.layer_heads)})
            apply_masks(masked)
            step = loop.step = step + 1
            # the loss is read (a host sync) only at log steps, so the GPU never waits on Python; a step
            # before an evaluation logs too, so its GPU work counts as training time, not evaluation
            log_now = step % cfg["log_interval"] == 0 or step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]
            loss_value = loss.item() if log_now or compiling else None  # .item() waits for the GPU
            dt = time.perf_counter() - t0  # at a log step this closes the window
            if compiling:  # the first step compiles: its time is logged apart from training time
                compiling = False
                if master:
                    append_jsonl(metrics_path, {"step": step, "compile_time": dt})
            else:
                loop.train_time, window_steps, window_time = loop.train_time + dt, window_steps + 1, window_time + dt
            if log_now:
                if not math.isfinite(loss_value):
                    stop_on_bad_loss(step, {"train batch": loss_value}, ckpt_path)
                if master and window_steps:
                    tok_s = tokens_per_step * window_steps / window_time
                    row = {"step": step, "lr": lr, "loss": loss_value, "tokens_per_s": tok_s, "train_time": loop.train_time}
                    append_jsonl(metrics_path, row)
                    if board is not None:
                        log_scalars(board, row)
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}")
                window_steps, window_time = 0, 0.0
            bar.update(1)
    bar.close()
    if world_size > 1:
        import torch.distributed as dist
        # rank 0 may still be evaluating and saving: a rank that tears its connections down first can make
        # gloo abort the others mid-checkpoint, so every rank leaves together
        dist.barrier()
        dist.destroy_process_group()
    if stop.requested:
        print(f"stopped at step {loop.step}; resume with --init_from=resume --out_dir={out_dir}")
    return losses


def train_step(model, optimizers, batch, fetch, accum, autocast, grad_clip, ddp=False, distill=None,
               static_grads=False):
    """One step of every optimizer over accum micro-batches starting with `batch`; returns (loss, next batch).

    fetch() draws each next micro-batch right after the forward is queued, so the CPU gathers and
    copies it while the GPU computes. The loss (of the last micro-batch) stays a tensor: no host sync.
    distill(x, logits, loss), if given, turns the data loss into the distillation loss.
    static_grads: gradients live in buffers of their own, zeroed in place. CUDA graphs need it: a .grad
    taken over from a graph's output is overwritten by the next replay (pytorch/pytorch#169545).
    """
    if static_grads:
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    for micro in range(accum):
        x, y = batch
        if ddp:  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro == accum - 1
        with autocast:
            logits, loss = model(x, y)
            if distill is not None:
                loss = distill(x, logits, loss)
            loss = loss / accum
        batch = fetch()
        loss.backward()
    if grad_clip > 0:
        # torch cannot take the norm of sparse gradients; those (memory value) rows are left unclipped
        dense = [p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse]
        torch.nn.utils.clip_grad_norm_(dense, grad_clip)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=not static_grads)
    return loss.detach() * accum, batch


def stop_on_bad_loss(step, losses, ckpt_path):
    where = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was saved yet"
    raise SystemExit(f"loss is not finite at step {step} ({losses}); stopping without saving, {where}. "
                     f"Try a lower learning_rate or grad_clip, then --init_from=resume.")


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
