"""
Train a µLM, resume one, or fine-tune one on new data.

    python train.py config/shakespeare_char.py --max_iters=2000
    python train.py config/shakespeare_char.py --init_from=resume
    python train.py config/shakespeare_char.py --dataset=my_text --init_from=out/shakespeare_char --out_dir=out/tuned
    torchrun --standalone --nproc_per_node=2 train.py config/gpu_124m.py

The story: config -> data -> model -> optimizer -> loop (evaluate, save, step) -> save. Everything lands in
out_dir: config.json, metrics.jsonl, loss.png, ckpt.pt (latest) and best.pt (lowest val loss). The pieces
other scripts share (schedule, step, evaluation, the run's checkpoint) live in training.py.
"""
import contextlib
import functools
import math
import os
import shlex
import sys
import time

import torch
from tqdm import tqdm

from architecture import DEFAULTS as MODEL_DEFAULTS
from architecture import build_model, options_of
from checkpoint import knn_store_dir, load_checkpoint, load_knn_stores, load_model, write_json_atomic
from configurator import check_ranges, configure, print_config
from data import get_batch, open_dataset
from heads import HeadConfig, update_heads
from instruments import EvalInstruments, log_scalars, open_tensorboard, plot_instruments, unigram
from memory import knn_stores
from metrics import best_val, plot_runs
from noise import InputNoise
from runtime import (StopRequest, append_jsonl, claim_out_dir, float8_training, progress, read_jsonl, resolve_device,
                     resolve_dtype, set_threads, truncate_jsonl)
import shim
from shrink import apply_masks, fit_to_state_dict, masked_weights
from training import (RunState, StepOptions, distill_loss, estimate_loss, lr_at, make_optimizers, restore_run,
                      save_run, set_lr, tokenizer_of, train_step)

MODEL_KEYS = [k for k in MODEL_DEFAULTS if k != "vocab_size"]
DEFAULTS = dict(
    # run and data
    out_dir="out/run",
    dataset="shakespeare_char",   # a folder under data_dir made by prepare.py
    data_dir="data",
    init_from="scratch",          # scratch | resume (from out_dir/ckpt.pt) | a checkpoint or run folder to fine-tune:
                                  # its weights, with a fresh optimizer and schedule on this run's data
    train_only="",                # "" trains every weight; shim: only the token embedding, head and shims (shim.py),
                                  # e.g. onto a dataset of another tokenizer, the checkpoint's blocks frozen
    overwrite=False,              # a fresh run into an out_dir holding a run moves the old one aside (else: refused)
    eval_interval=250,
    eval_iters=100,
    log_interval=10,
    eval_loops=[],                # looped models: also val loss at these test-time loop counts (val_loss_loops{N})
    # model: every option of architecture.py is a key (vocab_size comes from the dataset)
    **{k: MODEL_DEFAULTS[k] for k in MODEL_KEYS},
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
    threads=0,                    # torch CPU threads; 0: the cores the load average leaves idle (runtime.set_threads)
    compile=False,
    compile_options={},           # Inductor options, e.g. {"triton.cudagraphs": True} (CUDA graphs for the step, as
                                  # mode="reduce-overhead") or {"coordinate_descent_tuning": True}; bench.py's levers
    fp8=False,                    # float8 matmuls through torchao (H100-class GPUs; see BENCHMARKS.md for the gain)
    fp8_head=True,                # with fp8, the tied head/embedding matmul in fp8 too
    seed=1337,
)


# ----------------------------------------------------------------------------- config checks

CHOICES = {"optimizer": ("adamw", "muon"), "schedule": ("cosine", "wsd"), "train_only": ("", "shim")}
AT_LEAST_ONE = ("batch_size", "eval_interval", "eval_iters", "log_interval", "gradient_accumulation_steps",
                "n_layer", "n_head", "n_embd", "block_size")
NOT_NEGATIVE = ("max_iters", "learning_rate", "min_lr", "muon_lr", "warmup_iters", "lr_decay_iters", "weight_decay",
                "grad_clip", "memory_lr_scale", "n_kv_head", "threads")
FRACTIONS = ("decay_frac", "distill_alpha", "beta1", "beta2")  # each in [0, 1]


def check_config(cfg):
    """Every value the loop relies on, checked before anything is read or written: an error names the key."""
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise SystemExit(f"{key} must be {' or '.join(allowed)}, got {cfg[key]!r}")
    if cfg["init_from"] not in ("scratch", "resume") and not os.path.exists(cfg["init_from"]):
        raise SystemExit(f"init_from must be scratch, resume, or a checkpoint or run folder to fine-tune from; "
                         f"{cfg['init_from']!r} does not exist")
    if cfg["train_only"] and cfg["init_from"] == "scratch":
        raise SystemExit(f"train_only={cfg['train_only']} keeps a trained model's blocks: give --init_from=<a run "
                         f"or checkpoint> (trained with shim=True)")
    check_ranges(cfg, AT_LEAST_ONE, NOT_NEGATIVE, FRACTIONS)
    if not 0 <= cfg["dropout"] < 1:
        raise SystemExit(f"dropout must be in [0, 1), got {cfg['dropout']}")
    if cfg["compile_options"] and not cfg["compile"]:
        raise SystemExit("compile_options are torch.compile's: set compile=True too")
    for fused in ("ce_chunks", "liger_ce"):
        if cfg[fused] and cfg["teacher"]:
            raise SystemExit(f"{fused} (a fused head + loss) makes no logits for distillation: turn {fused} off")
    if cfg["distill_temperature"] <= 0:
        raise SystemExit(f"distill_temperature must be positive, got {cfg['distill_temperature']}")
    if cfg["init_from"] == "scratch":  # the model's options too, before overwrite=True moves an old run aside
        try:
            with torch.device("meta"):  # shapes only: no memory, no time
                build_model({k: cfg[k] for k in MODEL_KEYS} | {"vocab_size": 256})
        except ValueError as e:
            raise SystemExit(f"bad model shape: {e}")


RESUME_MAY_CHANGE = ("dropout", "checkpoint_activations")  # model keys that shape training, not the weights


def checkpoint_model_args(cfg, state, meta, what):
    """The model_args a resumed or fine-tuned run builds: the checkpoint's, with RESUME_MAY_CHANGE keys from
    cfg where set. A model key is set when it differs from DEFAULTS; a set key that would change the
    weights' shape, or a dataset with another tokenizer, is an error. block_size may shrink (same weights)."""
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
        raise SystemExit(f"{what} keeps the checkpoint's model, but you set " +
                         ", ".join(f"{k}={cfg[k]!r} (checkpoint: {saved[k]!r})" for k in changed) +
                         ": drop those keys, or start a fresh run in another --out_dir")
    trained_on, ours = state.get("tokenizer", {}), tokenizer_of(meta)
    if trained_on != ours and cfg["train_only"] == "shim" and cfg["init_from"] != "resume":
        return model_args | {k: cfg[k] for k in set_keys} | {"vocab_size": meta["vocab_size"]}  # a new tokenizer
    if trained_on != ours:
        kind = "a different character vocabulary" if trained_on.get("tokenizer") == ours["tokenizer"] == "char" \
            else f"tokenizer {trained_on.get('tokenizer')!r} with vocab {trained_on.get('vocab_size')}"
        raise SystemExit(f"dataset {cfg['dataset']} ({ours['tokenizer']}, vocab {ours['vocab_size']}) does not "
                         f"match the checkpoint, which was trained with {kind}: its token ids would mean other "
                         f"text. Prepare the data with the checkpoint's tokenizer")
    return model_args | {k: cfg[k] for k in set_keys}


def out_of_memory(e):
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e)))


def memory_advice(cfg):
    return (f"out of memory with batch_size={cfg['batch_size']}, block_size={cfg['block_size']}: lower --batch_size "
            f"(raise --gradient_accumulation_steps to keep the tokens per step), or --block_size, or the model "
            f"(n_layer, n_embd)")


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


def starting_checkpoint(cfg, ckpt_path):
    """The checkpoint a run starts from, or None for a fresh one. Resume: out_dir's ckpt.pt, optimizer and
    all; fine-tune: another run's weights only (state["path"] says where it came from)."""
    if cfg["init_from"] == "scratch":
        return None
    path = ckpt_path if cfg["init_from"] == "resume" else cfg["init_from"]
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    state = load_checkpoint(path)
    if cfg["init_from"] != "resume" and state.get("kind") == "export" and \
            state.get("quantization", {}).get("format") in ("int8", "int4"):
        raise SystemExit(f"{path} is a {state['quantization']['format']} inference export: its weights cannot "
                         f"train. Fine-tune from the training checkpoint it came from, or a float32 export")
    return state | {"path": path}


def build(cfg, meta, device, state, generator):
    """(model, (optimizer, memory optimizer), run state, model_args) from the starting checkpoint (or None):
    fresh, resumed or fine-tuned. A resumed run also gets its random states back, the batch generator's."""
    if state is None:
        model_args = {k: cfg[k] for k in MODEL_KEYS} | {"vocab_size": meta["vocab_size"]}
    else:
        what = "resuming" if cfg["init_from"] == "resume" else f"fine-tuning from {state['path']}"
        model_args = checkpoint_model_args(cfg, state, meta, what)
    try:
        model = build_model(model_args).to(device)
    except ValueError as e:
        raise SystemExit(f"bad model shape: {e}")
    if cfg["eval_loops"] and (not model_args.get("n_core") or min(cfg["eval_loops"]) < 1):
        raise SystemExit(f"eval_loops={cfg['eval_loops']} needs a looped model (n_core > 0) and loop counts >= 1")
    # train_only=shim onto another tokenizer: the checkpoint's blocks only (checkpoint_model_args let it through)
    new_tokens = state is not None and cfg["init_from"] != "resume" and state.get("tokenizer") != tokenizer_of(meta)
    if state is not None:  # a pruned checkpoint (compress.py): its smaller layers and its masks, kept fixed
        weights = {k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}
        weights = shim.without_token_rows(weights) if new_tokens else weights
        fit_to_state_dict(model, weights)
    if cfg["train_only"] == "shim":
        try:
            print(f"train_only=shim: {shim.train_only_shims(model):,} parameters train, the blocks are frozen")
        except ValueError as e:
            raise SystemExit(str(e))
    optimizers = make_optimizers(model, cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                 device.type, cfg["optimizer"], cfg["muon_lr"], cfg["memory_lr_scale"])
    # kNN stores are not weights: they come from a folder beside the checkpoint or from --knn_store
    store_dir = cfg["knn_store"] or (knn_store_dir(state["path"]) if state is not None else "")
    if store_dir and knn_stores(model):
        load_knn_stores(model, store_dir)
    run = RunState()
    if cfg["init_from"] == "resume":
        if state["config"].get("optimizer", "adamw") != cfg["optimizer"]:
            raise SystemExit(f"the checkpoint was trained with optimizer={state['config'].get('optimizer', 'adamw')}"
                             f"; resume with that (its state cannot move to {cfg['optimizer']})")
        run = restore_run(state, state["path"], model, optimizers, generator)
    elif state is not None:  # fine-tuning: the weights only (a float export's too)
        model.load_state_dict(weights, strict=not new_tokens)  # new tokens: the embedding and head start fresh
    return model, optimizers, run, model_args


def wrap_for_speed(model, cfg, world_size, local_rank, device):
    """The model the loop runs: fp8, compiled and DDP as configured (the raw model is what gets saved)."""
    if options_of(model, HeadConfig).grow_heads and (cfg["compile"] or cfg["fp8"] or world_size > 1):
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
    return model


def fetch_batch(run, meta, cfg, generator, device, rank=0, world_size=1, noise=None):
    """The next training micro-batch; remembers in run the sampler state before it, which a checkpoint keeps.
    noise (InputNoise) corrupts its inputs, keyed by that sampler state, so a resumed run re-draws it exactly."""
    run.sampler_state = generator.get_state()
    x, y = get_batch(meta, "train", cfg["batch_size"], cfg["block_size"], generator, device, rank, world_size)
    return (x, y) if noise is None else noise(x, y, run.sampler_state)


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
            lock.close()  # releases the out_dir for the next run in this process (a test)


def run_training(cfg):
    rank, local_rank, world_size = setup_distributed()
    master = rank == 0
    device = resolve_device(f"cuda:{local_rank}" if world_size > 1 and torch.cuda.is_available() else cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    threads = set_threads(cfg["threads"])
    if cfg["gradient_accumulation_steps"] % world_size:
        raise SystemExit(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be a "
                         f"multiple of the {world_size} processes")
    out_dir = cfg["out_dir"]
    torch.manual_seed(cfg["seed"] + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()

    # the checkpoint to start from, when resuming or fine-tuning: its context unless the run asks for a shorter one
    state = starting_checkpoint(cfg, os.path.join(out_dir, "ckpt.pt"))
    if state is not None and cfg["block_size"] == DEFAULTS["block_size"]:
        cfg = cfg | {"block_size": state["model_args"]["block_size"]}

    # data
    meta = open_dataset(cfg["data_dir"], cfg["dataset"], cfg["block_size"])
    generator = torch.Generator().manual_seed(cfg["seed"])  # shared by all processes: see get_batch

    # model and optimizers (from the checkpoint when resuming or fine-tuning)
    raw_model, optimizers, run, model_args = build(cfg, meta, device, state, generator)
    del state  # its tensors are in the model now
    # from here the config describes the model that runs (a resumed run's is the checkpoint's)
    cfg = cfg | {k: model_args[k] for k in MODEL_KEYS if k != "block_size" and k in model_args}
    if run.step and master:
        truncate_jsonl(os.path.join(out_dir, "metrics.jsonl"), run.step)
    model = wrap_for_speed(raw_model, cfg, world_size, local_rank, device)
    noise = InputNoise(cfg["noise"], meta, cfg["seed"] + rank, raw_model.config.padded_vocab_size) if cfg["noise"] else None
    fetch = functools.partial(fetch_batch, run, meta, cfg, generator, device, rank, world_size, noise)
    batch = fetch()  # before config.json: a batch too large for memory fails with the out_dir untouched
    if master:
        write_json_atomic(os.path.join(out_dir, "config.json"),
                          {**cfg, "model_args": model_args, "device": str(device), "dtype": dtype,
                           "world_size": world_size})
        print(f"device {device} ({dtype}, {threads} CPU thread{'s' if threads > 1 else ''}), "
              f"{raw_model.num_params() / 1e6:.2f}M parameters without embeddings "
              f"({raw_model.num_params(False) / 1e6:.2f}M with), {tokens_per_step(cfg):,} tokens per step")
    losses = loop(cfg, model, raw_model, optimizers, run, meta, batch, fetch, device, autocast, master, world_size)
    if world_size > 1:
        import torch.distributed as dist
        # rank 0 may still be evaluating and saving: a rank that tears its connections down first can make
        # gloo abort the others mid-checkpoint, so every rank leaves together
        dist.barrier()
        dist.destroy_process_group()
    return losses


def tokens_per_step(cfg):
    return cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]


def loop(cfg, model, raw_model, optimizers, run, meta, batch, fetch, device, autocast, master, world_size):
    """Evaluate and save when due, then step, until max_iters or a stop request; returns the last losses."""
    out_dir = cfg["out_dir"]
    evaluate = functools.partial(evaluate_and_save, cfg, model, raw_model, optimizers, run, meta, device, autocast,
                                 make_instruments(cfg, meta) if master else None,
                                 open_tensorboard(out_dir) if cfg["tensorboard"] and master else None)
    distill = None
    if cfg["teacher"]:
        teacher = load_teacher(cfg["teacher"], meta, device)
        distill = functools.partial(distill_loss, teacher, cfg["distill_temperature"], cfg["distill_alpha"],
                                    meta["vocab_size"])
    step_options = StepOptions(cfg["gradient_accumulation_steps"] // world_size, cfg["grad_clip"], autocast,
                               keep_grads=cfg["compile_options"].get("triton.cudagraphs", False))
    heads = options_of(raw_model, HeadConfig)
    masked = masked_weights(raw_model)
    log = StepLog(cfg, run, tokens_per_step(cfg), master)
    losses = {"train": float("nan"), "val": float("nan")}
    model.train()
    with StopRequest(tqdm.write) as stop:
        while True:
            due = run.step % cfg["eval_interval"] == 0 or run.step == cfg["max_iters"] or stop.requested
            if master and due and run.step != run.logged_step:
                losses = evaluate()
            if run.step >= cfg["max_iters"] or stop.requested:
                break
            t0 = time.perf_counter()
            lr = lr_at(run.step, cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"],
                       cfg["lr_decay_iters"] or cfg["max_iters"], cfg["schedule"], cfg["decay_frac"])
            set_lr(optimizers_of(optimizers), lr)
            loss, batch = train_step(model, optimizers_of(optimizers), batch, fetch, step_options, distill)
            if heads.grow_heads and (changes := update_heads(raw_model, heads, optimizers_of(optimizers))) and master:
                tqdm.write(f"step {run.step + 1}: " + "; ".join(changes))
                append_jsonl(os.path.join(out_dir, "metrics.jsonl"), {"step": run.step + 1,
                                                                      "layer_heads": list(heads.layer_heads)})
            apply_masks(masked)
            run.step += 1
            log.step(loss, lr, t0)
    log.close()
    if master:
        print(run_summary(cfg, run, stop.requested))
    return losses


def run_summary(cfg, run, stopped):
    """The lines a run ends with: its best val loss, its time, where its files are, and what to run next."""
    out_dir = cfg["out_dir"]
    best, at = best_val(read_jsonl(os.path.join(out_dir, "metrics.jsonl")))
    quoted = shlex.quote(out_dir)
    lines = [f"{'stopped' if stopped else 'done'} at step {run.step} of {cfg['max_iters']}: " +
             (f"best val {best:.4f} at step {at}" if best is not None else "no evaluation yet") +
             f", {run.train_time:.1f} s of training",
             f"{out_dir}: ckpt.pt (latest), best.pt (best val), loss.png, metrics.jsonl, config.json"]
    if stopped:
        lines.append(f"resume with --init_from=resume --out_dir={quoted} (and the same config and options)")
    lines.append(f"next: python sample.py --out_dir={quoted}   or   python plot.py {quoted}")
    return "\n".join(lines)


def make_instruments(cfg, meta):
    """The evaluation instruments cfg asks for (instruments.py), or None."""
    if not (cfg["eval_position_loss"] or cfg["eval_token_watch"]):
        return None
    return EvalInstruments(cfg["block_size"], cfg["position_buckets"], cfg["eval_position_loss"],
                           cfg["eval_token_watch"], unigram(meta) if cfg["eval_token_watch"] else None)


def optimizers_of(pair):
    return [o for o in pair if o is not None]


class StepLog:
    """metrics.jsonl rows and the progress bar between evaluations. The loss is read (a host sync) only at
    log steps, so the GPU never waits on Python; a step before an evaluation logs too, so its GPU work counts
    as training time, not evaluation. The first compiled step's time is logged apart from training time."""

    def __init__(self, cfg, run, tokens_per_step, master):
        self.cfg, self.run, self.tokens_per_step, self.master = cfg, run, tokens_per_step, master
        self.path = os.path.join(cfg["out_dir"], "metrics.jsonl")
        self.compiling = cfg["compile"]
        self.window_steps, self.window_time = 0, 0.0  # steps and seconds since the last log line, for tokens/s
        # on a terminal a bar with an ETA; in a log (CI, a job) a line every 30 s
        self.bar = progress(cfg["max_iters"], "training", "step", initial=run.step, disable=not master)

    def step(self, loss, lr, t0):
        cfg, step = self.cfg, self.run.step
        log_now = step % cfg["log_interval"] == 0 or step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]
        loss_value = loss.item() if log_now or self.compiling else None  # .item() waits for the GPU
        dt = time.perf_counter() - t0  # at a log step this closes the window
        if self.compiling:
            self.compiling = False
            if self.master:
                append_jsonl(self.path, {"step": step, "compile_time": dt})
        else:
            self.run.train_time += dt
            self.window_steps, self.window_time = self.window_steps + 1, self.window_time + dt
        if log_now:
            if not math.isfinite(loss_value):
                stop_on_bad_loss(step, {"train batch": loss_value}, os.path.join(cfg["out_dir"], "ckpt.pt"))
            if self.master and self.window_steps:
                tok_s = self.tokens_per_step * self.window_steps / self.window_time
                row = {"step": step, "lr": lr, "loss": loss_value, "tokens_per_s": tok_s,
                       "train_time": self.run.train_time}
                append_jsonl(self.path, row)
                self.bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}")
            self.window_steps, self.window_time = 0, 0.0
        self.bar.update(1)

    def close(self):
        self.bar.close()


def evaluate_and_save(cfg, model, raw_model, optimizers, run, meta, device, autocast, instruments, board):
    """Train and val loss (and at eval_loops), a metrics row, ckpt.pt, best.pt if improved, the plots."""
    out_dir, step = cfg["out_dir"], run.step
    ckpt_path, metrics_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "metrics.jsonl")
    evaluate = functools.partial(estimate_loss, model, meta, cfg["batch_size"], cfg["block_size"], cfg["eval_iters"],
                                 device, autocast)
    losses = evaluate(instruments=instruments)
    if not all(map(math.isfinite, losses.values())):
        stop_on_bad_loss(step, losses, ckpt_path)
    row = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"], "train_time": run.train_time,
           **(instruments.summary() if instruments else {})}
    if device.type == "cuda":  # the peak so far, training included: what a GPU of less memory would need
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    for n in cfg["eval_loops"]:  # test-time compute: the same model thinking for n loops
        row[f"val_loss_loops{n}"] = evaluate(splits=("val",), loops=n)["val"]
    append_jsonl(metrics_path, row)
    if board is not None:
        log_scalars(board, row)
    tqdm.write(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f} "
               f"({run.train_time:.1f} s of training)")
    save = functools.partial(save_run, model=raw_model, optimizers=optimizers, run=run, cfg=cfg, meta=meta,
                             val_loss=losses["val"])
    if losses["val"] < run.best_val:
        run.best_val = losses["val"]
        save(os.path.join(out_dir, "best.pt"))
    save(ckpt_path)
    run.logged_step = step
    plot_runs([out_dir], os.path.join(out_dir, "loss.png"))
    if instruments:
        plot_instruments(read_jsonl(metrics_path), os.path.join(out_dir, "instruments.png"))
    return losses


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
