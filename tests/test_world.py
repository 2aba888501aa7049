import random

import pytest

import world


@pytest.mark.parametrize("name", list(world.TASKS))
def test_each_teacher_solves_its_task_on_100_seeds(name):
    env = world.make_env(name)
    for seed in range(100):
        episode = world.play_episode(env, world.teacher_act(env), seed)
        assert episode["success"], episode["transcript"]
        assert episode["reward"] == world.SUCCESS_REWARD
        assert len(episode["actions"]) <= env.max_steps


@pytest.mark.parametrize("name", list(world.TASKS))
def test_env_api_contract(name):
    env = world.make_env(name)
    obs = env.reset(7)
    assert isinstance(obs, str) and obs and env.reset(7) == obs  # a seed fixes the episode
    assert isinstance(env.max_steps, int) and env.max_steps > 0
    obs, reward, done, info = env.step(env.teacher_action())
    assert isinstance(obs, str) and isinstance(reward, float) and isinstance(done, bool)
    assert isinstance(info["success"], bool)
    assert set(obs) <= set(world.ALPHABET)


@pytest.mark.parametrize("name", list(world.TASKS))
def test_bad_actions_explain_and_cost_a_little_never_raise(name):
    env = world.make_env(name)
    env.reset(0)
    for action in ["", "dance wildly", "CALL nothing here", "ANSWER banana", "go up", "take \u00e9l\u00e9phant",
                   "GUESS -5", "x" * 500 + "\nsecond line"]:
        if env.done:
            env.reset(0)
        obs, reward, done, info = env.step(action)
        assert obs and reward <= 0.0 and not info["success"]
    env.reset(0)
    obs, reward, _, info = env.step("dance wildly")
    assert obs.startswith("error:") and reward == world.BAD_ACTION_PENALTY and info["kind"] == "error"


@pytest.mark.parametrize("name", list(world.TASKS))
def test_runaway_episode_is_cut_at_the_step_cap(name):
    env = world.make_env(name)
    episode = world.play_episode(env, lambda transcript: "look around", seed=1)
    assert not episode["success"] and len(episode["actions"]) == env.max_steps
    assert "Out of steps." in episode["transcript"]


def test_step_after_done_or_before_reset_is_a_clear_error():
    env = world.make_env("guess")
    with pytest.raises(RuntimeError, match="reset"):
        env.step("GUESS 5")
    world.play_episode(env, world.teacher_act(env), 0)
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("GUESS 5")


def test_unknown_task_or_option_names_the_choices():
    with pytest.raises(ValueError, match="tasks are arith"):
        world.make_env("chess")
    with pytest.raises(ValueError, match="bad options"):
        world.make_env("arith", colour="red")


def test_arith_calc_tool_and_renamed_tool():
    env = world.make_env("arith")
    env.reset(0)
    assert env.step("CALL calc 37*45") == ("1665", 0.0, False, {"success": False, "kind": "tool",
                                                                "truncated": False, "steps": 1})
    assert env.step("CALL calc __import__('os')")[0].startswith("error:")
    renamed = world.make_env("arith", tool="compute")
    assert renamed.reset(0).endswith("Tools: compute.")
    obs, reward, _, _ = renamed.step("CALL calc 2*3")
    assert "the tool is compute" in obs and reward < 0
    assert renamed.step("CALL compute 2*3")[0] == "6"


def test_arith_without_tool_teacher_answers_directly():
    env = world.make_env("arith", tool="")
    episode = world.play_episode(env, world.teacher_act(env), 3)
    assert episode["success"] and len(episode["actions"]) == 1 and "Tools" not in episode["transcript"]


def test_lookup_facts_change_between_episodes():
    env = world.make_env("lookup")
    books = [dict(env.reset(seed) and env.notebook) for seed in range(5)]
    assert len({tuple(sorted(b.items())) for b in books}) == 5


def test_rooms_needs_exploration_and_boxes_hide_the_goal():
    env = world.make_env("rooms", box_chance=1.0)
    lengths = []
    for seed in range(50):
        episode = world.play_episode(env, world.teacher_act(env), seed)
        assert "open box" in episode["actions"]
        lengths.append(len(episode["actions"]))
    assert max(lengths) >= 4  # some goals are more than one room away


def test_transcript_marks_action_spans_and_teacher_labels():
    env = world.make_env("arith")
    episode = world.play_episode(env, world.teacher_act(env), 5)
    text = episode["transcript"]
    assert [text[a:b] for a, b in episode["action_spans"]] == [a + "\n" for a in episode["actions"]]
    assert episode["teacher_actions"] == episode["actions"]
    assert text.startswith("task arith\nobs Compute ") and text.endswith("done success\n")
    assert set(text) <= set(world.ALPHABET)


def test_noisy_teacher_sometimes_acts_at_random():
    env = world.make_env("guess")
    episode = world.play_episode(env, world.teacher_act(env, noise=1.0, rng=random.Random(0)), 0)
    assert episode["actions"] != episode["teacher_actions"]


# ----------------------------------------------------------------------------- policy and learning

import torch  # noqa: E402

from configurator import configure  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import CharTokenizer  # noqa: E402


def tiny_policy(block_size=192):
    torch.manual_seed(0)
    tokenizer = CharTokenizer(sorted(set(world.ALPHABET)))
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
    assert isinstance(action, str) and "\n" not in action and len(action) <= world.MAX_ACTION_CHARS


def test_policy_acts_on_transcripts_longer_than_its_context():
    policy = tiny_policy(block_size=64)
    assert isinstance(policy.act("task rooms\n" + "obs You are in the hall.\n" * 20, seed=1), str)


def test_a_few_learning_steps_change_the_weights_and_lower_the_loss():
    policy = tiny_policy()
    env = world.make_env("arith")
    items = [world.episode_item(world.play_episode(env, world.teacher_act(env), s), 0) for s in range(8)]
    before = [p.detach().clone() for p in policy.model.parameters()]
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=3e-3)
    losses = [world.update(policy, optimizer, items, [1.0] * len(items)) for _ in range(10)]
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))


def test_reinforce_weight_sign_pushes_probability_up_or_down():
    env = world.make_env("arith")
    item = world.episode_item(world.play_episode(env, world.teacher_act(env), 0), 0)
    results = {}
    for sign in (1.0, -1.0):
        policy = tiny_policy()
        optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.5)
        first = world.update(policy, optimizer, [item], [sign])
        results[sign] = world.update(policy, optimizer, [item], [1.0]) - abs(first)
    assert results[1.0] < 0 < results[-1.0]  # the loss of the actions fell after +1 and rose after -1


def test_action_batch_trains_only_on_action_tokens():
    policy = tiny_policy()
    env = world.make_env("arith")
    episode = world.play_episode(env, world.teacher_act(env), 0)
    x, y = world.action_batch(policy, [world.episode_item(episode, 0)])
    trained = policy.tokenizer.decode([t for t in y[0].tolist() if t != -1])
    assert trained == "".join(a + "\n" for a in episode["actions"])


def test_teacher_help_labels_the_states_where_the_policy_went_wrong():
    env = world.make_env("arith")
    episode = world.play_episode(env, lambda transcript: "ANSWER 7", 0)
    items = world.teacher_items(episode, 3)
    assert len(items) == 1 and items[0]["text"].endswith(f"act CALL calc {env.expression}\n")
    start, end = items[0]["spans"][0]
    assert items[0]["text"][start:end] == f"CALL calc {env.expression}\n"


def test_replay_keeps_recent_items_and_mixes_them_with_old_ones():
    rng = random.Random(0)
    replay = world.Replay(size=50, recent_window=10, recent_fraction=0.5)
    for i in range(200):
        replay.add({"episode": i}, rng)
    assert len(replay.items) == 50 and [it["episode"] for it in replay.items[-10:]] == list(range(190, 200))
    batch = [it["episode"] for it in replay.sample(20, rng)]
    assert sum(e >= 190 for e in batch) >= 10 and any(e < 190 for e in batch)


def test_world_run_writes_metrics_plot_and_a_loadable_policy(tmp_path):
    cfg = tiny_run_config(tmp_path)
    world.run(cfg)
    rows = world.read_rows(f"{cfg['out_dir']}/metrics.jsonl")
    assert [r["episode"] for r in rows if "eval" in r] == [0, 4, 8]
    assert (tmp_path / "run" / "world.png").exists()
    policy = world.load_policy(cfg["out_dir"])
    assert isinstance(world.play_episode(world.make_env("arith"), policy.act, 1)["success"], bool)


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    whole = tiny_run_config(tmp_path, out_dir=str(tmp_path / "whole"))
    world.run(whole)
    split = tiny_run_config(tmp_path, out_dir=str(tmp_path / "split"), episodes=4)
    world.run(split)
    world.run(split | {"episodes": 8, "init_from": "resume"})

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    a, b = (strip(world.read_rows(f"{c['out_dir']}/metrics.jsonl")) for c in (whole, split))
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
