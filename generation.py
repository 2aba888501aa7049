"""
Sampling from a GPT: the KV cache, the next-token sampler and the decode loop (its step compiled into one
CUDA graph on a GPU). model.py's GPT.generate and generate_stream call into here; serve.py batches many
requests over one KVCache.
"""
import copy
import time

import torch

MIN_TEMPERATURE = 1e-3  # below it (but above 0, greedy) sampling is greedy in all but overflow
NEVER = 2 ** 62  # the position of a cache slot no query may see: above every real position, so always masked


def check_sampling_args(temperature, top_k, top_p):
    if temperature < 0 or 0 < temperature < MIN_TEMPERATURE:
        # logits / 1e-300 overflow to inf, and sampling from them fails
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_runs(model):
    """One token through the model: weights with the right names but wrong shapes (a damaged or edited
    file) fail here, with a clear ValueError, rather than in the middle of a generation."""
    try:
        with torch.no_grad():
            model.next_logits(torch.zeros(1, 1, dtype=torch.long, device=model.rotary.cos.device))
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(f"the model does not run ({type(e).__name__}: {str(e)[:200]}): its file is damaged "
                         f"or was edited") from None


def sample_next_token(logits, temperature, top_k, top_p, generator=None):
    """One token per row of logits (B, V): greedy at temperature 0, else top-k then nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already cover top_p (the first is always kept)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def cache_length(needed, block_size):
    """KV cache slots for a generation that needs `needed` positions, rounded up to a power of two (at most
    twice its memory), so it is never refilled before its last token. A decode step is specialised to the
    cache's shape: a compiled one captures it in its graph, and on a GPU the eager step's attention builds a
    cuDNN plan for each new length (0.1-1 s on an H100: inside a 512-token timing it read 0.82x). Rounded,
    generations of 60 or 64 new tokens share one graph and one plan (BENCHMARKS.md, target 4)."""
    return min(block_size, 1 << (needed - 1).bit_length())


class KVCache:
    """Keys and values of every attention layer, preallocated at a fixed shape.

    New entries are written at their positions and attention reads the whole cache through a mask that
    hides the slots not yet written (`slots` holds the position each slot stands for): every decode step
    then has the same shapes, which is what lets torch.compile(mode="reduce-overhead") replay it as one
    CUDA graph. kv_heads: the key/value heads of each cache layer (a pruned layer may have fewer).
    """

    def __init__(self, kv_heads, head_size, batch_size, length, device, dtype):
        shapes = [(batch_size, h, length, head_size) for h in kv_heads]
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.slots = torch.arange(length, device=device)  # (length,), or (B, 1, 1, length) where rows differ
        self.layer_offset = 0  # looped.py: loop i writes its core layers this many cache layers further on

    def update(self, layer, k, v, positions):
        """Write k, v (B, nkv, T, hs) at positions (T,); return the layer's whole cache (B, nkv, length, hs)."""
        layer += self.layer_offset
        self.k[layer].index_copy_(2, positions, k.to(self.k[layer].dtype))  # autocast may hand in bf16
        self.v[layer].index_copy_(2, positions, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def tensors(self):
        """Every buffer the cache holds (a compiled decode step keeps their addresses fixed)."""
        return self.k + self.v

    def rows(self, start, stop):
        """The cache of batch rows start:stop, as views: writes land in this cache (serve.py's batch rows)."""
        view = copy.copy(self)
        view.k, view.v = [t[start:stop] for t in self.k], [t[start:stop] for t in self.v]
        if self.slots.dim() > 1:
            view.slots = self.slots[start:stop]
        return view

    def start_row(self, row, start):
        """Empty batch row `row` for a sequence whose first position is slot `start` (serve's batch rows start
        at different slots): the row's slots before `start` are hidden from its queries, and its tensors are
        zeroed as in a new cache (feedback.py's outputs: zeros are the state before the first position)."""
        length = self.slots.size(-1)
        if self.slots.dim() == 1:  # from now on each row has its own slot positions: (B, 1, 1, length)
            self.slots = self.slots.expand(self.k[0].size(0), 1, 1, length).clone()
        for t in self.tensors():
            t[row].zero_()
        self.slots[row].fill_(NEVER)
        self.slots[row, ..., start:] = torch.arange(start, length, device=self.slots.device)

    def move_row(self, source, dest):
        """Copy batch row `source` over row `dest` (serve.py keeps its live rows at the front)."""
        for t in self.tensors():
            t[dest].copy_(t[source])
        if self.slots.dim() > 1:
            self.slots[dest].copy_(self.slots[source])


def compiled_step(model, device):
    """model.next_logits compiled for decoding: with CUDA graphs on a GPU; on a CPU into inductor's C++, where
    an int8 export's matvecs read each weight byte once."""
    if device.type == "cpu":
        # no CUDA graphs on a CPU; inductor would fold each norm and residual add into every output row of
        # an int8 matvec and redo it per row; materialised, the int8 step runs at 2.1x float32's (BENCHMARKS.md)
        return torch.compile(model.next_logits, fullgraph=True, dynamic=False,
                             options={"realize_opcount_threshold": 0})
    return torch.compile(model.next_logits, mode="reduce-overhead", fullgraph=True, dynamic=False)


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None,
                    seed=None, use_cache=True, compile=False, **options):
    """Yield the next token (B,) for each step; temperature 0 is greedy decoding.

    options go to the model's forward (looped.py: `loops`, the test-time loop count, thinking longer per
    token). compile=True compiles the cached decode step (worth it for long samples).
    """
    check_sampling_args(temperature, top_k, top_p)
    options = {k: v for k, v in options.items() if v is not None}
    generator = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
    block_size = model.config.block_size
    decode_step = compiled_step(model, idx.device) if compile else model.next_logits
    cache, pos = None, 0  # pos: positions filled in the cache
    # the decode step's inputs live in fixed buffers, so its input shapes and strides never change
    last = torch.zeros(idx.size(0), 1, dtype=torch.long, device=idx.device)  # (B, 1) the newest token
    pos_t = torch.zeros(1, dtype=torch.long, device=idx.device)  # (1,) its position
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model.next_logits(idx[:, -block_size:], **options)
        elif cache is None or pos + 1 > block_size:
            # (re)fill the cache from the last block_size tokens: the same context the no-cache path sees,
            # so both paths produce identical tokens. The rotary tables carry the float dtype (a quantized
            # model's embedding is int8).
            length = cache_length(idx.size(1) + max_new_tokens, block_size)
            cache = model.make_cache(idx.size(0), length, idx.device, model.rotary.cos.dtype, **options)
            if compile:  # the cache's buffers keep their addresses, so the CUDA graph may write them
                for t in cache.tensors():
                    torch._dynamo.mark_static_address(t)
            context = idx[:, -block_size:]
            pos = context.size(1)
            logits = model.next_logits(context, cache, **options)
        else:
            last.copy_(idx[:, -1:])
            pos_t.fill_(pos)
            logits = decode_step(last, cache, pos_t, **options).clone()  # clone: the graph reuses its output
            pos += 1
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        if stop_token is not None:
            next_token = torch.where(finished, torch.full_like(next_token, stop_token), next_token)
            finished |= next_token == stop_token
        idx = torch.cat((idx, next_token[:, None]), dim=1)
        yield next_token
        if stop_token is not None and bool(finished.all()):
            return


def generate(model, idx, max_new_tokens, **sampling):
    """idx (B, T) followed by up to max_new_tokens sampled tokens (B, T + n)."""
    new = list(generate_stream(model, idx, max_new_tokens, **sampling))
    return torch.cat([idx] + [t[:, None] for t in new], dim=1)


def decode_speed(model, gen_tokens, compile):
    """(greedy tokens, decode tokens/s) of gen_tokens tokens at batch 1 from a one-token prompt."""
    device = model.rotary.cos.device
    prompt = torch.full((1, 1), model.config.vocab_size - 1, dtype=torch.long, device=device)
    stream = model.generate_stream(prompt, gen_tokens, temperature=0.0, compile=compile)
    # the prefill and, when compiling, the first decode steps (compilation, CUDA graph capture) stay untimed
    tokens = [int(t[0]) for _, t in zip(range(4 if compile else 1), stream)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    timed = [int(t[0]) for t in stream]
    return tokens + timed, len(timed) / (time.perf_counter() - t0)
