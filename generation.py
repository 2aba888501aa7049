"""
Sampling from a GPT: the KV cache, the next-token sampler and the decode loop. model.py's GPT.generate and
generate_stream call into here; serve.py batches many requests over one KVCache.

On a GPU a cached decode step is a few hundred small kernels; launched one by one from Python, a 124M model's
took ~8-14 ms a token (BENCHMARKS.md, sampling). So the whole step (the model on the newest token, the sampler
and the bookkeeping) is captured once as a CUDA graph and replayed for every token: one launch, no host sync.
compile=True compiles the step first (inductor fuses its kernels) and captures that.
"""
import collections
import copy
import time
import warnings

import torch

MIN_TEMPERATURE = 1e-3  # below it (but above 0, greedy) sampling is greedy in all but overflow
NEVER = 2 ** 62  # the position of a cache slot no query may see: above every real position, so always masked
STOP_CHECK_EVERY = 16  # on a GPU, tokens between reads of "has every row stopped?" (each read waits for the device)
GRAPH_MIN_TOKENS = 4   # a CUDA graph's capture costs about one eager step: it pays from a few tokens on


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
    # torch.multinomial's own one-sample path written out (argmax of p / q, q ~ Exp(1): the Gumbel-max trick), so
    # the same generator gives the same tokens; without multinomial's checks of p on the host (in some torch
    # versions), so the sampler runs inside a CUDA graph
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


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


def compiled_step(model, device, own_graph=False, options=None):
    """model.next_logits compiled for decoding. On a CPU into inductor's C++, where an int8 export's matvecs read
    each weight byte once. On a GPU either for capture in generation's own CUDA graph (own_graph=True: inductor's
    kernels, no graph of torch.compile's) or as torch.compile's mode="reduce-overhead" CUDA graph (the path before
    BENCHMARKS.md's round three). options: inductor's, e.g. {"coordinate_descent_tuning": True}."""
    if device.type == "cpu":
        # no CUDA graphs on a CPU; inductor would fold each norm and residual add into every output row of
        # an int8 matvec and redo it per row; materialised, the int8 step runs at 2.1x float32's (BENCHMARKS.md)
        return torch.compile(model.next_logits, fullgraph=True, dynamic=False,
                             options={"realize_opcount_threshold": 0, **(options or {})})
    if own_graph:
        return torch.compile(model.next_logits, fullgraph=True, dynamic=False, options=options or None)
    if options:  # torch.compile takes a mode or options, not both; this option is what the mode sets
        return torch.compile(model.next_logits, fullgraph=True, dynamic=False,
                             options={"triton.cudagraphs": True, **options})
    return torch.compile(model.next_logits, mode="reduce-overhead", fullgraph=True, dynamic=False)


def use_graph(graph, device, use_cache):
    """Whether to replay the cached decode step as a CUDA graph: graph=None picks it on a CUDA device."""
    if graph is None:
        return device.type == "cuda" and use_cache
    if graph and (device.type != "cuda" or not use_cache):
        raise ValueError(f"graph=True replays the cached decode step as a CUDA graph: it needs a CUDA device and "
                         f"use_cache=True (device {device.type}, use_cache={use_cache})")
    return bool(graph)


class Decoding:
    """The fixed buffers one generation decodes through: every token so far in one (B, T + n) buffer, so no
    torch.cat per token; the decode step's inputs (the newest token and its position); which rows have stopped.
    A captured CUDA graph reads and writes exactly these tensors, so they are made once and updated in place."""

    def __init__(self, idx, max_new_tokens, stop_token):
        B, T = idx.shape
        self.tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # (B, T + n)
        self.tokens[:, :T] = idx
        self.length = T  # tokens written so far, on the host
        self.column = torch.full((1,), T, dtype=torch.long, device=idx.device)  # the same, on the device
        self.last = torch.zeros(B, 1, dtype=torch.long, device=idx.device)  # (B, 1) the newest token
        self.pos = torch.zeros(1, dtype=torch.long, device=idx.device)  # (1,) its position in the cache
        self.finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        self.stop_token = stop_token

    def context(self, block_size):
        """The last block_size tokens (B, <= block_size): what a refill or the no-cache path reads."""
        return self.tokens[:, max(0, self.length - block_size):self.length]

    def append(self, token):
        """Write the sampled token (B,) as the newest, the next step's input one position on; device work only
        (a row that has stopped keeps emitting the stop token), so a CUDA graph can hold it."""
        if self.stop_token is not None:
            token = torch.where(self.finished, self.stop_token, token)
            self.finished |= token == self.stop_token
        self.tokens.index_copy_(1, self.column, token[:, None])
        self.column += 1
        self.last.copy_(token[:, None])
        self.pos += 1


def capture_graph(fn, generator=None):
    """fn captured as a CUDA graph (not run): replay() runs its kernels. Unlike torch.cuda.graph this leaves the
    allocator's cache alone, so a process that trains between generations keeps its memory."""
    graph = torch.cuda.CUDAGraph()
    if generator is not None:  # a seeded sampler: each replay must draw new numbers from it
        graph.register_generator_state(generator)
    graph.capture_begin()
    try:
        fn()
    finally:
        graph.capture_end()
    return graph


def step_and_capture(fn, generator, device):
    """Run fn (this token's step), then capture it for the next tokens; both on a side stream, as torch.cuda.graphs
    prescribes: the first run makes, for that stream, what a capture must not (cuBLAS's workspace, cuDNN's plans,
    compiled kernels). Returns the graph, or None (run_then_capture)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.device(device), torch.cuda.stream(side):
        graph = run_then_capture(fn, generator, side.synchronize)
    torch.cuda.current_stream(device).wait_stream(side)
    return graph


def run_then_capture(fn, generator, wait):
    """fn(), then its graph; None after a warning where the step cannot be captured (a research model whose step
    reads a value on the host): that generation then decodes step by step, its token made by the first run."""
    fn()
    wait()
    try:
        return capture_graph(fn, generator)
    except RuntimeError as e:
        warnings.warn(f"the decode step could not be captured as a CUDA graph ({str(e).splitlines()[0][:200]}); "
                      f"decoding step by step: pass graph=False to skip the attempt")
        return None


def stop_check_every(device):
    """Steps between reads of "has every row stopped?". Each read waits for the device, so on a GPU it is read every
    STOP_CHECK_EVERY steps (stopped rows emit the stop token meanwhile); on a CPU every step: it costs nothing."""
    return 1 if device.type == "cpu" else STOP_CHECK_EVERY


def stopped(state, steps):
    if state.stop_token is None or steps % stop_check_every(state.finished.device):
        return False
    return bool(state.finished.all())


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None,
                    seed=None, use_cache=True, compile=False, graph=None, compile_options=None, **options):
    """Yield the next token (B,) for each step; temperature 0 is greedy decoding. Each yielded token is a view
    into the generation's token buffer, written on the device: reading it (int(), .tolist()) waits for the step.

    graph (None: on a CUDA device): the cached decode step (model, sampler, bookkeeping) is captured once as a
    CUDA graph and replayed per token; False launches its kernels one by one (the path before round three).
    compile=True compiles the step first (inductor's fused kernels; compile_options are inductor's), which takes
    seconds to a minute once per process (BENCHMARKS.md, "Speed, round three", says when it pays).
    options go to the model's forward (looped.py: `loops`, the test-time loop count, thinking longer per token).
    """
    check_sampling_args(temperature, top_k, top_p)
    options = {k: v for k, v in options.items() if v is not None}
    device, block_size = idx.device, model.config.block_size
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    graph = use_graph(graph, device, use_cache)
    step = model.next_logits
    if compile:
        compiled = compiled_step(model, device, own_graph=graph, options=compile_options)
        reduce_overhead = device.type == "cuda" and not graph  # its graph reuses its output: clone before the next
        step = (lambda *a, **k: compiled(*a, **k).clone()) if reduce_overhead else compiled
    state = Decoding(idx, max_new_tokens, stop_token)
    cache, pos, replay, capture = None, 0, None, graph  # pos: positions filled in the cache

    def sample(logits):
        return sample_next_token(logits, temperature, top_k, top_p, generator)

    def cached_step():  # the step a CUDA graph holds: device work only, no host reads
        state.append(sample(step(state.last, cache, state.pos, **options)))

    for i in range(max_new_tokens):
        n = state.length
        if not use_cache:
            state.append(sample(model.next_logits(state.context(block_size), **options)))
        elif cache is None or pos + 1 > block_size:
            # (re)fill the cache from the last block_size tokens: the same context the no-cache path sees, so both
            # paths produce identical tokens. The rotary tables carry the float dtype (a quantized model's
            # embedding is int8). A refilled cache is a new one: past the block every step refills.
            length = cache_length(idx.size(1) + max_new_tokens, block_size)
            cache = model.make_cache(idx.size(0), length, device, model.rotary.cos.dtype, **options)
            if compile and not graph:  # the buffers keep their addresses, so torch.compile's CUDA graph may write them
                for t in cache.tensors():
                    torch._dynamo.mark_static_address(t)
            context = state.context(block_size)
            pos = context.size(1)
            logits = model.next_logits(context, cache, **options)
            state.pos.fill_(pos - 1)  # append moves it to the sampled token's position
            state.append(sample(logits))
        elif replay is not None:
            replay.replay()
            pos += 1
        else:
            if capture and max_new_tokens - i >= GRAPH_MIN_TOKENS:  # this token's step, then the capture
                replay, capture = step_and_capture(cached_step, generator, device), False
            else:
                cached_step()
            pos += 1
        state.length += 1
        yield state.tokens[:, n]
        if stopped(state, i + 1):
            return


def generate(model, idx, max_new_tokens, **sampling):
    """idx (B, T) followed by up to max_new_tokens sampled tokens (B, T + n): with a stop token, up to the step at
    which every row had emitted it."""
    new = list(generate_stream(model, idx, max_new_tokens, **sampling))
    stop = sampling.get("stop_token")
    if stop is not None and new:  # a GPU stream learns of the stop a few steps late: drop those steps
        done = torch.stack(new, 1).eq(stop).int().cummax(1).values.bool().all(0)  # (n,) every row stopped by then
        if bool(done.any()):
            new = new[:int(done.int().argmax()) + 1]
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


def host_tokens(stream, lag=8):
    """The tokens of a generate_stream as lists of ints (one per row), read up to `lag` steps behind the device:
    each step's copy to the host is queued without waiting, so a GPU never idles while the host prints a token
    (reading each token at once would wait for every step, and the next could only be launched after it)."""
    pending = collections.deque()
    for token in stream:
        if token.device.type != "cuda" or lag == 0:
            yield token.tolist()
            continue
        host = torch.empty(token.shape, dtype=token.dtype, pin_memory=True)
        host.copy_(token, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        pending.append((host, copied))
        if len(pending) > lag:
            yield read_when_copied(*pending.popleft())
    while pending:
        yield read_when_copied(*pending.popleft())


def read_when_copied(host, copied):
    copied.synchronize()
    return host.tolist()
