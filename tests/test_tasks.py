"""The world's tasks and transcripts (tasks.py): no torch needed."""
import random

import pytest

import tasks


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_each_teacher_solves_its_task_on_100_seeds(name):
    env = tasks.make_env(name)
    for seed in range(100):
        episode = tasks.play_episode(env, tasks.teacher_act(env), seed)
        assert episode["success"], episode["transcript"]
        assert episode["reward"] == tasks.SUCCESS_REWARD
        assert len(episode["actions"]) <= env.max_steps


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_env_api_contract(name):
    env = tasks.make_env(name)
    obs = env.reset(7)
    assert isinstance(obs, str) and obs and env.reset(7) == obs  # a seed fixes the episode
    assert isinstance(env.max_steps, int) and env.max_steps > 0
    obs, reward, done, info = env.step(env.teacher_action())
    assert isinstance(obs, str) and isinstance(reward, float) and isinstance(done, bool)
    assert isinstance(info["success"], bool)
    assert set(obs) <= set(tasks.ALPHABET)


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_bad_actions_explain_and_cost_a_little_never_raise(name):
    env = tasks.make_env(name)
    env.reset(0)
    for action in ["", "dance wildly", "CALL nothing here", "ANSWER banana", "go up", "take \u00e9l\u00e9phant",
                   "GUESS -5", "x" * 500 + "\nsecond line"]:
        if env.done:
            env.reset(0)
        obs, reward, done, info = env.step(action)
        assert obs and reward <= 0.0 and not info["success"]
    env.reset(0)
    obs, reward, _, info = env.step("dance wildly")
    assert obs.startswith("error:") and reward == tasks.BAD_ACTION_PENALTY and info["kind"] == "error"


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_runaway_episode_is_cut_at_the_step_cap(name):
    env = tasks.make_env(name)
    episode = tasks.play_episode(env, lambda transcript: "look around", seed=1)
    assert not episode["success"] and len(episode["actions"]) == env.max_steps
    assert "Out of steps." in episode["transcript"]


def test_step_after_done_or_before_reset_is_a_clear_error():
    env = tasks.make_env("guess")
    with pytest.raises(RuntimeError, match="reset"):
        env.step("GUESS 5")
    tasks.play_episode(env, tasks.teacher_act(env), 0)
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("GUESS 5")


def test_unknown_task_or_option_names_the_choices():
    with pytest.raises(ValueError, match="tasks are arith"):
        tasks.make_env("chess")
    with pytest.raises(ValueError, match="bad options"):
        tasks.make_env("arith", colour="red")


def test_arith_calc_tool_and_renamed_tool():
    env = tasks.make_env("arith")
    env.reset(0)
    assert env.step("CALL calc 37*45") == ("1665", 0.0, False, {"success": False, "kind": "tool",
                                                                "truncated": False, "steps": 1})
    assert env.step("CALL calc __import__('os')")[0].startswith("error:")
    renamed = tasks.make_env("arith", tool="compute")
    assert renamed.reset(0).endswith("Tools: compute.")
    obs, reward, _, _ = renamed.step("CALL calc 2*3")
    assert "the tool is compute" in obs and reward < 0
    assert renamed.step("CALL compute 2*3")[0] == "6"


def test_arith_without_tool_teacher_answers_directly():
    env = tasks.make_env("arith", tool="")
    episode = tasks.play_episode(env, tasks.teacher_act(env), 3)
    assert episode["success"] and len(episode["actions"]) == 1 and "Tools" not in episode["transcript"]


def test_lookup_facts_change_between_episodes():
    env = tasks.make_env("lookup")
    books = [dict(env.reset(seed) and env.notebook) for seed in range(5)]
    assert len({tuple(sorted(b.items())) for b in books}) == 5


def test_rooms_needs_exploration_and_boxes_hide_the_goal():
    env = tasks.make_env("rooms", box_chance=1.0)
    lengths = []
    for seed in range(50):
        episode = tasks.play_episode(env, tasks.teacher_act(env), seed)
        assert "open box" in episode["actions"]
        lengths.append(len(episode["actions"]))
    assert max(lengths) >= 4  # some goals are more than one room away


def test_transcript_marks_action_spans_and_teacher_labels():
    env = tasks.make_env("arith")
    episode = tasks.play_episode(env, tasks.teacher_act(env), 5)
    text = episode["transcript"]
    assert [text[a:b] for a, b in episode["action_spans"]] == [a + "\n" for a in episode["actions"]]
    assert episode["teacher_actions"] == episode["actions"]
    assert text.startswith("task arith\nobs Compute ") and text.endswith("done success\n")
    assert set(text) <= set(tasks.ALPHABET)


def test_noisy_teacher_sometimes_acts_at_random():
    env = tasks.make_env("guess")
    episode = tasks.play_episode(env, tasks.teacher_act(env, noise=1.0, rng=random.Random(0)), 0)
    assert episode["actions"] != episode["teacher_actions"]


def test_tasks_and_the_swarm_coordinator_import_without_torch():
    import subprocess
    import sys

    from conftest import ROOT
    out = subprocess.run([sys.executable, "-c", "import sys, tasks, swarm; print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_an_optional_task_loads_its_module_on_first_use(monkeypatch):
    import types

    class Coins(tasks.Guess):
        name = "coins"
    module = types.ModuleType("coins_env")
    module.Coins = Coins
    monkeypatch.setitem(__import__("sys").modules, "coins_env", module)
    monkeypatch.setitem(tasks.OPTIONAL_TASKS, "coins", ("coins_env", "Coins"))
    assert isinstance(tasks.make_env("coins", high=5), Coins)
    monkeypatch.setitem(tasks.OPTIONAL_TASKS, "missing", ("no_such_module_env", "Missing"))
    with pytest.raises(ValueError, match="task 'missing' cannot load"):
        tasks.make_env("missing")


def test_play_actions_replays_a_proposal_and_pads_missing_actions_with_empty_moves():
    env = tasks.make_env("arith")
    taught = tasks.play_episode(env, tasks.teacher_act(env), 9)
    assert tasks.play_actions(env, taught["actions"], 9)["transcript"] == taught["transcript"]
    short = tasks.play_actions(env, taught["actions"][:1], 9)
    assert not short["success"] and short["actions"][1:] == [""] * (len(short["actions"]) - 1)


def test_turn_by_turn_counts_the_turns_of_one_episode():
    seen = []
    act = tasks.turn_by_turn(lambda transcript, turn: seen.append(turn) or "GUESS 1")
    tasks.play_episode(tasks.make_env("guess", max_steps=3), act, 0)
    assert seen == [0, 1, 2][:len(seen)] and len(seen) >= 1


def test_notes_sit_between_the_first_observation_and_the_first_action():
    env = tasks.make_env("arith")
    episode = tasks.play_episode(env, tasks.teacher_act(env), 3, notes=["HINT: ANSWER 5"])
    lines = episode["transcript"].splitlines()
    assert lines[1].startswith("obs Compute") and lines[2] == "HINT: ANSWER 5" and lines[3].startswith("act ")
    start, end = episode["action_spans"][0]
    assert episode["transcript"][start:end] == episode["actions"][0] + "\n"
    assert tasks.play_actions(env, episode["actions"], 3, ["HINT: ANSWER 5"])["transcript"] == episode["transcript"]


def test_teacher_episodes_with_notes_show_right_and_wrong_peer_plans_and_hints():
    episodes = tasks.teacher_episodes({"arith": {}}, 60, 0.0, 0, notes=0.5)
    notes = [line for e in episodes for line in e["transcript"].splitlines() if line.split(":")[0] in tasks.NOTE_KINDS]
    peers = [n for n in notes if n.startswith("PEERS: ")]
    assert 15 <= len(peers) <= 45 and 15 <= len(notes) - len(peers) <= 45
    rights = [e for e in episodes if "PEERS: " in e["transcript"]
              and tasks.plan_text(e["actions"]) in e["transcript"].split("PEERS: ")[1].split("\n")[0]]
    assert 0 < len(rights) < len(peers)  # some peer lines hold the right plan, some do not
    assert all(e["success"] for e in episodes) and set("".join(notes)) <= set(tasks.ALPHABET)
