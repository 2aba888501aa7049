"""The decode loop's paths (BENCHMARKS.md, "Speed, round three"): the step replayed as a CUDA graph, the sampler
written out, the stop read late on a GPU. CUDA graphs need a GPU, so here a stand-in "graph" runs the captured
step again on each replay: the loop's bookkeeping (buffers, positions, refills, stops) is what is tested; the GPU
script (experiments/speed_round3_gpu.sh) checks the real graphs' tokens against the eager path's."""
import pytest
import torch

import generation
from generation import sample_next_token
from graph_fakes import StandInGraph
from model import GPT, GPTConfig


def tiny_model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)).eval()


@pytest.fixture
def stand_in_graphs(monkeypatch):
    """Every generation on the CPU takes the graph path, its capture replaced by StandInGraph; returns the graphs."""
    graphs = []

    def capture(fn, generator=None):
        graphs.append(StandInGraph(fn))
        return graphs[-1]

    monkeypatch.setattr(generation, "use_graph", lambda graph, device, use_cache: use_cache and graph is not False)
    monkeypatch.setattr(generation, "capture_graph", capture)
    # as on a GPU, less the side stream
    monkeypatch.setattr(generation, "step_and_capture", lambda fn, g, device: generation.run_then_capture(fn, g, int))
    return graphs


def test_the_sampler_draws_what_torch_multinomial_draws_from_the_same_generator():
    for seed in range(50):
        logits = torch.randn(3, 97) * 3
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = torch.multinomial((logits / 0.8).softmax(-1), 1, generator=a).squeeze(1)
        assert torch.equal(sample_next_token(logits, 0.8, None, None, b), expected)
        assert torch.equal(a.get_state(), b.get_state())  # and leaves the generator where multinomial does


@pytest.mark.parametrize("prompt_len, new", [(5, 20), (20, 30)])  # the second runs past the block: refills
def test_graph_decoding_yields_the_eager_tokens(stand_in_graphs, prompt_len, new):
    model = tiny_model()
    idx = torch.randint(64, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    eager = model.generate(idx, new, temperature=0.0, graph=False)
    graphed = model.generate(idx, new, temperature=0.0)
    assert torch.equal(graphed, eager) and torch.equal(eager, model.generate(idx, new, temperature=0.0, use_cache=False))
    graph, = stand_in_graphs  # captured once, at the first cached step, and replayed for the rest in the block
    cached_steps = min(new - 1, 32 - prompt_len)  # the prefill makes the first token; past the block each step refills
    assert graph.replays == cached_steps - 1  # the capture's own run made the first of them


def test_seeded_sampling_through_the_graph_matches_eager(stand_in_graphs):
    model = tiny_model()
    idx = torch.zeros(1, 3, dtype=torch.long)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, seed=11)
    assert torch.equal(model.generate(idx, 16, **kw), model.generate(idx, 16, graph=False, **kw))


def test_a_short_generation_is_not_captured(stand_in_graphs):
    model = tiny_model()
    idx = torch.zeros(1, 3, dtype=torch.long)
    model.generate(idx, generation.GRAPH_MIN_TOKENS, temperature=0.0)  # prefill + 3 steps: capture would not pay
    assert stand_in_graphs == []


def test_a_step_that_cannot_be_captured_warns_and_decodes_step_by_step(stand_in_graphs, monkeypatch):
    tries = []

    def refuse(fn, generator=None):  # a capture runs nothing, so the token of the step before it stands
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(generation, "capture_graph", refuse)
    model = tiny_model()
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.warns(UserWarning, match="could not be captured"):
        tokens = model.generate(idx, 10, temperature=0.0)
    assert torch.equal(tokens, model.generate(idx, 10, temperature=0.0, graph=False)) and tries == [1]


def test_a_stop_read_late_still_ends_generate_at_the_stop(monkeypatch):
    model = tiny_model()
    idx = torch.zeros(2, 3, dtype=torch.long)
    free = model.generate(idx, 24, temperature=1.0, seed=3)
    stop = int(free[0, 8])
    exact = model.generate(idx, 24, temperature=1.0, seed=3, stop_token=stop)
    monkeypatch.setattr(generation, "stop_check_every", lambda device: 5)  # as on a GPU, where each read waits
    late = model.generate(idx, 24, temperature=1.0, seed=3, stop_token=stop)
    assert torch.equal(late, exact)
    streamed = list(model.generate_stream(idx, 24, temperature=1.0, seed=3, stop_token=stop))
    extra = len(streamed) - (exact.size(1) - 3)
    assert 0 <= extra < 5 and all(torch.equal(t, torch.full_like(t, stop)) for t in streamed[exact.size(1) - 3:])


def test_graph_true_needs_a_cuda_device_and_the_cache():
    model = tiny_model()
    with pytest.raises(ValueError, match="CUDA device"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 4, graph=True)


def test_host_tokens_yields_each_step_as_lists_on_a_cpu():
    model = tiny_model()
    idx = torch.zeros(2, 3, dtype=torch.long)
    rows = list(generation.host_tokens(model.generate_stream(idx, 6, temperature=0.0)))
    assert rows == model.generate(idx, 6, temperature=0.0)[:, 3:].t().tolist()
