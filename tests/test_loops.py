"""Looped depth (issue 10 part 1): a prelude, a core applied `loops` times with shared weights, a coda."""
import contextlib
import os

import pytest
import torch

from architecture import build_model
from looped import LoopedGPT
from model import GPT, GPTConfig

SHAPE = dict(vocab_size=50, block_size=32, n_layer=3, n_head=4, n_embd=32)


def looped_model(**kw):
    torch.manual_seed(0)
    return build_model(SHAPE | dict(n_prelude=1, n_core=1, n_coda=1, loops=3) | kw).eval()


@pytest.mark.parametrize("inject", ["add", "concat", "none"])
def test_one_loop_equals_the_plain_model_with_the_same_weights(inject):
    plain = GPT(GPTConfig(**SHAPE)).eval()
    looped = build_model(SHAPE | dict(n_prelude=1, n_core=1, n_coda=1, loops=1, inject=inject)).eval()
    looped.load_state_dict(plain.state_dict(), strict=False)  # concat's projection starts as h + e
    idx = torch.randint(0, 50, (2, 16))
    assert torch.allclose(looped(idx)[0], plain(idx)[0], atol=1e-5)
    assert not torch.allclose(looped(idx, loops=2)[0], plain(idx)[0], atol=1e-3)


def test_albert_sharing_is_a_core_of_every_layer_and_params_do_not_grow_with_loops():
    shared = build_model(SHAPE | dict(n_layer=1, n_core=1, loops=4))
    one = GPT(GPTConfig(**SHAPE | dict(n_layer=1)))
    assert shared.num_params() == one.num_params()


def test_gradients_flow_only_through_the_last_k_loops():
    model = looped_model(loops=4, backprop_loops=1).train()
    core = model.blocks[1]
    seen = []  # whether each core application's output is part of the autograd graph
    core.register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    idx = torch.randint(0, 50, (2, 8))
    model(idx, idx)[1].backward()
    assert seen == [False, False, False, True]
    assert all(p.grad is not None for p in model.parameters())  # the prelude still learns through the injection


def test_changing_a_future_token_never_changes_earlier_logits_at_any_loop_count():
    for kw in (dict(), dict(inject="concat"), dict(exit_tol=0.05)):
        model = looped_model(**kw)
        idx = torch.randint(0, 50, (2, 20))
        changed = idx.clone()
        changed[:, 12] = (changed[:, 12] + 1) % 50
        for loops in (1, 5):
            a, b = model(idx, loops=loops)[0], model(changed, loops=loops)[0]
            assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
            assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("loops", [1, 2, 5])
def test_kv_cache_generation_matches_no_cache_at_any_loop_count(loops):
    model = looped_model(n_layer=4, n_core=2, inject="concat")
    idx = torch.randint(0, 50, (2, 5))
    # 36 new tokens run past block_size=32, so the cache refill path is covered too
    cached = model.generate(idx, 36, temperature=0.0, use_cache=True, loops=loops)
    plain = model.generate(idx, 36, temperature=0.0, use_cache=False, loops=loops)
    assert torch.equal(cached, plain)


def test_cached_chunks_match_full_forward_with_loops():
    model = looped_model()
    idx = torch.randint(0, 50, (2, 12))
    full = model.hidden(idx, loops=4)
    cache = model.make_cache(2, model.config.block_size, "cpu", torch.float32, loops=4)
    parts = [model.hidden(idx[:, :5], cache, 0, loops=4), model.hidden(idx[:, 5:], cache, 5, loops=4)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="loop count"):
        model.hidden(idx[:, :1], cache, 0, loops=3)


def test_adaptive_exit_uses_fewer_loops_at_a_loose_tolerance():
    idx = torch.randint(0, 50, (2, 16))
    strict, loose = looped_model(exit_tol=1e-9), looped_model(exit_tol=0.5)
    strict(idx, loops=8)
    loose(idx, loops=8)
    assert strict.mean_loops == 8 and 1 <= loose.mean_loops < 8
    with pytest.raises(ValueError, match="no-cache"):
        loose.generate(idx, 2, use_cache=True)


def test_training_loop_counts_follow_the_sampling_option():
    for sampling, lo, hi in (("uniform", 2, 5), ("poisson_lognormal", 1, 8)):
        model = looped_model(loops=3, loops_sampling=sampling, loops_min=lo if sampling == "uniform" else 1,
                             loops_max=hi).train()
        counts = [model.sample_loops() for _ in range(300)]
        assert lo <= min(counts) and max(counts) <= hi and len(set(counts)) > 2
    assert looped_model(loops=3).train().sample_loops() == 3


@pytest.mark.parametrize("kw, match", [
    (dict(n_core=1), "must equal n_layer"),
    (dict(loops=3), "n_core"),
    (dict(n_core=3, loops=0), "loops"),
    (dict(n_core=3, loops=4, loops_max=3), "loops_max"),
    (dict(n_core=3, loops_sampling="gauss"), "loops_sampling"),
    (dict(n_core=3, inject="mul"), "inject"),
    (dict(n_core=3, backprop_loops=-1), "backprop_loops"),
    (dict(n_core=3, exit_tol=-1.0), "exit_tol"),
    (dict(n_core=3, memory_layers=[1], memory="knn"), "kNN memory"),
])
def test_impossible_loop_settings_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        build_model(SHAPE | kw)


def test_loops_on_a_plain_model_is_a_clear_error():
    with pytest.raises(ValueError, match="looped model"):
        GPT(GPTConfig(**SHAPE))(torch.zeros(1, 4, dtype=torch.long), loops=2)


LOOPED_RUN = dict(n_layer=3, n_prelude=1, n_core=1, n_coda=1, loops=2, loops_sampling="uniform", loops_max=3,
                  backprop_loops=1, inject="concat", eval_loops=[1, 3])


def test_looped_training_resumes_exactly_and_logs_val_loss_at_each_eval_loop_count(tiny_data):
    from conftest import tiny_train_config
    from checkpoint import load_checkpoint
    from runtime import read_jsonl
    import train
    whole = tiny_train_config(tiny_data, out_dir=str(tiny_data / "whole"), **LOOPED_RUN)
    train.train(whole)
    split = tiny_train_config(tiny_data, out_dir=str(tiny_data / "split"), max_iters=10, lr_decay_iters=20, **LOOPED_RUN)
    train.train(split)
    train.train(split | {"max_iters": 20, "init_from": "resume"})
    rows = [read_jsonl(os.path.join(c["out_dir"], "metrics.jsonl")) for c in (whole, split)]
    losses = [[(r["step"], r["loss"]) for r in run if "loss" in r] for run in rows]
    assert losses[0] == losses[1] != []  # same steps, same losses, bit for bit (CPU), loop counts sampled alike
    assert [r[k] for r in rows[0] if "val_loss" in r for k in ("val_loss_loops1", "val_loss_loops3")]
    args = load_checkpoint(os.path.join(whole["out_dir"], "ckpt.pt"))["model_args"]
    assert {k: args[k] for k in ("n_core", "loops", "loops_sampling", "backprop_loops", "inject")} == \
        {k: LOOPED_RUN[k] for k in ("n_core", "loops", "loops_sampling", "backprop_loops", "inject")}


def test_eval_loops_on_a_plain_model_is_a_clear_error(tiny_cfg):
    import train
    with pytest.raises(SystemExit, match="looped model"):
        train.train(tiny_cfg | {"eval_loops": [2]})


def test_sample_thinks_for_the_asked_loop_count(tiny_data, capsys):
    from conftest import tiny_train_config
    import sample
    import train
    cfg = tiny_train_config(tiny_data, max_iters=3, **LOOPED_RUN)
    train.train(cfg)
    capsys.readouterr()
    sample.main([f"--out_dir={cfg['out_dir']}", "--start=line", "--max_new_tokens=8", "--loops=5", "--device=cpu"])
    assert capsys.readouterr().out.startswith("line")
    plain = tiny_train_config(tiny_data, max_iters=3, out_dir=str(tiny_data / "plain"))
    train.train(plain)
    with pytest.raises(SystemExit, match="needs a looped model"):
        sample.main([f"--out_dir={plain['out_dir']}", "--loops=5", "--device=cpu"])


def test_loops_experiment_writes_its_json_and_plot(tmp_path):
    import json
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import loops
    loops.main([f"--out_dir={tmp_path}", "--device=cpu", "--steps=3", "--n_embd=16", "--n_head=2", "--batch_size=4",
                "--train_hops=2", "--test_hops=3", "--n_chains=2", "--loops=2", "--loops_min=1", "--loops_max=3",
                "--test_problems=4", "--test_loops=[1,3]"])
    out = json.loads((tmp_path / "loops.json").read_text())
    assert set(out["chains"]) == {"looped", "params", "compute"} and (tmp_path / "loops.png").exists()
    assert set(out["chains"]["looped"]["accuracy"]) == {"1", "2", "3"}  # the training count is always tested
    assert out["chains"]["compute"]["n_layer"] == 1 + 2 + 1


def test_loops_can_follow_each_batchs_hops(tmp_path, monkeypatch):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import loops
    seen = []
    forward = LoopedGPT.forward
    monkeypatch.setattr(LoopedGPT, "forward", lambda self, idx, targets=None, reduction="mean", loops=None:
                        seen.append((self.training, loops)) or forward(self, idx, targets, reduction, loops=loops))
    cfg = loops.DEFAULTS | dict(steps=6, n_embd=16, n_head=2, batch_size=4, train_hops=3, test_hops=4, n_chains=2,
                                loops=2, loops_min=1, loops_max=4, loops_follow_hops=True, models=["looped"])
    config = loops.model_configs(cfg)["looped"]
    loops.train_chains("looped", config, cfg, torch.device("cpu"), contextlib.nullcontext())
    trained = [n for training, n in seen if training]
    assert len(trained) == 6 and set(trained) <= {2, 3, 4}  # hops 1..3, one more loop than hops


def test_chain_problems_need_the_asked_hops_and_share_one_length():
    import random
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import loops
    cfg = loops.DEFAULTS | dict(n_chains=3, train_hops=2, test_hops=5)
    rng = random.Random(0)
    for hops in (1, 5):
        tokens, targets = loops.chain_problem(rng, hops, cfg)
        assert len(tokens) == 3 * loops.max_statements(cfg) + 2
        defined = {tokens[i]: tokens[i + 1] for i in range(len(tokens) - 2) if tokens[i + 2] == 10 + cfg["n_vars"]}
        assert tokens[-2] == 11 + cfg["n_vars"]  # "? v": the answer is read at v
        var, steps = tokens[-1], 0
        while defined[var] >= 10:  # follow the chain to its digit
            var, steps = defined[var], steps + 1
        assert steps == hops and defined[var] == targets[-1]


def test_shipped_loop_configs_load():
    import glob
    import sys
    from configurator import configure
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import loops
    import train
    for path in glob.glob(os.path.join(root, "config", "loops_chains_*.py")):
        configure(loops.DEFAULTS, [path])
    cfg = configure(train.DEFAULTS, [os.path.join(root, "config", "loops_shakespeare_char.py")])
    assert cfg["n_core"] and cfg["eval_loops"]


# ----------------------------------------------------------------------------- issue 28: thinking by iterating

def thinking_model(**kw):
    torch.manual_seed(0)
    return build_model(SHAPE | dict(n_prelude=1, n_core=1, n_coda=1, loops=3) | kw)


def test_every_loop_loss_is_the_mean_of_each_loops_loss_computed_by_hand():
    model = thinking_model(loop_loss="every").train()
    x, y = torch.randint(0, 50, (2, 10)), torch.randint(0, 50, (2, 10))
    loss = model(x, y)[1]
    model.eval()  # the same weights, no dropout: each loop count's loss by the plain forward
    by_hand = sum(model(x, y, loops=r)[1] for r in (1, 2, 3)) / 3
    assert torch.allclose(loss, by_hand, atol=1e-5)


def test_progressive_loss_sends_gradients_only_through_the_last_k_loops(monkeypatch):
    model = thinking_model(loop_loss="progressive", progressive_alpha=1.0, loops=4).train()
    x = torch.randint(0, 50, (2, 8))
    draws = iter([torch.tensor(3), torch.tensor(1)])  # n = 3 loops without gradient, then k = 1 with it
    monkeypatch.setattr(torch, "randint", lambda *a, **k: next(draws))
    seen = []  # whether each core application is part of the autograd graph
    model.blocks[1].register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    model(x, x)[1].backward()
    assert seen == [False, False, False, True]
    alpha_half = thinking_model(loop_loss="progressive", progressive_alpha=0.5, loops=4).train()
    seen.clear()
    alpha_half.blocks[1].register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    draws = iter([torch.tensor(2), torch.tensor(1)])
    alpha_half(x, x)
    assert seen == [False, False, True] + [True] * 4  # then the full 4 loops, every one with gradient


def test_the_halting_probe_learns_from_every_loops_answer_under_the_progressive_loss(monkeypatch):
    """Not only the supervised loops (mostly late, mostly right): a probe that never sees an early wrong
    answer learns to say 'right' at loop 1."""
    model = thinking_model(loop_loss="progressive", progressive_alpha=0.5, loops=4, halt=True).train()
    x = torch.randint(0, 50, (2, 8))
    draws = iter([torch.tensor(2), torch.tensor(1)])  # n = 2 without gradient, k = 1 with, then the full 4
    monkeypatch.setattr(torch, "randint", lambda *a, **k: next(draws))
    counts = []
    probe_loss = model.probe_loss
    monkeypatch.setattr(model, "probe_loss", lambda readouts, targets: counts.append(len(readouts))
                        or probe_loss(readouts, targets))
    model(x, x)[1].backward()
    assert counts == [2 + 3]  # the two supervised answers (loops 3 and 4), and loops 1, 2, 3 watched
    assert model.halt_head.weight.grad.abs().sum() > 0


def test_the_halting_probe_stops_rows_and_reports_their_loops():
    model = thinking_model(loop_loss="every", halt=True).eval()
    x = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        model.halt_head.bias.fill_(10.0)  # the probe is sure at once: one loop each
        model(x, loops=8, halt=True)
        assert model.loops_used.tolist() == [1, 1]
        model.halt_head.bias.fill_(-10.0)  # never sure: the cap
        model(x, loops=8, halt=True)
        assert model.loops_used.tolist() == [8, 8]
    assert model.probe_loss([torch.randn(2, 6, 32)], torch.randint(0, 50, (2, 6))).item() > 0
    with pytest.raises(ValueError, match="without the KV cache"):
        model.generate(x, 2, loops=4, halt=True)
    assert model.generate(x, 2, loops=4, halt=True, use_cache=False).shape == (2, 8)
    with pytest.raises(ValueError, match="halting probe"):
        thinking_model(loop_loss="every").eval()(x, halt=True)


class ScriptedProbe(torch.nn.Module):
    """A halting head that says 'right' for the rows each call lists (one call per loop)."""

    def __init__(self, answers):
        super().__init__()
        self.answers = iter(answers)

    def forward(self, readout):
        sure = torch.tensor(next(self.answers))[:, None].expand(readout.shape[:2])
        return (sure.float() * 20 - 10)[..., None]


def test_halting_freezes_a_confident_row_while_the_other_loops_on():
    model = thinking_model(loop_loss="every", halt=True).eval()
    x = torch.randint(0, 50, (2, 6))
    model.halt_head = ScriptedProbe([[True, False], [True, False], [True, True]])
    with torch.no_grad():
        out = model.hidden(x, loops=8, halt=0.5)
        assert model.loops_used.tolist() == [1, 3]
        # row 0 holds the state of one loop, row 1 of three
        assert torch.allclose(out[0], model.hidden(x[:1], loops=1)[0], atol=1e-5)
        assert torch.allclose(out[1], model.hidden(x[1:], loops=3)[0], atol=1e-5)


class PositionProbe(torch.nn.Module):
    """A halting head sure (p ~ 1) at every position but the last, where it says p ~ 0."""

    def forward(self, readout):
        logits = torch.full(readout.shape[:2], 10.0)
        logits[:, -1] = -10.0
        return logits[..., None]


def test_the_mean_rule_stops_a_row_that_one_unsure_position_keeps_looping_under_all():
    model = thinking_model(loop_loss="every", halt=True, halt_rule="all").eval()
    x = torch.randint(0, 50, (2, 6))
    model.halt_head = PositionProbe()
    with torch.no_grad():
        model(x, loops=8, halt=0.8)
        assert model.loops_used.tolist() == [8, 8]  # the last position is never sure
        model.loop.halt_rule = "mean"  # 5 of 6 positions at ~1: a mean of ~0.83 passes 0.8
        model(x, loops=8, halt=0.8)
        assert model.loops_used.tolist() == [1, 1]
    with pytest.raises(ValueError, match="halt_rule"):
        thinking_model(loop_loss="every", halt=True, halt_rule="median")


def test_the_prefix_lm_reads_the_problem_both_ways_and_the_answer_causally():
    END = 7
    model = thinking_model(prefix_token=END)
    x = torch.tensor([[3, 9, 4, 12, END, 20, 21, 22]])  # problem 3 9 4 12, END, then the answer 20 21 22

    def change(position):
        changed = x.clone()
        changed[0, position] = (changed[0, position] + 1) % 50
        return (model(x)[0] - model(changed)[0]).abs().amax(-1)[0] > 1e-6  # which positions moved

    assert change(3).tolist() == [True] * 8  # a problem token reaches every position, earlier ones too
    assert change(6).tolist() == [False] * 6 + [True] * 2  # an answer token: only itself and after, never the problem
    mask = model.prefix_mask(model.prefix_end(x), torch.arange(8))[0, 0]
    assert mask[:5, :5].all() and not mask[:5, 5:].any() and torch.equal(mask[5:, 5:], torch.ones(3, 3).tril().bool())
    cached = model.generate(x[:, :5], 6, temperature=0.0)  # the prompt is the problem: prefilled both ways
    assert torch.equal(cached, model.generate(x[:, :5], 6, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("kw, match", [
    (dict(n_core=3, loop_loss="all"), "loop_loss"),
    (dict(n_core=3, loop_loss="every", backprop_loops=1), "backprop_loops=0"),
    (dict(n_core=3, loop_loss="progressive", progressive_alpha=2.0), "progressive_alpha"),
    (dict(n_core=3, init_state="ones"), "init_state"),
    (dict(n_core=3, state_noise=-0.1), "state_noise"),
    (dict(n_core=3, halt=True), "halt needs loop_loss"),
    (dict(n_core=3, loop_loss="every", halt=True, halt_threshold=1.0), "halt_threshold"),
    (dict(n_core=3, prefix_token=50), "prefix_token"),
    (dict(n_core=3, prefix_token=4, attn_windows=[2, 2, 2]), "cannot be combined"),
    (dict(loop_loss="every"), "n_core"),
])
def test_impossible_thinking_settings_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        build_model(SHAPE | kw)


THINKING_RUN = dict(n_layer=3, n_prelude=1, n_core=1, n_coda=1, loops=3, loop_loss="progressive", halt=True,
                    init_state="random", state_noise=0.1, prefix_token=10)


def test_resume_with_every_thinking_option_continues_exactly(tiny_data):
    from checkpoint import load_checkpoint
    from conftest import tiny_train_config
    import train
    whole = tiny_train_config(tiny_data, out_dir=str(tiny_data / "whole"), **THINKING_RUN)
    train.train(whole)
    split = whole | dict(out_dir=str(tiny_data / "split"), max_iters=10, lr_decay_iters=20)
    train.train(split)
    train.train(split | {"max_iters": 20, "init_from": "resume"})
    a, b = (load_checkpoint(os.path.join(c["out_dir"], "ckpt.pt")) for c in (whole, split))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
