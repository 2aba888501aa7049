"""
The pieces of a training run that train.py and the experiments share, each taking what it uses: the
learning-rate schedule, the optimizers, one optimizer step, evaluation, distillation, and a run's
checkpoint (save and restore, so a resumed run continues exactly). train.py tells the story; this module
holds no loop of its own.
"""
import contextlib
import dataclasses
import math
import os
import time

import torch
import torch.nn.functional as F

from architecture import model_args
from checkpoint import knn_store_dir, save_checkpoint, save_knn_stores
from data import get_batch
from memory import knn_stores, value_groups
from runtime import read_jsonl

EVAL_SEED = 1234  # evaluation draws the same batches every time, so evals compare exactly


# ----------------------------------------------------------------------------- schedule and optimizers

def lr_at(step, learning_rate, min_lr, warmup_iters, total_iters, schedule="cosine", decay_frac=0.2):
    """Linear warmup, then cosine decay to min_lr at total_iters, or (wsd) constant then a linear decay
    over the last decay_frac of the run (warmup-stable-decay, Hu et al. 2024)."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    if schedule == "wsd":
        decay_start = total_iters - int(decay_frac * total_iters)
        if step < decay_start:
            return learning_rate
        return min_lr + (learning_rate - min_lr) * (total_iters - step) / max(1, total_iters - decay_start)
    progress = min(1.0, (step - warmup_iters) / max(1, total_iters - warmup_iters))
    return min_lr + 0.5 * (learning_rate - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizers, lr):
    """The schedule's learning rate into every group, times the group's lr_scale (Muon's, memory values')."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizers(model, weight_decay, learning_rate, betas, device_type, optimizer="adamw", muon_lr=0.02,
                    memory_lr_scale=1.0):
    """(the model's optimizer, SparseAdam for sparse memory value tables or None)."""
    memory_groups, sparse, memory_optimizer = value_groups(model, learning_rate, betas, memory_lr_scale)
    main = model.configure_optimizers(weight_decay, learning_rate, betas, device_type, optimizer, muon_lr,
                                      own_groups=memory_groups, exclude=sparse)
    return main, memory_optimizer


# ----------------------------------------------------------------------------- one step

@dataclasses.dataclass
class StepOptions:
    accum: int = 1                 # micro-batches per optimizer step
    grad_clip: float = 1.0         # 0 disables clipping (sparse memory-value gradients are never clipped)
    autocast: contextlib.AbstractContextManager = dataclasses.field(default_factory=contextlib.nullcontext)
    keep_grads: bool = False       # gradients live in buffers of their own, zeroed in place. CUDA graphs need it:
                                   # a .grad taken over from a graph's output is overwritten by the next replay
                                   # (pytorch/pytorch#169545)


def train_step(model, optimizers, batch, next_batch, options, loss_of=None):
    """One step of every optimizer over options.accum micro-batches starting with `batch`; returns
    (loss, the next batch). next_batch() draws each next micro-batch right after the forward is queued, so
    the CPU gathers and copies it while the GPU computes; the loss (of the last micro-batch) stays a tensor:
    no host sync. loss_of(x, logits, loss), if given, turns the data loss into another (distillation).
    Under DDP gradients are all-reduced only on the last micro-batch."""
    if options.keep_grads:
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    ddp = hasattr(model, "require_backward_grad_sync")
    for micro in range(options.accum):
        x, y = batch
        if ddp:
            model.require_backward_grad_sync = micro == options.accum - 1
        with options.autocast:
            logits, loss = model(x, y)
            if loss_of is not None:
                loss = loss_of(x, logits, loss)
            loss = loss / options.accum
        batch = next_batch()
        loss.backward()
    if options.grad_clip > 0:
        # torch cannot take the norm of sparse gradients; those (memory value) rows are left unclipped
        dense = [p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse]
        torch.nn.utils.clip_grad_norm_(dense, options.grad_clip)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=not options.keep_grads)
    return loss.detach() * options.accum, batch


def fit(model, next_batch, steps, learning_rate, device, warmup=50, weight_decay=0.0, memory_lr_scale=10.0,
        evaluate=None, eval_every=0, autocast=contextlib.nullcontext(), log_every=0, name="fit", deadline=None,
        loss_of=None):
    """Train model for `steps` AdamW steps (plus SparseAdam for sparse memory values) on next_batch(step) ->
    (x, y), warmup then cosine decay to a tenth; evaluate(step) every eval_every steps and at the end, in eval
    mode; a line with the loss every log_every steps. With a deadline (a time.time() value) the schedule runs
    by time too, so it has decayed when training stops at the deadline, whichever of steps and time ends
    first. loss_of turns the data loss into another (train_step's: distillation). The loop the experiments
    share (train.py's is this plus data, checkpoints and logging).
    Returns (final loss, tokens/s, tokens)."""
    optimizers = [o for o in make_optimizers(model, weight_decay, learning_rate, (0.9, 0.95), device.type,
                                             memory_lr_scale=memory_lr_scale) if o is not None]
    options = StepOptions(autocast=autocast)
    batch = tuple(t.to(device) for t in next_batch(0))
    tokens, seconds, loss = 0, 0.0, torch.tensor(float("nan"))  # tokens: a device tensor, read once at the end
    start = time.time()
    for step in range(steps + 1):
        if eval_every and (step % eval_every == 0 or step == steps):
            model.eval()
            evaluate(step)
        if step == steps:
            break
        if deadline is not None and time.time() >= deadline:
            print(f"{name}: out of time at step {step} of {steps}", flush=True)
            break
        model.train()
        at = step if deadline is None else max(step, int(steps * (time.time() - start) / (deadline - start)))
        set_lr(optimizers, lr_at(at, learning_rate, learning_rate / 10, warmup, steps))
        t0 = time.perf_counter()
        tokens = tokens + (batch[1] >= 0).sum()
        loss, batch = train_step(model, optimizers, batch, lambda: tuple(t.to(device) for t in next_batch(step + 1)),
                                 options, loss_of)
        seconds += time.perf_counter() - t0
        if log_every and (step + 1) % log_every == 0:  # .item() waits for the device: only at log steps
            print(f"{name} step {step + 1}/{steps}: loss {loss.item():.4f} ({seconds:.0f} s)", flush=True)
    model.eval()
    tokens = int(tokens)
    return loss.item(), tokens / max(seconds, 1e-9), tokens


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def estimate_loss(model, meta, batch_size, block_size, eval_iters, device, autocast=contextlib.nullcontext(),
                  splits=("train", "val"), instruments=None, **options):
    """{split: mean loss over eval_iters fixed batches}; options go to the model (looped.py's loops);
    instruments (instruments.EvalInstruments) watch val."""
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
                    logits, token_losses = model(x, y, reduction="none", **options)
                    instruments.update(logits, y, token_losses)
                    total += token_losses.mean()
                else:
                    total += model(x, y, **options)[1]
        losses[split] = (total / eval_iters).item()
    model.train(was_training)
    return losses


def distill_kl(logits, teacher_logits, temperature, vocab_size):
    """T^2 * KL(teacher || student) per token at temperature T (Hinton et al. 2015), over the real vocab."""
    s = (logits[..., :vocab_size].float() / temperature).log_softmax(-1).flatten(0, -2)
    t = (teacher_logits[..., :vocab_size].float() / temperature).log_softmax(-1).flatten(0, -2)
    # T^2 keeps the soft targets' gradient scale independent of T
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def distill_loss(teacher, temperature, alpha, vocab_size, x, logits, loss):
    """The data loss mixed with the KL to the teacher's logits (train_step's loss_of, with the first four bound)."""
    with torch.no_grad():
        teacher_logits = teacher(x)[0]
    return (1 - alpha) * loss + alpha * distill_kl(logits, teacher_logits, temperature, vocab_size)


# ----------------------------------------------------------------------------- a run's checkpoint

@dataclasses.dataclass
class RunState:
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


def last_evaluation(out_dir):
    """{'train', 'val'} losses of a train.py run's last evaluation, from its metrics.jsonl."""
    rows = [row for row in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "val_loss" in row]
    if not rows:
        raise SystemExit(f"{out_dir} holds no evaluation yet (metrics.jsonl has no val_loss row)")
    return {"train": rows[-1]["train_loss"], "val": rows[-1]["val_loss"]}


def tokenizer_of(meta):
    """What a checkpoint records of the data's tokenizer, so sampling and resuming can check it."""
    return {k: meta[k] for k in ("tokenizer", "vocab_size", "eot", "chars") if k in meta}


def save_run(path, model, optimizers, run, cfg, meta, val_loss):
    """ckpt.pt or best.pt: the model, both optimizers and the run state (kNN stores in a folder beside it)."""
    optimizer, memory_optimizer = optimizers
    save_checkpoint(path, {"model_args": model_args(model), "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(), "config": cfg, "step": run.step,
                           "memory_optimizer": memory_optimizer.state_dict() if memory_optimizer else None,
                           "best_val": run.best_val, "train_time": run.train_time, "val_loss": val_loss,
                           "rng": rng_states(run.sampler_state), "tokenizer": tokenizer_of(meta)})
    if knn_stores(model):
        save_knn_stores(model, knn_store_dir(path))


RESUME_NEEDS = ("optimizer", "rng", "step", "best_val", "train_time", "config")


def restore_run(state, path, model, optimizers, generator):
    """Load a train.py checkpoint's weights, optimizer states and random states; return its RunState.
    A checkpoint without what resuming needs (an inference export, a damaged file) is a clear error."""
    if state.get("kind") == "export":
        raise SystemExit(f"{path} is an inference export (compress.py): it has no optimizer state to resume. "
                         f"Resume from the training checkpoint it came from, or fine-tune from it with "
                         f"--init_from={path}")
    missing = [k for k in RESUME_NEEDS if k not in state or state[k] is None]
    if missing:
        raise SystemExit(f"{path} cannot be resumed: it has no {', '.join(missing)}. Start a fresh run, or "
                         f"fine-tune from its weights with --init_from={path}")
    optimizer, memory_optimizer = optimizers
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if memory_optimizer is not None:
            memory_optimizer.load_state_dict(state["memory_optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path} does not match the model it describes ({type(e).__name__}: {e}): the file is "
                         f"damaged or was edited; resume from another checkpoint (best.pt?)") from None
    set_rng_states(state["rng"], generator)
    return RunState(step=state["step"], best_val=state["best_val"], train_time=state["train_time"],
                    logged_step=state["step"])
