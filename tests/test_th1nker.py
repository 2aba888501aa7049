"""Th1nker (issue 29): blocks over a latent, the probe, the latent store, long-term memory, checkpoints."""
import pytest
import torch

import problems
import th1nker
from architecture import build_model
from th1nker import LatentStore, LongTermMemory, Th1nker, ThinkerConfig, looped_schedule, parse_schedule

ARGS = dict(vocab_size=4, block_size=16, n_layer=3, n_head=2, n_embd=16, n_prelude=1, n_core=1, n_coda=1,
            loops=3, attn_windows=[2, 2, 2])


def tiny(**options):
    torch.manual_seed(0)
    return Th1nker(ARGS, ThinkerConfig(**options))


def batch(n=4, length=6, seed=0):
    return problems.parity_batch(n, length, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("init", ["zero", "random"])
def test_fixed_schedule_read_process_output_equals_the_looped_model(init):
    thinker = tiny(init_state=init).eval()
    looped = build_model(ARGS | dict(init_state=init)).eval()
    looped.load_state_dict(thinker.core.state_dict())  # the same weights
    x, _ = batch()
    for loops in (1, 3, 5):
        torch.manual_seed(1)  # the random initial latent: the same draw in both
        ours = thinker.run(x, looped_schedule(loops))[0]
        torch.manual_seed(1)
        theirs = looped(x, loops=loops)[0]
        torch.testing.assert_close(ours, theirs)


def test_output_after_every_pair_gives_the_looped_every_loss():
    thinker = tiny(init_state="zero")
    looped = build_model(ARGS | dict(init_state="zero", loop_loss="every")).train()
    looped.load_state_dict(thinker.core.state_dict())
    x, y = batch()
    ours = thinker.train().run(x, looped_schedule(3, output_every=True), y)[1]
    torch.testing.assert_close(ours, looped(x, y, loops=3)[1])


@pytest.mark.parametrize("schedule, says", [("O R P", "before any Read"), ("R X O", "unknown block 'X'"),
                                            ("R P P", "no Output"), ("R S O", "must be the last"),
                                            ("L R O", "before any Read"), ("R L O", "store=True")])
def test_bad_schedules_are_clear_errors(schedule, says):
    with pytest.raises(ValueError, match=says):
        parse_schedule(schedule, ThinkerConfig())


def test_stop_ends_a_row_and_leaves_it_untouched():
    thinker = tiny().eval()
    x, _ = batch()
    s = thinker.start(x)
    for block in "RPO":
        thinker.step(s, block)
    stopped = torch.tensor([True, False, True, False])
    thinker.step(s, "S", rows=stopped)
    latent, steps = s.latent.clone(), s.steps.clone()
    thinker.step(s, "P")
    assert torch.equal(s.latent[stopped], latent[stopped]) and torch.equal(s.steps[stopped], steps[stopped])
    assert not torch.equal(s.latent[~stopped], latent[~stopped]) and (s.steps[~stopped] == 4).all()


def test_probe_driven_run_stops_every_row_and_counts_its_blocks():
    thinker = tiny(max_steps=6).eval()
    with torch.no_grad():  # a probe that prefers Stop, then Output: Read (forced first), Output, Stop
        thinker.probe[-1].weight.zero_()
        thinker.probe[-1].bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    s, logp, _ = thinker.run_probe(batch()[0])
    assert not s.active.any() and (s.steps == 2).all() and s.logits is not None
    # the log-probabilities of its choices: Read (the only one allowed), Output of R P O, Stop of R P O S
    expected = torch.log_softmax(torch.tensor([0.0, 1, 2]), 0)[2] + torch.log_softmax(torch.tensor([0.0, 1, 2, 3]), 0)[3]
    assert torch.allclose(logp, expected.expand(4), atol=1e-5)


def test_probe_never_runs_past_max_steps():
    thinker = tiny(max_steps=5).eval()
    with torch.no_grad():  # a probe that always wants to Process
        thinker.probe[-1].weight.zero_()
        thinker.probe[-1].bias.copy_(torch.tensor([0.0, 9.0, 0.0, 0.0]))
    s, _, _ = thinker.run_probe(batch()[0])
    assert not s.active.any() and (s.steps == 5).all()


def test_imitation_learns_a_fixed_schedule():
    thinker = tiny(max_steps=12)
    opt = torch.optim.Adam(thinker.probe.parameters(), lr=1e-2)
    teacher = looped_schedule(2)
    x, _ = batch(2, 3)
    for _ in range(30):
        _, _, loss = thinker.run_probe(x, teacher=teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
    s, _, _ = thinker.eval().run_probe(x)
    assert (s.steps == len(teacher)).all()


def test_latent_store_returns_what_was_written_and_detaches_past_its_window():
    store = LatentStore(window=2)
    written = [torch.randn(2, 3, 4, requires_grad=True) * 1 for _ in range(4)]
    for latent in written:
        store.write(latent)
    read = store.read()  # (B, T, S, C)
    assert read.shape == (2, 3, 4, 4)
    for i, latent in enumerate(written):
        assert torch.equal(read[:, :, i], latent)
    assert [t.requires_grad for t in store.latents] == [False, False, True, True]


def test_read_latent_reaches_the_stored_steps():
    thinker = tiny(store=True)
    x, y = batch()
    _, loss, s = thinker.train().run(x, "R P P L O", y)
    assert len(s.store) == 4  # R, P, P and L each stored their latent
    loss.backward()
    assert thinker.read_latent.out.weight.grad.abs().sum() > 0


def test_long_term_memory_returns_the_tokens_of_the_most_similar_keys():
    memory = LongTermMemory(key_dim=8, n_embd=3)
    keys, tokens = torch.eye(8)[:5] * 3, torch.randn(5, 3)
    memory.write(keys, tokens)
    got = memory.retrieve(torch.eye(8)[[3, 1]] + 0.1, k=1)  # (2, 1, C)
    assert torch.equal(got[:, 0], tokens[[3, 1]])
    again = LongTermMemory(key_dim=8, n_embd=3)  # a later run, the store read back
    again.load_state_dict(memory.state_dict())
    assert torch.equal(again.retrieve(torch.eye(8)[[4]], k=1)[:, 0], tokens[[4]])


def test_resume_continues_exactly(tmp_path):
    def batches(step):
        return batch(8, 6, seed=100 + step)

    def train(thinker, opt, steps):
        return [th1nker.train_step(thinker, opt, *batches(step), looped_schedule(2, output_every=True))
                for step in steps]

    thinker = tiny(state_noise=0.1)
    opt = torch.optim.AdamW(thinker.parameters(), lr=1e-2)
    train(thinker, opt, range(3))
    th1nker.save_thinker(tmp_path / "t.pt", thinker, ARGS, {"tokenizer": "char", "chars": "01^."}, opt, step=3)
    straight = train(thinker, opt, range(3, 5))
    resumed, state = th1nker.load_thinker(tmp_path / "t.pt",
                                          lambda t: torch.optim.AdamW(t.parameters(), lr=1e-2))
    assert state["step"] == 3
    assert train(resumed, state["optimizer_obj"], range(3, 5)) == straight
    for a, b in zip(thinker.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_sample_runs_a_th1nker_checkpoint_as_its_looped_schedule(tmp_path, capsys):
    import sample
    thinker = tiny()
    th1nker.save_thinker(tmp_path / "t.pt", thinker, ARGS, {"tokenizer": "char", "chars": "01^."})
    sample.main([f"--ckpt={tmp_path / 't.pt'}", "--start=^0110", "--max_new_tokens=3", "--device=cpu",
                 "--num_samples=1", "--loops=4"])
    assert "^0110" in capsys.readouterr().out


def test_loading_another_checkpoint_kind_is_a_clear_error(tmp_path):
    from checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "plain.pt", {"model_args": ARGS, "model": {}})
    with pytest.raises(SystemExit, match="not a Th1nker checkpoint"):
        th1nker.load_thinker(tmp_path / "plain.pt")


@pytest.mark.parametrize("backprop_steps, reaches_the_read", [(0, True), (2, False)])
def test_truncated_backprop_stops_gradients_after_the_chosen_steps(backprop_steps, reaches_the_read):
    thinker = tiny(backprop_steps=backprop_steps)
    x, y = batch()
    thinker.train().run(x, "R P P P O", y)[1].backward()  # the latent is detached after R P when truncated
    prelude = thinker.core.blocks[0].attn.q_proj.weight.grad
    assert (prelude is not None and prelude.abs().sum() > 0) == reaches_the_read


def test_the_th1nker_configs_load_into_the_experiment_defaults():
    import glob
    import importlib.util
    import os
    from configurator import configure
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # experiments/th1nker_experiments.py shares the module's name: load it under another
    spec = importlib.util.spec_from_file_location("th1nker_experiment", os.path.join(root, "experiments", "th1nker_experiments.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    paths = glob.glob(os.path.join(root, "config", "th1nker_*.py"))
    assert len(paths) == 3
    for path in paths:
        configure(script.DEFAULTS, [path])


def test_the_step_reward_is_correct_over_steps_or_correct_less_a_price_per_step():
    correct, steps = torch.tensor([True, True, False]), torch.tensor([2, 16, 4])
    assert th1nker.step_reward(correct, steps).tolist() == [0.5, 0.0625, 0.0]
    assert torch.allclose(th1nker.step_reward(correct, steps, step_cost=0.01), torch.tensor([0.98, 0.84, -0.04]))


def test_a_negative_step_cost_is_refused_before_any_training(tmp_path):
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "experiments", "th1nker_experiments.py")
    spec = importlib.util.spec_from_file_location("th1nker_experiment", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit, match="step_cost must be 0"):
        script.main([f"--out_dir={tmp_path}", "--step_cost=-0.01"])
