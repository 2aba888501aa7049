import dataclasses
import glob
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
from checkpoint import load_checkpoint, save_checkpoint, write_json_atomic
from configurator import ConfigError, configure, read_config_file
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


class ListedArith(tasks.Arith):
    """Arith as a task that lists its commands, as textworld does: the right call, a wrong one, an answer."""
    def admissible_actions(self):
        return [f"CALL calc {self.expression}", "CALL calc 1+1", f"ANSWER {self.answer}"]


def test_episodes_and_teacher_labels_keep_the_commands_listed_in_each_state():
    env = ListedArith()
    episode = tasks.play_episode(env, lambda transcript: "CALL calc 1+1", 0)
    assert len(episode["choices"]) == len(episode["actions"]) and episode["choices"][0][0] == episode["teacher_actions"][0]
    item = world.teacher_items(episode, 0)[0]
    assert item["choices"] == [episode["choices"][0]] and world.episode_item(episode, 0)["choices"] == episode["choices"]
    assert "choices" not in tasks.play_episode(tasks.make_env("arith"), lambda transcript: "ANSWER 1", 0)


def test_choice_loss_lifts_the_label_to_the_top_of_the_listed_commands():
    env = ListedArith()
    transcript = tasks.play_episode(env, tasks.teacher_act(env), 0)["transcript"]
    context = transcript[:transcript.index("act ")]
    policy = tiny_policy()
    listed = ["CALL calc 1+1", f"CALL calc {env.expression}", "ANSWER 7", "look"]
    with torch.no_grad():
        scores = policy.command_scores(context, listed)
    label = listed[int(scores.argmin())]  # the policy ranks it last
    start = len(context) + len(tasks.ACTION_PREFIX)
    item = {"text": f"{context}act {label}\n", "spans": [[start, start + len(label) + 1]], "choices": [listed]}
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=3e-3)
    losses = [world.choice_update(policy, optimizer, [item], [1.0]) for _ in range(15)]
    assert losses[-1] < losses[0] and policy.choose(context, listed) == label


def test_choice_loss_refuses_replay_items_without_their_listed_commands():
    item = {"text": "task t\nobs o\nact look\n", "spans": [[14, 19]]}  # kept by a run before choice_loss
    policy = tiny_policy()
    with pytest.raises(SystemExit, match="1 replay items have none"):
        world.choice_update(policy, torch.optim.AdamW(policy.model.parameters()), [item], [1.0])
    # a run resumed with choice_loss is refused when its replay is read back, before any episode is played
    optimizer = torch.optim.AdamW(policy.model.parameters())
    state = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "rng": random.Random(0).getstate(),
             "replay": [item], "step": 0, "baselines": {}}
    cfg = world.configure(world.DEFAULTS, ["--choice_loss=True", "--act=choose"])
    with pytest.raises(SystemExit, match="1 replay items have none"):
        world.resume_progress(state, optimizer, cfg)
    assert world.resume_progress(state, optimizer, cfg | {"choice_loss": False}).replay.items == [item]


def test_choice_loss_needs_act_choose(tmp_path):
    with pytest.raises(ConfigError, match="act=choose"):
        world.check_config(tiny_run_config(tmp_path, choice_loss=True))


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
    recipe = json.loads((tmp_path / "run" / "imitation" / "recipe.json").read_text())
    assert recipe["checkpoint"].endswith("cloned.pt") and recipe["recipe"]["train"]["warmup_iters"] == 50


def test_a_world_policy_has_the_one_checkpoint_layout_and_sample_py_reads_it(tmp_path, capsys):
    cfg = tiny_run_config(tmp_path, init_from=save_tiny_policy(tmp_path / "start.pt"), episodes=4)
    world.run(cfg)
    capsys.readouterr()
    state = load_checkpoint(f"{cfg['out_dir']}/policy.pt")
    assert state["kind"] == "world" and state["step"] == 4 and state["val_loss"] is None
    assert state["tokenizer"]["tokenizer"] == "char"
    sample.main([f"--out_dir={cfg['out_dir']}", f"--ckpt={cfg['out_dir']}/policy.pt", "--start=task arith\n",
                 "--max_new_tokens=5", "--device=cpu"])
    out = capsys.readouterr()
    assert out.out.startswith("task arith\n") and "step 4" in out.err


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


def save_checkpoint_with_tokenizer(path, tokenizer_meta, chars=tasks.ALPHABET):
    """A tiny model checkpoint with any tokenizer record: a stand-in for a train.py run on other text."""
    tokenizer = CharTokenizer(chars)
    model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16))
    state = {"model_args": dataclasses.asdict(model.config), "model": model.state_dict()}
    save_checkpoint(str(path), state | ({"tokenizer": tokenizer_meta} if tokenizer_meta else {}))
    return str(path)


def bad_world_inputs(tmp_path):
    letters = " !',-.:;?\nABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    shakespeare = save_checkpoint_with_tokenizer(tmp_path / "shakespeare.pt", {"tokenizer": "char", "chars": list(letters)},
                                                 chars=letters)
    bpe = save_checkpoint_with_tokenizer(tmp_path / "bpe.pt", {"tokenizer": "gpt2"})
    untagged = save_checkpoint_with_tokenizer(tmp_path / "untagged.pt", None)
    return [  # (config overrides, what the message must say)
        ({"mode": "dream"}, "mode must be one of evaluate"),
        ({"changes": [(4, "arith", {"colour": "red"})]}, "bad options"),
        ({"tasks": {"chess": {}}}, "unknown task 'chess'"),
        ({"init_from": "resume"}, "nothing to resume"),
        ({"init_from": str(tmp_path / "nowhere.pt")}, "no policy at .*python world.py config/world_arith.py"),
        ({"init_from": shakespeare}, "cannot play arith: its character vocabulary lacks '.*1345"),
        ({"init_from": bpe}, "'gpt2' tokenizer has 50257 tokens, its model only"),
        ({"init_from": untagged}, "has no tokenizer"),
    ]


def test_bad_world_inputs_stop_with_a_message_and_leave_out_dir_alone(tmp_path):
    for overrides, message in bad_world_inputs(tmp_path):
        cfg = tiny_run_config(tmp_path, **overrides)
        with pytest.raises(SystemExit, match=message):
            world.run(cfg)
        assert not os.path.exists(cfg["out_dir"]), overrides
    with pytest.raises(SystemExit, match="unknown config key 'episode'; did you mean 'episodes'"):
        configure(world.DEFAULTS, ["--episode=3"])


def test_a_bad_value_on_the_command_line_exits_nonzero_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "world.py"), "--mode=dream", f"--out_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0 and "mode must be one of" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_bad_world_config_raises_the_same_error_kind_as_swarm(tmp_path):
    with pytest.raises(ConfigError, match="mode must be one of"):
        world.run(tiny_run_config(tmp_path, mode="imitate"))  # the old name of mode="evaluate"


def test_a_fresh_run_into_an_out_dir_holding_a_run_refuses_unless_told_to_overwrite(tmp_path):
    start = save_tiny_policy(tmp_path / "start.pt")
    cfg = tiny_run_config(tmp_path, init_from=start, mode="evaluate", eval_episodes=1)
    world.run(cfg)
    before = {p: os.path.getmtime(p) for p in (f"{cfg['out_dir']}/policy.pt", f"{cfg['out_dir']}/metrics.jsonl")}
    with pytest.raises(SystemExit, match="already holds a run .*--overwrite=True"):
        world.run(cfg)
    assert before == {p: os.path.getmtime(p) for p in before}
    world.run(cfg | {"overwrite": True})
    aside = [n for n in os.listdir(cfg["out_dir"]) if n.startswith("replaced-")]
    assert len(aside) == 1 and os.path.exists(os.path.join(cfg["out_dir"], aside[0], "policy.pt"))
    assert len(read_jsonl(f"{cfg['out_dir']}/metrics.jsonl")) == 1


def test_sigterm_saves_the_policy_and_the_run_resumes(tmp_path):
    start = save_tiny_policy(tmp_path / "start.pt")
    out_dir = tmp_path / "run"
    args = [f"--out_dir={out_dir}", f"--init_from={start}", "--tasks={'arith': {'max_steps': 2}}",
            "--episodes=100000", "--episodes_per_update=2", "--update_batch_size=2", "--eval_interval=100000",
            "--eval_episodes=1", "--teacher_help=True"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "world.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        metrics, deadline = out_dir / "metrics.jsonl", time.monotonic() + 120
        while time.monotonic() < deadline and '"train"' not in (metrics.read_text() if metrics.exists() else ""):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "SIGTERM" in out and "resume with --init_from=resume" in out, out
    episode = load_checkpoint(str(out_dir / "policy.pt"))["step"]
    rows = read_jsonl(str(metrics))
    assert episode > 0 and rows[-1] == {"episode": episode, "eval": rows[-1]["eval"]}
    resumed = configure(world.DEFAULTS, args + ["--init_from=resume", f"--episodes={episode + 2}"])
    world.run(resumed)
    assert load_checkpoint(str(out_dir / "policy.pt"))["step"] == episode + 2


def test_arith_tool_name_can_vary_per_episode():
    env = tasks.make_env("arith", tool=["calc", "math", "abacus"])
    names = {env.reset(seed).split("Tools: ")[1] for seed in range(30)}
    assert names == {"calc.", "math.", "abacus."}
    assert tasks.play_episode(env, tasks.teacher_act(env), 4)["success"]


def test_imitation_is_reused_only_when_every_setting_that_shaped_it_matches(tmp_path):
    recipe = world.json_roundtrip(world.imitation_recipe(tiny_run_config(tmp_path)))
    assert recipe["train"]["warmup_iters"] == 50 and recipe["train"]["beta2"] == 0.99  # the hard-coded ones too
    checkpoint, path = save_tiny_policy(tmp_path / "cloned.pt"), str(tmp_path / "recipe.json")
    write_json_atomic(path, {"recipe": recipe, "checkpoint": checkpoint})
    assert world.reusable_imitation(path, recipe) == checkpoint
    for stage, key in [("train", "beta2"), ("train", "warmup_iters"), ("clone", "final_lr_fraction"), ("teacher", "noise")]:
        changed = world.json_roundtrip(recipe)
        changed[stage][key] += 0.01
        assert world.reusable_imitation(path, changed) is None, (stage, key)


def test_world_configs_each_write_their_own_out_dir():
    paths = sorted(glob.glob(os.path.join(ROOT, "config", "world_*.py")))
    out_dirs = [read_config_file(p)["out_dir"] for p in paths]
    assert len(paths) >= 6 and len(set(out_dirs)) == len(out_dirs)
