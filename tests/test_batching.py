"""batching.py: rows of different lengths decoded together give each row the tokens it would get alone
(plain, feedback, looped at any loop count, structurally pruned models), the fixed-shape decode step (padded
to every cache row, and captured as a graph) gives the eager step's tokens, a failing row fails alone, and
the stop-string check is linear."""
import queue
import string
import time

import pytest
import torch

import compress
from architecture import build_model
from batching import Batcher, Row, StopStrings
from graph_fakes import StandInGraph
from tokenizer import CharTokenizer

TOKENIZER = CharTokenizer(string.ascii_lowercase + " .")
SHAPE = dict(vocab_size=TOKENIZER.n_vocab, block_size=64, n_layer=2, n_head=4, n_embd=32)
PROMPTS = ["the fox", "a", "jumps over the lazy dog", "lo"]  # rows of different lengths share one batch


def tiny_model(**options):
    """A random model in float64 (so batched and alone agree to the last bit of every greedy choice)
    with weights scaled up so its distributions are peaked, as a trained model's are."""
    torch.manual_seed(0)
    model = build_model({**SHAPE, **options})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    return model.double().eval()


def collect(batcher, prompts, max_new, **row_options):
    """Submit one row per prompt at once; {prompt: (token ids, finish reason or error)}."""
    events = {p: queue.Queue() for p in prompts}
    rows = []
    for p in prompts:
        settings = dict(temperature=0.0, top_k=None, top_p=1.0, seed=None, logprobs=None, stop=[],
                        ignore_eos=True, echo_logprobs=False) | row_options.get(p, {})
        rows.append(Row(TOKENIZER.encode(p), max_new, tokenizer=TOKENIZER, emit=events[p].put, **settings))
    assert batcher.submit(rows) is None
    out = {}
    for p, row in zip(prompts, rows):
        while True:
            event = events[p].get(timeout=60)
            if "error" in event:
                out[p] = (row.ids[len(TOKENIZER.encode(p)):], event["error"])
                break
            if event["finish_reason"]:
                out[p] = (row.ids[len(TOKENIZER.encode(p)):], event["finish_reason"])
                break
    return out


def alone(model, prompt, max_new, **options):
    ids = TOKENIZER.encode(prompt)
    return model.generate(torch.tensor([ids]), max_new, temperature=0, **options)[0, len(ids):].tolist()


@pytest.mark.parametrize("options", [{}, {"feedback": 1}, {"n_prelude": 1, "n_core": 1, "n_coda": 0, "loops": 2}],
                         ids=["plain", "feedback", "looped"])
def test_batched_greedy_tokens_equal_generate_alone(options):
    model = tiny_model(**options)
    batcher = Batcher(model, TOKENIZER, max_batch=4, max_waiting=8, seed=0)
    got = collect(batcher, PROMPTS, 12)
    batcher.close()
    assert {p: ids for p, (ids, _) in got.items()} == {p: alone(model, p, 12) for p in PROMPTS}


def test_a_looped_model_at_another_loop_count_equals_generate_at_that_count():
    model = tiny_model(n_prelude=1, n_core=1, n_coda=0, loops=2)
    batcher = Batcher(model, TOKENIZER, max_batch=4, max_waiting=8, seed=0, options={"loops": 5})
    got = collect(batcher, PROMPTS, 10)
    batcher.close()
    assert {p: ids for p, (ids, _) in got.items()} == {p: alone(model, p, 10, loops=5) for p in PROMPTS}
    assert alone(model, "lo", 10, loops=5) != alone(model, "lo", 10, loops=2)  # the count matters


def test_a_structurally_pruned_model_serves_its_own_tokens():
    model = tiny_model()
    compress.structured_prune(model, 0.5)  # layers keep fewer heads than the config says: smaller caches
    assert model.blocks[0].attn.n_head < SHAPE["n_head"]
    batcher = Batcher(model, TOKENIZER, max_batch=4, max_waiting=8, seed=0)
    got = collect(batcher, PROMPTS, 12)
    batcher.close()
    assert {p: ids for p, (ids, _) in got.items()} == {p: alone(model, p, 12) for p in PROMPTS}


def test_feedback_rows_past_the_context_window_keep_generating():
    model = tiny_model(feedback=1)
    batcher = Batcher(model, TOKENIZER, max_batch=2, max_waiting=8, seed=0)
    got = collect(batcher, ["the fox", "a"], 140)  # 140 > block_size: the cache is compacted several times
    batcher.close()
    assert [len(ids) for ids, _ in got.values()] == [140, 140]
    assert got["a"][0][:20] == alone(model, "a", 20)


def test_a_row_that_fails_fails_alone_and_the_others_finish():
    batcher = Batcher(tiny_model(), TOKENIZER, max_batch=4, max_waiting=8, seed=0)
    bad_seed = {"seed": 2 ** 70}  # a torch.Generator cannot take it (the API refuses it before this point)
    got = collect(batcher, PROMPTS, 12, **{"a": bad_seed})
    assert "Overflow" in got["a"][1]
    assert all(got[p][1] == "length" and len(got[p][0]) == 12 for p in PROMPTS if p != "a")
    later = collect(batcher, ["lo"], 3)  # and the batcher serves on
    batcher.close()
    assert later["lo"][1] == "length"


def test_a_row_whose_sampling_fails_mid_generation_fails_alone(monkeypatch):
    import batching
    real = batching.sample_next_token
    calls = {"n": 0}

    def flaky(logits, temperature, *args):
        calls["n"] += 1
        if temperature == 0.5 and calls["n"] > 6:  # the temperature-0.5 row's sampling breaks a few tokens in
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, temperature, *args)
    monkeypatch.setattr(batching, "sample_next_token", flaky)
    batcher = Batcher(tiny_model(), TOKENIZER, max_batch=4, max_waiting=8, seed=0)
    got = collect(batcher, PROMPTS, 20, **{"lo": {"temperature": 0.5}})
    batcher.close()
    assert "sampling failed" in got["lo"][1] and len(got["lo"][0]) < 20
    assert all(got[p][1] == "length" and len(got[p][0]) == 20 for p in PROMPTS if p != "lo")


# ----------------------------------------------------------------------------- the padded decode step

def run_schedule(batcher, schedule):
    """Greedy rows submitted on a fixed schedule; {prompt: new token ids}. schedule: (prompt, max_new, after),
    after None (at the start) or (prompt, n): once that row has n new tokens. A row is submitted from inside its
    trigger's emit, on the batcher's thread, so every run takes the same steps (admissions, compactions)."""
    rows, finished = {}, queue.Queue()

    def make(prompt, max_new):
        def emit(event):
            for p, m, after in schedule:
                if after == (prompt, rows[prompt].new):
                    assert batcher.submit([make(p, m)]) is None
            if "error" in event or event["finish_reason"]:
                finished.put(event.get("error"))
        rows[prompt] = Row(TOKENIZER.encode(prompt), max_new, 0.0, None, 1.0, None, None, [], True, False,
                           TOKENIZER, emit)
        return rows[prompt]
    assert batcher.submit([make(p, m) for p, m, after in schedule if after is None]) is None
    assert [finished.get(timeout=60) for _ in schedule] == [None] * len(schedule)
    return {p: row.ids[len(TOKENIZER.encode(p)):] for p, row in rows.items()}


SCHEDULE = [
    ("a", 100, None),                         # runs past block_size twice: compactions, then a sliding window
    ("the fox", 10, None),                    # removed early from the middle: the last row moves into its place
    ("jumps over the lazy dog", 40, None),
    ("lo", 5, ("a", 20)),                     # admitted mid-way
    ("z", 3, ("a", 35)),                      # starts at a slot above the pos the next compaction sets
    ("over", 30, ("a", 50)),                  # admitted after a compaction
]


@pytest.mark.parametrize("options", [{}, {"feedback": 1}, {"n_prelude": 1, "n_core": 1, "n_coda": 0, "loops": 2}],
                         ids=["plain", "feedback", "looped"])
def test_the_padded_decode_step_gives_the_eager_steps_tokens(options):
    model = tiny_model(**options).float()
    eager = Batcher(model, TOKENIZER, max_batch=4, max_waiting=8, seed=0)
    expected = run_schedule(eager, SCHEDULE)
    eager.close()
    padded = Batcher(model, TOKENIZER, max_batch=4, max_waiting=8, seed=0, decode_step="padded")
    # per step: every row, in use or not, sees some slot (attention over none is 0 on a CPU, may be NaN on a GPU)
    # and has finite logits
    sound, step = [], padded.step

    def watched(last, cache, pos, **options):
        logits = step(last, cache, pos=pos, **options)
        sound.append(bool((cache.slots <= pos).flatten(1).any(1).all() and logits.isfinite().all()))
        return logits
    padded.step = watched
    got = run_schedule(padded, SCHEDULE)
    padded.close()
    assert got == expected
    assert len(got["a"]) == 100 and len(sound) == 99 and all(sound)  # the first token comes from the prefill


@pytest.fixture
def stand_in_graphs(monkeypatch):
    """Batchers on the CPU may take the graph path, its capture replaced by StandInGraph; returns the graphs made.
    The GPU run (experiments/serve_load.py with decode_graph) is what checks the real capture."""
    import batching
    graphs = []

    def capture(fn, generator, device):
        fn()  # this token's step, as step_and_capture runs it before capturing
        graphs.append(StandInGraph(fn))
        return graphs[-1]
    monkeypatch.setattr(batching, "check_decode_step", lambda *args: None)
    monkeypatch.setattr(batching, "step_and_capture", capture)
    return graphs


def test_the_graph_decode_step_is_captured_once_and_replayed_for_every_later_token(stand_in_graphs):
    model = tiny_model().float()
    eager = Batcher(model, TOKENIZER, max_batch=4, max_waiting=8, seed=0)
    expected = run_schedule(eager, SCHEDULE)
    eager.close()
    graphed = Batcher(model, TOKENIZER, max_batch=4, max_waiting=8, seed=0, decode_step="graph")
    got = run_schedule(graphed, SCHEDULE)
    graphed.close()
    assert got == expected
    graph, = stand_in_graphs  # through admissions, removals and compactions: their buffers are written in place
    assert graph.replays == 98  # 99 decode steps, the first of them the capture's own run


def test_a_reallocated_buffer_makes_the_graph_be_captured_again(stand_in_graphs):
    batcher = Batcher(tiny_model().float(), TOKENIZER, max_batch=2, max_waiting=2, seed=0, decode_step="graph")
    first = collect(batcher, ["lo"], 5)
    batcher.cache.slots = batcher.cache.slots.clone()  # (idle between requests) the old graph would read freed memory
    second = collect(batcher, ["lo"], 5)
    batcher.close()
    assert second == first and len(stand_in_graphs) == 2


def test_a_cuda_graph_decode_step_on_a_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a CUDA device, not cpu"):
        Batcher(tiny_model(), TOKENIZER, max_batch=2, max_waiting=2, seed=0, decode_step="graph")
    with pytest.raises(ValueError, match="decode_step='padded' or 'graph'"):
        Batcher(tiny_model(), TOKENIZER, max_batch=2, max_waiting=2, seed=0, compile=True)


# ----------------------------------------------------------------------------- stop strings

def test_stop_strings_find_the_earliest_match_and_hold_back_a_partial_one():
    stops = StopStrings(["abcd", "c", "xyz"])
    assert stops.feed("ab", 0) is None and stops.held() == 2  # "ab" may start "abcd"
    assert stops.feed("c", 2) == 2  # "c" completes first: "abcd" never does
    one_token = StopStrings(["abcd", "c"])
    assert one_token.feed("zabcd", 0) == 1  # both complete in one piece: "abcd" starts first
    overlap = StopStrings(["aab"])
    assert overlap.feed("aaa", 0) is None and overlap.held() == 2 and overlap.feed("b", 3) == 1


def test_row_text_never_shows_a_stop_string_split_across_tokens():
    sent = []
    row = Row(TOKENIZER.encode("x"), 50, 0.0, None, 1.0, None, None, ["fox j"], False, False, TOKENIZER,
              lambda e: sent.append(e))
    for c in "the fox jumps":
        row.add(TOKENIZER.encode(c)[0], None, None)
        if row.done:
            break
    assert "".join(e["text"] for e in sent) == "the " and sent[-1]["finish_reason"] == "stop"


def test_the_stop_check_is_linear_in_the_stop_strings_length():
    def seconds_per_token(length):
        stop = "a" * (length - 1) + "b"  # the text "aaaa..." keeps a partial match alive the whole time
        row = Row([0], 10 ** 6, 0.0, None, 1.0, None, None, [stop] * 4, False, False, TOKENIZER, lambda e: None)
        start = time.perf_counter()
        for _ in range(300):
            row.add(TOKENIZER.encode("a")[0], None, None)
        return (time.perf_counter() - start) / 300
    small, big = seconds_per_token(100), seconds_per_token(200_000)
    assert big < 20 * small + 1e-3  # the old check sliced every stop string at every length: ~2 s a token


def test_the_batcher_thread_stops_when_closed_idle():
    batcher = Batcher(tiny_model(), TOKENIZER, max_batch=2, max_waiting=2, seed=0)
    batcher.close()
    batcher.thread.join(timeout=10)
    assert not batcher.thread.is_alive()
    assert "unloaded" in batcher.submit([Row([0], 1, 0.0, None, 1.0, None, None, [], False, False, TOKENIZER,
                                              lambda e: None)])
