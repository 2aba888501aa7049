import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import sample
import tasks
import world
from checkpoint import load_checkpoint, save_checkpoint
from configurator import ConfigError, configure
from conftest import ROOT
from model import GPT, GPTConfig
from runtime import read_jsonl
from tokenizer import CharTokenizer


# ----------------------------------------------------------------------------- policy and learning

def tiny_policy(block_size=192):
    torch.manual_seed(0)
    tokenizer = CharTokenizer(sorted(set(tasks.ALPHABET)))
    model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=block_size, n_layer=1, n_head=2, n_embd=32))
    return world.Policy(model, tokenizer)


def tiny_run_config(tmp_path, **overrides):
    cfg = configure(world.DEFAULTS, [])
    cfg.update(out_dir=str(tmp_path / "run"), tasks={"arith": {"max_steps": 2}}, imitation_episodes=20,
               imitation_iters=4, clone_iters=2, imitation_batch_size=4, n_layer=1, n_head=2, n_embd=32,
               block_size=192, episodes=8, episodes_per_update=4, update_batch_size=4, eval_interval=4,
               eval_episodes=2, teacher_help=True, temperature_start=1.0, temperature_end=1.0)
    cfg.update(overrides)
    return cfg


def test_policy_writes_one_action_line():
    action = tiny_policy().act("task arith\nobs Compute 2*3. Tools: calc.\n", temperature=1.0, seed=0)
    assert isinstance(action, str) and "\n" not in action and len(action) <= tasks.MAX_ACTION_CHARS


def test_policy_acts_on_transcripts_longer_than_its_context():
    policy = tiny_policy(block_size=64)
    assert isinstance(policy.act("task rooms\n" + "obs You are in the hall.\n" * 20, seed=1), str)


def test_a_few_learning_steps_change_the_weights_and_lower_the_loss():
    policy = tiny_policy()
    env = tasks.make_env("arith")
    items = [world.episode_item(tasks.play_episode(env, tasks.teacher_act(env), s), 0) for s in range(8)]
    before = [p.detach().clone() for p in policy.model.parameters()]
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=3e-3)
    losses = [world.update(policy, optimizer, items, [1.0] * len(items)) for _ in range(10)]
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))


def test_reinforce_weight_sign_pushes_probability_up_or_down():
    env = tasks.make_env("arith")
    item = world.episode_item(tasks.play_episode(env, tasks.teacher_act(env), 0), 0)
    results = {}
    for sign in (1.0, -1.0):
        policy = tiny_policy()
        optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.5)
        first = world.update(policy, optimizer, [item], [sign])
        results[sign] = world.update(policy, optimizer, [item], [1.0]) - abs(first)
    assert results[1.0] < 0 < results[-1.0]  # the loss of the actions fell after +1 and rose after -1


def test_action_batch_trains_only_on_action_tokens():
    policy = tiny_policy()
    env = tasks.make_env("arith")
    episode = tasks.play_episode(env, tasks.teacher_act(env), 0)
    x, y = world.action_batch(policy, [world.episode_item(episode, 0)])
    trained = policy.tokenizer.decode([t for t in y[0].tolist() if t != -1])
    assert trained == "".join(a + "\n" for a in episode["actions"])


def test_teacher_help_labels_the_states_where_the_policy_went_wrong():
    env = tasks.make_env("arith")
    episode = tasks.play_episode(env, lambda transcript: "ANSWER 7", 0)
    items = world.teacher_items(episode, 3)
    assert len(items) == 1 and items[0]["text"].endswith(f"act CALL calc {env.expression}\n")
    start, end = items[0]["spans"][0]
    assert items[0]["text"][start:end] == f"CALL calc {env.expression}\n"


def test_replay_keeps_recent_items_and_mixes_them_with_old_ones():
    rng = random.Random(0)
    replay = world.ReplayBuffer(size=50, recent_window=10, recent_fraction=0.5)
    for i in range(200):
        replay.add({"episode": i}, rng)
    assert len(replay.items) == 50 and [it["episode"] for it in replay.items[-10:]] == list(range(190, 200))
    batch = [it["episode"] for it in replay.sample(20, rng)]
    assert sum(e >= 190 for e in batch) >= 10 and any(e < 190 for e in batch)


def test_world_run_writes_metrics_plot_and_a_loadable_policy(tmp_path):
    cfg = tiny_run_config(tmp_path)
    world.run(cfg)
    rows = read_jsonl(f"{cfg['out_dir']}/metrics.jsonl")
    assert [r["episode"] for r in rows if "eval" in r] == [0, 4, 8]
    assert (tmp_path / "run" / "world.png").exists()
    policy = world.load_policy(cfg["out_dir"])
    assert isinstance(tasks.play_episode(tasks.make_env("arith"), policy.act, 1)["success"], bool)


def save_tiny_policy(path):
    policy = tiny_policy()
    tok = policy.tokenizer
    save_checkpoint(str(path), {"model_args": dataclasses.asdict(policy.model.config), "model": policy.model.state_dict(),
                                "tokenizer": {**tok.meta(), "vocab_size": tok.n_vocab, "eot": tok.eot}})
    return str(path)


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    start = save_tiny_policy(tmp_path / "start.pt")
    whole = tiny_run_config(tmp_path, out_dir=str(tmp_path / "whole"), init_from=start)
    world.run(whole)
    split = tiny_run_config(tmp_path, out_dir=str(tmp_path / "split"), episodes=4, init_from=start)
    world.run(split)
    world.run(split | {"episodes": 8, "init_from": "resume"})

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    a, b = (strip(read_jsonl(f"{c['out_dir']}/metrics.jsonl")) for c in (whole, split))
    assert a == b


def test_world_changes_rename_the_tool_mid_run():
    cfg = configure(world.DEFAULTS, [])
    cfg["changes"] = [(100, "arith", {"tool": "compute"}), (200, "guess", {})]
    assert world.task_options_at(99, cfg) == {"arith": {}}
    assert world.task_options_at(150, cfg) == {"arith": {"tool": "compute"}}
    assert set(world.task_options_at(200, cfg)) == {"arith", "guess"}


def test_bad_mode_or_task_option_in_config_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="mode must be one of"):
        world.run(tiny_run_config(tmp_path, mode="dream"))
    with pytest.raises(SystemExit, match="bad options"):
        world.run(tiny_run_config(tmp_path, changes=[(4, "arith", {"colour": "red"})]))
    with pytest.raises(SystemExit, match="unknown config key 'episode'; did you mean 'episodes'"):
        configure(world.DEFAULTS, ["--episode=3"])


def test_arith_tool_name_can_vary_per_episode():
    env = tasks.make_env("arith", tool=["calc", "math", "abacus"])
    names = {env.reset(seed).split("Tools: ")[1] for seed in range(30)}
    assert names == {"calc.", "math.", "abacus."}
    assert tasks.play_episode(env, tasks.teacher_act(env), 4)["success"]
