"""
Continuous batching for serve.py: the rows of every request on one model decode together, one forward pass
per token.

Every active row is a row of one KV cache. All rows write their newest token at one shared slot `pos`; a
row's earlier tokens sit right before it, from its own start slot (`KVCache.start_row` hides the slots
before it from the row's queries). Rotary attention depends only on the distance between positions, so a
row computes what it would alone. A new row is prefilled between decode steps and joins the next one. When
pos reaches block_size, `compact` re-prefills every row right-aligned at a lower pos (a row longer than the
context keeps its last block_size // 2 tokens: a sliding window).

The Batcher uses the model through three methods only: `prefill` (a row's context into its cache row),
`decode` (one forward pass over every row's newest token) and `sample`. A failure in one row (its seed,
its sampling) fails that row alone; the others keep going.

The decode step's shape follows the number of rows in use, and on a GPU its hundreds of small kernels are
launched one by one. decode_step="graph" runs every cache row instead (a row not in use computes values
nobody reads), its inputs in device buffers updated in place: a fixed-shape step, captured once as a CUDA
graph (generation.py's step_and_capture) and replayed per token. "padded" is that step without the graph,
on any device: what the graph replays, so tests on a CPU check it, and a GPU can tell a padding problem
from a capture problem. Sampling stays outside the step, per row.
"""
import codecs
import sys
import threading

import torch

from generation import compiled_step, sample_next_token, step_and_capture

DECODE_STEPS = ("eager", "padded", "graph")


class StopStrings:
    """Finds stop strings in text that arrives piece by piece, in time linear in the text: one
    Knuth-Morris-Pratt automaton per stop string, each new character fed once. Its state is the longest
    prefix of the stop string that ends the text so far: the tail to hold back until it is decided."""

    def __init__(self, stops):
        self.stops = list(stops)
        self.fallback = [self.failure_table(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # per stop string: how many of its characters end the text

    @staticmethod
    def failure_table(s):
        """table[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
        table, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = table[k - 1]
            if s[i] == s[k]:
                k += 1
            table[i] = k
        return table

    def feed(self, text, offset):
        """Take the text's next characters (`text`, starting at index `offset` of the whole text). Returns
        where the earliest complete stop string starts in the whole text, or None."""
        first = None
        for j, s in enumerate(self.stops):
            k, table = self.matched[j], self.fallback[j]
            for i, c in enumerate(text):
                while k and s[k] != c:
                    k = table[k - 1]
                if s[k] == c:
                    k += 1
                if k == len(s):
                    start = offset + i + 1 - k
                    first = start if first is None else min(first, start)
                    break
            self.matched[j] = k
        return first

    def held(self):
        """Characters at the end of the text that may be the start of a stop string."""
        return max(self.matched, default=0)


class Row:
    """One sequence being generated: its tokens, its sampling settings, and where its events go.

    emit receives {"text", "logprobs", "finish_reason"} for each token, or {"error"} once if the row fails.
    """

    def __init__(self, context, max_new, temperature, top_k, top_p, seed, logprobs, stop, ignore_eos, echo_logprobs,
                 tokenizer, emit):
        self.ids = list(context)        # prompt then sampled tokens; the last one is not in the cache yet
        self.max_new, self.temperature, self.top_k, self.top_p = max_new, temperature, top_k, top_p
        self.seed, self.generator = seed, None  # the generator is made on the batcher's device
        self.logprobs, self.ignore_eos, self.echo_logprobs = logprobs, ignore_eos, echo_logprobs
        self.stops = StopStrings(stop)
        self.tokenizer, self.emit = tokenizer, emit
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # BPE tokens can split a character
        self.prompt_logprobs = self.prompt_top = None  # echoed prompt tokens' (first None, as OpenAI's)
        self.text, self.sent, self.new, self.cancelled, self.done = "", 0, 0, False, False

    def add(self, token, logprob, top):
        """Take one sampled token; emit the text that is now certain, and finish at EOT, a stop string or max_new."""
        self.new += 1
        finish = None
        info = {"token": self.tokenizer.decode([token]), "logprob": logprob, "top": top}
        if token == self.tokenizer.eot and not self.ignore_eos:
            finish = "stop"
        else:
            self.ids.append(token)
            piece = self.decoder.decode(self.tokenizer.decode_bytes([token]))
            cut = self.stops.feed(piece, len(self.text))
            self.text += piece
            if cut is not None:
                self.text, finish = self.text[:cut], "stop"
            elif self.new >= self.max_new:
                finish = "length"
        ready = len(self.text) if finish else len(self.text) - self.stops.held()  # hold back a possible stop
        delta, self.sent = self.text[self.sent:ready], max(self.sent, ready)
        self.done = finish is not None
        self.emit({"text": delta, "logprobs": info, "finish_reason": finish})

    def fail(self, message):
        """End the row with an error event (once)."""
        if not self.done:
            self.done = True
            self.emit({"error": message})


def error_text(e):
    return f"{type(e).__name__}: {e}"


def check_decode_step(decode_step, compile, device):
    if decode_step not in DECODE_STEPS:
        raise ValueError(f"decode_step must be one of {', '.join(DECODE_STEPS)}, got {decode_step!r}")
    if decode_step == "graph" and device.type != "cuda":
        raise ValueError(f"decode_step='graph' replays the decode step as a CUDA graph: it needs a CUDA device, not "
                         f"{device.type} ('padded' runs the same fixed-shape step without the graph)")
    if compile and decode_step == "eager":
        raise ValueError("compile=True compiles the fixed-shape decode step: it needs decode_step='padded' or 'graph' "
                         "(the eager step's shape changes with the rows in use)")


class Batcher:
    """Continuous batching over one model (with fixed forward options: looped.py's `loops`): a thread that
    admits waiting rows between decode steps and runs one forward pass per step over all active rows.

    decode_step: "eager" (rows in use, kernel by kernel), "padded" (every cache row, a fixed shape) or "graph"
    (the padded step as a CUDA graph); compile: the padded step compiled by inductor (generation.compiled_step)."""

    def __init__(self, model, tokenizer, max_batch, max_waiting, seed, options=None, decode_step="eager",
                 compile=False):
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.options = options or {}
        self.device = model.rotary.cos.device  # the rotary tables carry the float dtype (an export's embedding may be int8)
        check_decode_step(decode_step, compile, self.device)
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.cache = model.make_cache(max_batch, self.config.block_size, self.device, model.rotary.cos.dtype,
                                      **self.options)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.decode_step, self.padded = decode_step, decode_step != "eager"
        if self.padded:
            self.make_padded_step(compile)
        self.rows, self.waiting, self.pos, self.closed = [], [], 0, False
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self.run, daemon=True, name="batcher")
        self.thread.start()

    def cache_bytes(self):
        return sum(t.numel() * t.element_size() for t in self.cache.tensors())

    def submit(self, rows):
        """Queue rows for the next step; an error message if they cannot be taken."""
        with self.wake:
            if self.closed:
                return "this model was just unloaded to make room; retry"
            if len(self.waiting) + len(rows) > self.max_waiting:
                return f"{self.max_waiting} rows are already waiting for this model (max_waiting); retry shortly"
            self.waiting.extend(rows)
            self.wake.notify()
        return None

    def close(self):
        """Stop the thread once idle, so an unloaded model's weights and cache are freed."""
        with self.wake:
            self.closed = True
            self.wake.notify()

    def busy(self):
        return bool(self.rows or self.waiting)

    # the model: prefill, decode

    def prefill(self, i, context, logits_for="last"):
        """Write context (list of ids) into row i right-aligned before self.pos; logits of the last token
        (V,), of every token (T, V) with logits_for='all', or None."""
        start = self.pos - len(context)
        self.cache.start_row(i, start)
        idx = torch.tensor([context], dtype=torch.long, device=self.device)
        h = self.model.hidden(idx, self.cache.rows(i, i + 1), pos=start, **self.options)  # (1, T, C)
        if logits_for is None:
            return None
        h = h[0] if logits_for == "all" else h[0, -1]
        return self.model.lm_head(h).float()[..., :self.config.vocab_size]

    def decode(self):
        """Logits (n, V) of the next token of every active row, from one forward pass over their newest tokens."""
        if self.padded:
            return self.decode_padded()
        n = len(self.rows)
        last = torch.tensor([[r.ids[-1]] for r in self.rows], dtype=torch.long, device=self.device)  # (n, 1)
        logits = self.model.next_logits(last, self.cache.rows(0, n), pos=self.pos, **self.options)  # (n, V)
        self.pos += 1
        return logits

    # the padded decode step: every cache row, a fixed shape, so a CUDA graph can replay it

    def make_padded_step(self, compile):
        """The buffers the padded step reads and writes, made once (a CUDA graph holds their addresses)."""
        # each row's slots from now on (B, 1, 1, length), all visible: start_row then only writes into this tensor
        self.cache.start_row(0, 0)
        self.free_slots = self.cache.slots[0].clone()  # (1, 1, length): the slots of a row not in use
        self.last = torch.zeros(self.max_batch, 1, dtype=torch.long, device=self.device)  # (B, 1) newest tokens
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # (1,) the slot they are written at
        self.logits = torch.zeros(self.max_batch, self.config.vocab_size, device=self.device)  # (B, V)
        self.step = compiled_step(self.model, self.device, own_graph=True) if compile else self.model.next_logits
        self.graph, self.graph_addresses = None, None
        self.capture = self.decode_step == "graph"  # at the next step; False once tried

    def padded_step(self):
        """Device work only, no host reads: what the CUDA graph holds."""
        self.logits.copy_(self.step(self.last, self.cache, pos=self.position, **self.options))

    def buffer_addresses(self):
        """Where every tensor the padded step reads or writes lives: a graph replays those addresses."""
        return [t.data_ptr() for t in [*self.cache.tensors(), self.cache.slots, self.last, self.position, self.logits]]

    def decode_padded(self):
        """decode's logits (n, V), from the padded step over all max_batch rows (replayed once captured)."""
        n = len(self.rows)
        self.last[:n].copy_(torch.tensor([[r.ids[-1]] for r in self.rows]))  # (n, 1), from the host
        self.position.fill_(self.pos)
        if self.graph is not None and self.buffer_addresses() != self.graph_addresses:
            self.graph, self.capture = None, True  # a buffer was reallocated: the graph would read freed memory
        if self.graph is not None:
            self.graph.replay()
        elif self.capture:  # this token's step, then its capture for the next ones (None if it cannot be captured)
            self.graph = step_and_capture(self.padded_step, None, self.device)
            self.graph_addresses, self.capture = self.buffer_addresses(), False
        else:
            self.padded_step()
        self.pos += 1
        return self.logits[:n]

    # rows in and out of the cache

    def cached_length(self, row):
        """How many of a row's tokens (all but the newest) to keep in the cache at a compaction."""
        n = len(row.ids) - 1
        return n if n <= self.config.block_size - 2 else self.config.block_size // 2

    def compact(self, at_least=0):
        live = [(i, row) for i, row in enumerate(self.rows) if not row.done and not row.cancelled]
        self.pos = max([self.cached_length(row) for _, row in live] + [at_least])
        for i, row in live:
            self.prefill(i, row.ids[:-1][-self.cached_length(row):], logits_for=None)
        if self.padded:
            self.free_rows({i for i, _ in live})

    def free_rows(self, live):
        """Make every cache row but the live ones see slots 0..pos. The padded step runs them too, and a row
        started at a slot above the new pos would see no slot at all: its attention may be NaN on a GPU (no
        other row reads it, but a check of the logits would trip on it). Only compact lowers pos while rows run
        (an emptied batch's pos = 0 is followed by a compaction before the next step), so every row then
        attends over at least slot 0."""
        for i in range(self.max_batch):
            if i not in live:
                self.cache.slots[i].copy_(self.free_slots)

    def admit(self, row):
        """Prefill a row into the next free cache row and sample its first token. A failure here (its seed,
        its prompt's forward pass) fails this row alone: it wrote only its own cache row."""
        try:
            if row.seed is not None:
                row.generator = torch.Generator(device=self.device).manual_seed(row.seed)
            self.rows.append(row)
            logits = self.prefill(len(self.rows) - 1, row.ids, "all" if row.echo_logprobs else "last")
            if row.echo_logprobs:
                row.prompt_logprobs, row.prompt_top = self.prompt_logprobs(row, logits[:-1])
                logits = logits[-1]
            self.sample([row], logits[None])
        except Exception as e:
            row.fail(f"generation failed: {error_text(e)}")
            if self.rows and self.rows[-1] is row:
                self.rows.pop()

    def prompt_logprobs(self, row, logits):
        """Each prompt token's log-probability given the tokens before it, and {token: logprob} of the row's
        `logprobs` likeliest there (lm-eval's loglikelihood reads both); the first token has neither."""
        logp = torch.log_softmax(logits, dim=-1)  # (T - 1, V)
        targets = torch.tensor(row.ids[1:], device=self.device)[:, None]
        chosen = [None] + logp.gather(1, targets)[:, 0].tolist()
        top = [None] + self.top_logprobs(logp, row.logprobs) if row.logprobs else [None] * len(row.ids)
        return chosen, top

    def remove(self, i):
        """Drop row i: the last row moves into its place, so the active rows stay rows 0..n-1."""
        last = len(self.rows) - 1
        if i != last:
            self.cache.move_row(last, i)
            self.rows[i] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.pos = 0

    # sampling

    def sample(self, rows, logits):
        """One token per row from logits (B, V): rows with the same settings and no seed in one call. A row
        whose sampling fails is failed alone."""
        groups = {}
        for i, row in enumerate(rows):
            key = ("seeded", i) if row.generator is not None else (row.temperature, row.top_k, row.top_p)
            groups.setdefault(key, []).append(i)
        tokens = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        failed = set()
        for members in groups.values():
            row, index = rows[members[0]], torch.tensor(members, device=self.device)
            try:
                tokens[index] = sample_next_token(logits[index], row.temperature, row.top_k, row.top_p,
                                                  row.generator or self.generator)
            except Exception as e:  # e.g. a distribution with inf or nan
                for i in members:
                    rows[i].fail(f"sampling failed: {error_text(e)}")
                failed.update(members)
        chosen, alternatives = self.logprobs_of(rows, logits, tokens)
        tokens = tokens.tolist()
        for i, row in enumerate(rows):
            if i not in failed:
                row.add(tokens[i], chosen[i], alternatives[i])

    def logprobs_of(self, rows, logits, tokens):
        """Per row: the chosen token's log-probability and {token: logprob} of its `logprobs` likeliest
        (the model's own distribution, before temperature), or None where the row asked for none."""
        chosen, alternatives = [None] * len(rows), [None] * len(rows)
        if all(r.logprobs is None for r in rows):
            return chosen, alternatives
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
        k = max(r.logprobs or 0 for r in rows)
        if k:
            alternatives = [top if r.logprobs else None
                            for r, top in zip(rows, self.top_logprobs(logp, k, [r.logprobs for r in rows]))]
        return chosen, alternatives

    def top_logprobs(self, logp, k, counts=None):
        """{token text: logprob} of the k likeliest tokens of each row of logp (n, V), likeliest first (the
        first `counts[i]` of row i). Two ids that decode to the same text keep the likelier one's logprob."""
        top = torch.topk(logp, min(k, logp.size(-1)))
        found = []
        for i, (ids, values) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
            entry = {}
            for t, v in list(zip(ids, values))[:counts[i] if counts else k]:
                entry.setdefault(self.tokenizer.decode([t]), v)
            found.append(entry)
        return found

    # the thread

    def take_waiting(self):
        """The rows to admit now (blocks while there is nothing to do); None once closed and idle."""
        with self.wake:
            while not self.rows and not self.waiting:
                if self.closed:
                    return None
                self.wake.wait()
            admitted = self.waiting[:self.max_batch - len(self.rows)]
            del self.waiting[:len(admitted)]
            return admitted

    def admit_all(self, rows):
        for row in rows:
            if row.cancelled:
                continue
            row.ids = row.ids[-self.config.block_size:]  # like sample.py: the last block_size tokens of a long prompt
            if len(row.ids) > self.pos:
                self.compact(at_least=len(row.ids))  # every row's cache: a failure here is every row's
            self.admit(row)

    @torch.no_grad()
    def run(self):
        while True:
            admitted = self.take_waiting()
            if admitted is None:
                return
            try:
                self.admit_all(admitted)
                for i in reversed(range(len(self.rows))):
                    if self.rows[i].done or self.rows[i].cancelled:
                        self.remove(i)
                if self.rows:
                    if self.pos >= self.config.block_size:
                        self.compact()
                    self.sample(self.rows, self.decode())
            except Exception as e:  # the shared cache or forward pass failed (a bug, out of memory): every row says so
                print(f"batcher error: {error_text(e)}", file=sys.stderr)
                for row in self.rows + admitted:
                    row.fail(f"generation failed: {error_text(e)}")
                self.rows, self.pos = [], 0
