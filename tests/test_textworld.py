import os
import random
import sys

import pytest

import textworld_env
from textworld_env import TextWorld, game_is_whole, generate_games

TINY = {"world_size": 1, "nb_objects": 1, "quest_length": 1}  # the smallest custom game: a second or two each
SEEDS = [0, 1, 2]


@pytest.fixture(scope="session")
def games(tmp_path_factory):
    """A handful of tiny games, generated once per test run."""
    root = str(tmp_path_factory.mktemp("textworld"))
    generate_games("custom", TINY, SEEDS, root=root, workers=2)
    return root


def children():
    """Processes whose parent is this one (the game engine must not leave any behind)."""
    mine = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    mine.append(pid)
        except (OSError, IndexError):
            pass
    return mine


def engine_libraries():
    with open("/proc/self/maps") as f:
        return sum("libfrotz" in line for line in f)


def play_teacher(env, seed):
    obs, done, info, steps = env.reset(seed), False, {}, 0
    assert obs
    while not done:
        assert env.teacher_action() in env.admissible_actions()
        obs, reward, done, info = env.step(env.teacher_action())
        steps += 1
    return info, steps


def test_teacher_solves_every_generated_game(games):
    env = TextWorld(root=games, **TINY)
    for seed in SEEDS:
        info, steps = play_teacher(env, seed)
        assert info["success"] and not info["truncated"] and steps <= env.max_steps
    env.close()


def test_env_contract_and_bad_actions(games):
    env = TextWorld(root=games, max_steps=3, show=("objective", "description", "commands"), **TINY)
    obs = env.reset(0)
    assert env.reset(0) == obs and "Commands:" in obs  # a seed fixes the episode
    obs, reward, done, info = env.step("dance wildly")
    assert info["kind"] == "error" and reward == 0.0 and not done and obs
    assert env.random_action(random.Random(0)) in env.admissible_actions()
    env.step("look")
    obs, reward, done, info = env.step("look")
    assert done and info["truncated"] and not info["success"] and obs.endswith("Out of steps.")
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("look")
    env.close()


def test_cache_returns_the_same_game_for_a_seed_and_another_for_another_seed(games):
    env = TextWorld(root=games, **TINY)
    path = env.game_path(0)
    stamp = os.stat(path).st_mtime_ns
    generate_games("custom", TINY, [0], root=games)  # cached: nothing is rebuilt
    assert os.stat(path).st_mtime_ns == stamp
    with open(path, "rb") as f, open(env.game_path(1), "rb") as g:
        assert f.read() != g.read()
    first = env.reset(0)
    assert env.reset(1) != first and env.reset(0) == first
    assert TextWorld(root=games, games=2, **TINY).game_seed(7) == 1  # a training pool of 2 games
    assert TextWorld(root=games, games=2, **TINY).game_seed(textworld_env.HELD_OUT_BASE + 7) > 2
    env.close()


def test_half_written_game_is_detected_and_rebuilt(games):
    env = TextWorld(root=games, **TINY)
    path = env.game_path(2)
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[: len(whole) // 2])
    assert not game_is_whole(path)
    info, _ = play_teacher(env, 2)  # rebuilt on the way
    assert info["success"] and game_is_whole(path)
    with open(path, "rb") as f:
        assert f.read() == whole  # the same seed makes the same game
    env.close()


def test_no_engine_processes_or_libraries_left_over_many_episodes(games):
    env = TextWorld(root=games, **TINY)
    env.reset(0)
    before_children, before_fds, before_libs = children(), len(os.listdir("/proc/self/fd")), engine_libraries()
    for episode in range(60):
        play_teacher(env, SEEDS[episode % len(SEEDS)])
    assert children() == before_children
    assert len(os.listdir("/proc/self/fd")) <= before_fds
    assert engine_libraries() == before_libs  # one engine reused, not one per episode
    env.close()
    assert env.game is None


def test_bad_challenge_and_options_say_what_is_wrong(games):
    with pytest.raises(SystemExit, match="unknown TextWorld challenge 'tw-nothing'.*tw-coin_collector"):
        TextWorld(challenge="tw-nothing", root=games)
    with pytest.raises(SystemExit, match="(?s)tw-make says.*unrecognized arguments: --wrld-size"):
        TextWorld(root=games, wrld_size=3)
    with pytest.raises(SystemExit, match="(?s)tw-make says.*invalid int value"):
        TextWorld(root=games, world_size="big")
    with pytest.raises(ValueError, match="show can hold"):
        TextWorld(root=games, show=("smell",), **TINY)


def test_missing_textworld_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "textworld", None)  # import textworld now raises ImportError
    with pytest.raises(SystemExit, match="pip install textworld==1.7.0"):
        TextWorld()
