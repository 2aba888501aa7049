"""Gymnasium: every task as a registered gymnasium.Env, and world.py playing any Gymnasium text environment."""
import os
import subprocess
import sys
import warnings

import pytest

gymnasium = pytest.importorskip("gymnasium")  # optional (requirements-extras.txt); the core install runs without it

import gym_envs  # noqa: E402
import tasks  # noqa: E402
import world  # noqa: E402
from configurator import ConfigError  # noqa: E402
from conftest import ROOT  # noqa: E402
from gymnasium.utils.env_checker import check_env  # noqa: E402
from policy import load_policy  # noqa: E402
from runtime import read_jsonl  # noqa: E402
from test_world import save_tiny_policy, tiny_run_config  # noqa: E402

SCRIPTED = ["arith", "rooms", "guess", "lookup"]


@pytest.mark.parametrize("task", SCRIPTED)
def test_every_task_is_a_registered_env_that_passes_gymnasiums_checker(task):
    env = gymnasium.make(f"ulm/{task}-v0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning of the checker fails the test too
        check_env(env.unwrapped)
    assert isinstance(env.observation_space, gymnasium.spaces.Text)
    assert isinstance(env.action_space, gymnasium.spaces.Text)


@pytest.mark.parametrize("task", SCRIPTED)
def test_the_teacher_in_info_wins_the_same_episode_the_task_plays(task):
    env, plain = gymnasium.make(f"ulm/{task}-v0"), tasks.make_env(task)
    for seed in range(5):
        obs, info = env.reset(seed=seed)
        assert obs == plain.reset(seed) and info["teacher_action"] == plain.teacher_action()
        total, terminated, truncated = 0.0, False, False
        while not (terminated or truncated):
            obs, reward, terminated, truncated, info = env.step(info["teacher_action"])
            total += reward
        assert terminated and not truncated and info["success"] and total == 1.0


def test_out_of_steps_is_truncation_and_a_bad_action_is_an_error_observation():
    env = gymnasium.make("ulm/arith-v0", max_steps=2)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("DANCE")
    assert obs.startswith("error:") and reward < 0 and info["kind"] == "error" and not (terminated or truncated)
    obs, reward, terminated, truncated, info = env.step("DANCE")
    assert truncated and not terminated and obs.endswith("Out of steps.") and not info["success"]


def test_reset_without_a_seed_draws_from_the_env_and_reset_options_are_refused():
    env = gymnasium.make("ulm/guess-v0")
    _, first = env.reset(seed=1)
    seeds = {env.reset()[1]["seed"] for _ in range(5)}
    assert first["seed"] == 1 and len(seeds) == 5 and all(s < tasks.EVAL_SEED_BASE for s in seeds)
    with pytest.raises(ValueError, match="takes no reset options"):
        env.reset(options={"high": 5})
    assert env.reset(options={})[0].startswith("Guess my number")


def test_render_ansi_shows_the_transcript_a_policy_reads():
    env = gymnasium.make("ulm/arith-v0", render_mode="ansi")
    _, info = env.reset(seed=3)
    env.step(info["teacher_action"])
    text = env.render()
    assert text.startswith("task arith\nobs Compute ") and f"act {info['teacher_action']}\ntool " in text


# ----------------------------------------------------------------------------- world.py on Gymnasium environments

def test_a_registered_ulm_env_plays_in_world_exactly_as_the_task_does(tmp_path):
    policy = load_policy(save_tiny_policy(tmp_path / "start.pt"))
    through_gym, direct = tasks.make_env("gym:ulm/arith-v0", max_steps=2), tasks.make_env("arith", max_steps=2)
    for seed in range(2):
        a = tasks.play_episode(through_gym, policy.actor(1.0, seed), seed)
        b = tasks.play_episode(direct, policy.actor(1.0, seed), seed)
        assert a["transcript"].replace("task gym:ulm/arith-v0\n", "task arith\n") == b["transcript"]
        assert a["teacher_actions"] == b["teacher_actions"] and a["reward"] == b["reward"]
    cfg = tiny_run_config(tmp_path, init_from=str(tmp_path / "start.pt"), tasks={"gym:ulm/arith-v0": {"max_steps": 2}},
                          episodes=4, eval_episodes=1)
    world.run(cfg)
    rows = read_jsonl(os.path.join(cfg["out_dir"], "metrics.jsonl"))
    assert [r["episode"] for r in rows if "eval" in r] == [0, 4]
    assert set(rows[-1]["eval"]) == {"gym:ulm/arith-v0"}


class Echo(gymnasium.Env):
    """A tiny custom text environment: say the word shown. Its info gives the teacher's action and the
    commands it accepts, the keys world.py reads."""
    metadata = {"render_modes": [], "render_fps": 4}
    WORDS = ["apple", "river", "stone", "cloud"]

    def __init__(self, words=4):
        self.words = self.WORDS[:words]
        self.observation_space = gymnasium.spaces.Text(64, min_length=0, charset=tasks.ALPHABET)
        self.action_space = gymnasium.spaces.Text(32, min_length=0, charset=tasks.ALPHABET.replace("\n", ""))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.word = self.words[int(self.np_random.integers(len(self.words)))]
        return f"Say {self.word}.", self.info()

    def info(self):
        return {"teacher_action": f"SAY {self.word}", "admissible_commands": [f"SAY {w}" for w in self.words]}

    def step(self, action):
        right = action == f"SAY {self.word}"
        return ("Yes." if right else "No."), float(right), True, False, {"success": right}


gymnasium.register("ulmtest/echo-v0", entry_point=Echo)


def test_a_custom_gymnasium_text_env_passes_the_checker_and_world_imitates_and_learns_in_it(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gymnasium.make("ulmtest/echo-v0").unwrapped)
    cfg = tiny_run_config(tmp_path, tasks={"gym:ulmtest/echo-v0": {"words": 3}}, act="choose", episodes=4,
                          imitation_episodes=60, imitation_iters=2)
    result = world.run(cfg)
    assert set(result) == {"gym:ulmtest/echo-v0"} and 0.0 <= result["gym:ulmtest/echo-v0"]["success"] <= 1.0
    corpus = read_jsonl(os.path.join(cfg["out_dir"], "teacher", "transcripts.jsonl"))
    assert corpus[1]["text"].startswith("task gym:ulmtest/echo-v0\nobs Say ") and "done success" in corpus[1]["text"]
    assert "episodes/min with act=choose" in capsys.readouterr().out


class Silent(Echo):
    def info(self):
        return {}  # no teacher, no listed commands


gymnasium.register("ulmtest/silent-v0", entry_point=Silent)


def test_world_refuses_what_a_gymnasium_env_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match="has no teacher .* --init_from=<checkpoint>"):
        world.check_config(tiny_run_config(tmp_path, tasks={"gym:ulmtest/silent-v0": {}}))
    with pytest.raises(ConfigError, match="act=choose picks among the commands a task lists"):
        world.check_config(tiny_run_config(tmp_path, tasks={"gym:ulmtest/silent-v0": {}}, act="choose",
                                           teacher_help=False, init_from="x.pt"))
    with pytest.raises(ConfigError, match="Gymnasium cannot make 'ulm/chess-v0'"):
        world.check_config(tiny_run_config(tmp_path, tasks={"gym:ulm/chess-v0": {}}))
    with pytest.raises(ConfigError, match="world.py plays environments that read and write text.*observation space is Box"):
        world.check_config(tiny_run_config(tmp_path, tasks={"gym:CartPole-v1": {}}))
    with pytest.raises(ConfigError, match="bad options"):
        world.check_config(tiny_run_config(tmp_path, tasks={"gym:ulm/arith-v0": {"colour": "red"}}))


def test_the_core_imports_no_gymnasium():
    code = "import sys, tasks, world, policy; assert 'gymnasium' not in sys.modules, 'gymnasium imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
