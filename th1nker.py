"""
Th1nker (note 004, issue 29): blocks called step by step over a latent, a probe that picks the next block,
a store of earlier latents (medium-term memory) and compressed latents of past runs (long-term memory).

The blocks are a looped model's parts (looped.py), so a Th1nker is a LoopedGPT run one block at a time:
    R  Read     the input re-read into the latent: latent = norm(latent) + prelude(embed(idx))
    P  Process  the shared core layers over the latent (noise on the latent in training)
    O  Output   coda, norm, lm_head: logits from the latent (a loss at every Output in training)
    L  ReadLatent  attention, at each position, over the latents this run stored after each earlier step
    M  ReadMemory  attention over long-term memory tokens (compressed sections of earlier runs)
    S  Stop     ends a row (the probe's choice; its answer is its last Output)
The latent is (B, T, C), one vector per input position, like looped.py's state. The schedule
"R P R P ... R P O" (k pairs) is LoopedGPT with loops=k exactly (tests/test_th1nker.py), so a Th1nker
checkpoint's weights are a looped model's, and sample.py and serve.py run them as that fixed schedule.

    python experiments/th1nker_experiments.py config/th1nker_parity.py            # probe vs fixed schedules, RL on steps

Off by default: nothing in model.py, looped.py or train.py knows about it; experiments/th1nker_experiments.py builds one.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from architecture import build_model
from model import norm

BLOCKS = {"R": "read", "P": "process", "O": "output", "L": "read latent store", "M": "read long-term memory",
          "S": "stop"}
ACTIONS = "RPOS"  # the probe's choices


@dataclass
class ThinkerConfig:
    init_state: str = "random"   # random (note 004: the latent starts as noise) | zero
    state_noise: float = 0.0     # > 0: training adds Gaussian noise of this size (relative RMS) after each Process
    backprop_steps: int = 0      # > 0: the latent is detached every this many blocks (truncated backprop)
    max_steps: int = 32          # the probe's cap on blocks per row (then Output and Stop are forced)
    store: bool = False          # a LatentStore and the ReadLatent block (L)
    store_window: int = 0        # > 0: gradients flow into the latents of the last this many stored steps only
    memory: bool = False         # the ReadMemory block (M) over long-term memory tokens

    def check(self):
        if self.init_state not in ("random", "zero"):
            raise ValueError(f"init_state must be random or zero, got {self.init_state!r}")
        if self.state_noise < 0 or self.backprop_steps < 0 or self.store_window < 0:
            raise ValueError("state_noise, backprop_steps and store_window must be >= 0")
        if self.max_steps < 2:
            raise ValueError(f"max_steps={self.max_steps} must be >= 2 (a Read and an Output)")


def parse_schedule(schedule, config=None):
    """A schedule string ("R P P O", spaces optional) or list of block letters, checked: every letter a known
    block, at least one Output, no Output (or ReadLatent) before the first Read, Stop only at the end."""
    blocks = [b for b in schedule.replace(" ", "")] if isinstance(schedule, str) else list(schedule)
    for i, b in enumerate(blocks):
        if b not in BLOCKS:
            raise ValueError(f"unknown block {b!r} at position {i} of schedule {schedule!r}: the blocks are "
                             + ", ".join(f"{k} ({v})" for k, v in BLOCKS.items()))
        if b in "OL" and "R" not in blocks[:i]:
            raise ValueError(f"schedule {schedule!r}: {BLOCKS[b]} at position {i} comes before any Read "
                             "(the latent has not seen the input yet): start with R")
        if b == "S" and i != len(blocks) - 1:
            raise ValueError(f"schedule {schedule!r}: Stop at position {i} must be the last block")
    if "O" not in blocks:
        raise ValueError(f"schedule {schedule!r} has no Output (O): nothing would be answered")
    if config is not None and "L" in blocks and not config.store:
        raise ValueError(f"schedule {schedule!r} reads the latent store (L): set store=True")
    if config is not None and "M" in blocks and not config.memory:
        raise ValueError(f"schedule {schedule!r} reads long-term memory (M): set memory=True")
    return blocks


def looped_schedule(loops, output_every=False):
    """The schedule of a looped model with `loops` loops: (R P) x loops then O (an O after every pair with
    output_every: looped.py's loop_loss='every')."""
    return list(("RPO" if output_every else "RP") * loops) + ([] if output_every else ["O"])


# ----------------------------------------------------------------------------- medium-term memory

class LatentStore:
    """The latent after each step of one run, (B, T, C) each. Entries older than `window` writes are kept
    detached, so backprop through a read reaches only the last `window` steps (0: every step)."""

    def __init__(self, window=0):
        self.window, self.latents = window, []

    def __len__(self):
        return len(self.latents)

    def write(self, latent):
        self.latents.append(latent)
        if self.window and len(self.latents) > self.window:
            self.latents[-self.window - 1] = self.latents[-self.window - 1].detach()

    def read(self):
        """(B, T, S, C): every stored latent, oldest first."""
        return torch.stack(self.latents, dim=2)


class LatentAttention(nn.Module):
    """One head of attention from each position's latent to a set of vectors (B, T, S, C) or (B, S, C) shared
    by every position; its output projection starts at zero, so a new read block starts as the identity."""

    def __init__(self, n_embd):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(n_embd, n_embd, bias=False) for _ in range(3))
        self.out = nn.Linear(n_embd, n_embd, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, latent, keys):
        if keys.dim() == 3:  # one set for every position: (B, S, C) -> (B, T, S, C)
            keys = keys[:, None].expand(-1, latent.size(1), -1, -1)
        q = self.q(norm(latent))[:, :, None]  # (B, T, 1, C)
        k, v = self.k(norm(keys)), self.v(norm(keys))  # (B, T, S, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, T, 1, C): each position's own attention over S
        return latent + self.out(y[:, :, 0])


# ----------------------------------------------------------------------------- the model

class ThinkState:
    """One run over a batch: the input, the latent, the blocks each row ran, its last answer."""

    def __init__(self, idx, latent, store, memory):
        B = idx.size(0)
        self.idx, self.latent, self.store, self.memory = idx, latent, store, memory
        self.positions = torch.arange(idx.size(1), device=idx.device)
        self.steps = torch.zeros(B, dtype=torch.long, device=idx.device)   # blocks run per row (Stop is free)
        self.has_read = torch.zeros(B, dtype=torch.bool, device=idx.device)
        self.has_output = torch.zeros(B, dtype=torch.bool, device=idx.device)
        self.active = torch.ones(B, dtype=torch.bool, device=idx.device)
        self.logits = None   # (B, T, V): each row's last Output
        self.outputs = []    # every Output's logits, in order (the losses of a fixed schedule)
        self.since_detach = 0


class Th1nker(nn.Module):
    """A looped GPT (looped.py, inject=add) run block by block, with a probe and optional memories."""

    def __init__(self, model_args, config):
        super().__init__()
        config.check()
        if not model_args.get("n_core"):
            raise ValueError("a Th1nker runs a looped core: give model_args with n_core > 0 (looped.py)")
        if model_args.get("inject", "add") != "add" or model_args.get("prefix_token", -1) >= 0:
            raise ValueError("a Th1nker reads its input by addition (inject=add) and has no prefix-LM mask")
        self.core = build_model(model_args)
        self.config = config
        C = self.core.config.n_embd
        # the probe sees the pooled latent, the block that just ran and the blocks run so far (one-hot): a fixed
        # schedule is a function of the last two, so imitation can reach it; RL then learns from the first
        features = C + len(ACTIONS) + 1 + config.max_steps + 1
        self.probe = nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, len(ACTIONS)))
        self.read_latent = LatentAttention(C) if config.store else None
        self.read_memory = LatentAttention(C) if config.memory else None

    @property
    def vocab_size(self):
        return self.core.config.vocab_size

    def start(self, idx, memory=None):
        """A fresh run: random (or zero) latent, an empty store. memory: (B, S, C) long-term memory tokens."""
        shape = (*idx.shape, self.core.config.n_embd)
        latent = torch.randn(shape, device=idx.device) if self.config.init_state == "random" else \
            torch.zeros(shape, device=idx.device)
        return ThinkState(idx, latent, LatentStore(self.config.store_window) if self.config.store else None, memory)

    # ------------------------------------------------------------------------- the blocks

    def read(self, s):
        """Re-read the input (note 004: every Read, so a long run cannot drift from it)."""
        core = self.core
        e = core.embed(s.idx)
        for block in core.blocks[:core.loop.n_prelude]:
            e = core.run_block(block, e, s.positions)
        return norm(s.latent) + e

    def process(self, s):
        core, n = self.core, self.core.loop.n_prelude
        u = s.latent
        for block in core.blocks[n:n + core.loop.n_core]:
            u = core.run_block(block, u, s.positions)
        if self.config.state_noise and self.training:  # a latent the next step must clean up, not rely on exactly
            u = u + self.config.state_noise * u.pow(2).mean(-1, keepdim=True).sqrt() * torch.randn_like(u)
        return u

    def output(self, s):
        """Logits (B, T, padded V) of the latent as it is (the padding columns are scored as looped.py does,
        so training pushes them down; answers read the real vocabulary)."""
        core = self.core
        h = s.latent
        for block in core.blocks[core.loop.n_prelude + core.loop.n_core:]:
            h = core.run_block(block, h, s.positions)
        return core.lm_head(norm(h))

    def step(self, s, block, rows=None):
        """Run one block on the rows given ((B,) bool; all active rows if None); the others keep their latent."""
        rows = s.active if rows is None else rows & s.active
        if block == "S":
            s.active = s.active & ~rows
            return
        if block in "OL" and not bool(s.has_read[rows].all()):
            raise ValueError(f"{BLOCKS[block]} before any Read: the latent has not seen the input yet")
        s.steps = s.steps + rows
        if block == "O":
            padded = self.output(s)
            s.outputs.append(padded)
            logits = padded[..., :self.vocab_size]
            s.logits = logits if s.logits is None else torch.where(rows[:, None, None], logits, s.logits)
            s.has_output = s.has_output | rows
            return
        if block == "R":
            new = self.read(s)
            s.has_read = s.has_read | rows
        elif block == "P":
            new = self.process(s)
        elif block == "L":
            if s.store is None:
                raise ValueError("ReadLatent (L) needs store=True")
            new = self.read_latent(s.latent, s.store.read()) if len(s.store) else s.latent
        elif block == "M":
            if s.memory is None or self.read_memory is None:
                raise ValueError("ReadMemory (M) needs memory=True and memory tokens given to start()")
            new = self.read_memory(s.latent, s.memory)
        else:
            raise ValueError(f"unknown block {block!r}: the blocks are {', '.join(BLOCKS)}")
        s.latent = new if bool(rows.all()) else torch.where(rows[:, None, None], new, s.latent)
        if s.store is not None:
            s.store.write(s.latent)
        s.since_detach += 1
        if self.config.backprop_steps and s.since_detach >= self.config.backprop_steps:
            s.latent, s.since_detach = s.latent.detach(), 0

    def run(self, idx, schedule, targets=None, memory=None, state=None):
        """A fixed schedule over idx (B, T): (last logits (B, T, V), the mean loss over every Output or None,
        the state). state: continue an earlier run (its latent and store) on new input idx."""
        blocks = parse_schedule(schedule, self.config)
        s = self.start(idx, memory) if state is None else state
        if state is not None:
            s.idx, s.memory = idx, memory if memory is not None else s.memory
        for block in blocks:
            self.step(s, block)
        loss = None
        if targets is not None:
            loss = sum(F.cross_entropy(o.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
                       for o in s.outputs) / len(s.outputs)
        return s.logits, loss, s

    def forward(self, idx, targets=None, schedule=("R", "P", "O")):
        logits, loss, _ = self.run(idx, schedule, targets)
        return logits, loss

    # ------------------------------------------------------------------------- the probe

    def probe_logits(self, s, last):
        """(B, 4) logits over Read/Process/Output/Stop; impossible choices masked: a run starts with Read, Stop
        needs an Output first; at max_steps - 1 blocks only Output, then only Stop."""
        pooled = norm(s.latent.detach()).mean(1)  # (B, C): the probe watches, it does not steer the latent
        count = F.one_hot(s.steps.clamp_max(self.config.max_steps), self.config.max_steps + 1).float()
        features = torch.cat((pooled, F.one_hot(last, len(ACTIONS) + 1).float(), count), 1)  # last: 4 = none yet
        logits = self.probe(features)
        allowed = torch.ones_like(logits, dtype=torch.bool)
        allowed[:, 3] &= s.has_output
        allowed[s.steps == 0] = torch.tensor([True, False, False, False], device=logits.device)
        near_cap = s.steps >= self.config.max_steps - 1
        allowed[near_cap] = torch.tensor([False, False, True, False], device=logits.device)
        allowed[near_cap & s.has_output & (last == 2)] = torch.tensor([False, False, False, True],
                                                                       device=logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def run_probe(self, idx, sample=False, teacher=None, memory=None):
        """Run until every row has stopped, the probe choosing each row's next block (greedy, or sampled with
        sample=True). teacher: a fixed schedule whose choices are taken instead (imitation), the probe's
        log-probabilities of them still returned. Returns the state and the log-probabilities (B,) summed
        over each row's choices, and the probe's cross-entropy against the teacher (or None)."""
        s = self.start(idx, memory)
        B = idx.size(0)
        last = torch.full((B,), len(ACTIONS), dtype=torch.long, device=idx.device)  # nothing ran yet
        logp = torch.zeros(B, device=idx.device)
        imitation, t = [], 0
        if teacher is not None:
            teacher = parse_schedule(teacher)
            teacher += [] if teacher[-1] == "S" else ["S"]
        while bool(s.active.any()):
            logits = self.probe_logits(s, last)
            if teacher is not None:
                choice = torch.full((B,), ACTIONS.index(teacher[t]), dtype=torch.long, device=idx.device)
                imitation.append(F.cross_entropy(logits[s.active], choice[s.active]))
            elif sample:
                choice = torch.distributions.Categorical(logits=logits).sample()
            else:
                choice = logits.argmax(-1)
            chosen = F.log_softmax(logits, -1).gather(1, choice[:, None])[:, 0]
            logp = logp + torch.where(s.active, chosen, torch.zeros_like(chosen))
            active = s.active
            with torch.no_grad():  # the probe learns here; the blocks are trained by fixed schedules (run)
                for i, block in enumerate(ACTIONS):
                    if bool((active & (choice == i)).any()):
                        self.step(s, block, rows=active & (choice == i))
            last = torch.where(active, choice, last)
            t += 1
            if teacher is not None and t == len(teacher):
                break
        return s, logp, (sum(imitation) / len(imitation)) if imitation else None


# ----------------------------------------------------------------------------- long-term memory

def compress(thinker, idx, schedule):
    """Compressed signal tokens (note 004): a section idx (B, T) read and processed by `schedule` (no Output
    needed), its last position's latent (B, C) the section's memory token."""
    blocks = parse_schedule(list(schedule) + ["O"])[:-1]
    s = thinker.start(idx)
    for block in blocks:
        thinker.step(s, block)
    return s.latent[:, -1]


class LongTermMemory:
    """Memory tokens kept across runs in memory.py's KNNStore (exact top-k by dot product, LRU eviction).
    write(keys, tokens): the keys (unit-normalised here) are what retrieval compares a query with, e.g. the
    ReadMemory block's own key projection of each token; retrieve() returns the k tokens of the most similar keys."""

    def __init__(self, key_dim, n_embd, capacity=4096):
        from memory import KNNStore
        self.store = KNNStore(capacity, key_dim, n_embd, threshold=0.0)

    def __len__(self):
        return len(self.store)

    def write(self, keys, tokens):
        """keys (N, K), tokens (N, C)."""
        self.store.write(F.normalize(keys.detach().float(), dim=-1), tokens.detach().float())

    def retrieve(self, queries, k):
        """(B, k, C) the stored tokens whose keys are most similar (cosine) to each query (B, K)."""
        _, index = self.store.search(F.normalize(queries.detach().float(), dim=-1), k)
        self.store.touch(index)
        return self.store.values[index]

    def state_dict(self):
        return {"keys": self.store.keys, "values": self.store.values, "last_used": self.store.last_used,
                "clock": self.store.clock}

    def load_state_dict(self, state):
        self.store.keys, self.store.values = state["keys"], state["values"]
        self.store.last_used, self.store.clock = state["last_used"], state["clock"]


# ----------------------------------------------------------------------------- checkpoints

def train_step(thinker, optimizer, x, y, schedule, clip=1.0):
    """One AdamW step on the mean loss over the schedule's Outputs; returns the loss."""
    thinker.train()
    _, loss, _ = thinker.run(x, schedule, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(thinker.parameters(), clip)
    optimizer.step()
    return loss.item()


def save_thinker(path, thinker, model_args, tokenizer, optimizer=None, step=0, extra=None):
    """A µLM checkpoint: model_args and model are the looped core's (sample.py and serve.py run it as the
    schedule (R P) x loops O); th1nker holds the Th1nker's options and its own weights (probe, read blocks).
    tokenizer: the checkpoint's tokenizer meta (tokenizer.py), e.g. {"tokenizer": "char", "chars": "01^."}."""
    from checkpoint import save_checkpoint
    own = {k: v for k, v in thinker.state_dict().items() if not k.startswith("core.")}
    state = {"model_args": model_args, "model": thinker.core.state_dict(), "step": step, "val_loss": None,
             "tokenizer": tokenizer,
             "th1nker": {"config": asdict(thinker.config), "weights": own},
             "rng": {"torch": torch.get_rng_state()}}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    save_checkpoint(path, state | (extra or {}), kind="th1nker")


def load_thinker(path, optimizer_of=None):
    """(thinker, checkpoint dict) from save_thinker's file; optimizer_of(thinker) makes the optimizer whose
    state is restored (then in the dict under 'optimizer_obj'), and the torch RNG is restored for an exact resume."""
    from checkpoint import load_checkpoint
    state = load_checkpoint(path)
    if "th1nker" not in state:
        raise SystemExit(f"{path} is not a Th1nker checkpoint (kind {state.get('kind')!r}): "
                         "write one with experiments/th1nker_experiments.py")
    thinker = Th1nker(state["model_args"], ThinkerConfig(**state["th1nker"]["config"]))
    thinker.core.load_state_dict(state["model"])
    thinker.load_state_dict(state["th1nker"]["weights"], strict=False)
    if optimizer_of is not None:
        state["optimizer_obj"] = optimizer_of(thinker)
        if "optimizer" in state:
            state["optimizer_obj"].load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    return thinker, state


def step_reward(correct, steps, step_cost=0.0):
    """Note 004's reward correct x 1/steps, or with step_cost > 0 correct - step_cost x steps. Why the second:
    with 1/steps a right answer after 2 blocks is worth 8 right answers after 16, so a probe learns to stop early
    and be wrong; a small price per block keeps an answer worth more than any number of blocks it costs."""
    if step_cost > 0:
        return correct.float() - step_cost * steps.float()
    return correct.float() / steps.float().clamp_min(1)


def reinforce_loss(logp, correct, steps, baseline, step_cost=0.0):
    """REINFORCE with step_reward and a baseline (the running mean reward): the loss whose gradient raises the
    log-probability of choices that beat the baseline. Returns (loss, rewards (B,))."""
    reward = step_reward(correct, steps, step_cost)
    advantage = reward - baseline
    advantage = advantage / (advantage.std() + 1e-6) if advantage.numel() > 1 else advantage
    return -(advantage.detach() * logp).mean(), reward


def param_count(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def activation_bytes(fn):
    """(fn's result, bytes of the tensors autograd saves for backward while fn runs): the memory a
    training forward keeps alive until backward (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())

