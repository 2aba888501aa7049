import dataclasses
import os
import random
import sys

import pytest

import torch

import prepare
import tasks
import textworld_env
import train
import world
from checkpoint import save_checkpoint
from configurator import configure
from model import GPT, GPTConfig
from policy import Policy, load_policy
from runtime import read_jsonl
from textworld_env import TextWorld, game_is_whole, generate_games
from tokenizer import CharTokenizer

TINY = {"world_size": 1, "nb_objects": 1, "quest_length": 1}  # the smallest custom game: a second or two each
SEEDS = [0, 1, 2]
HELD_OUT = tasks.EVAL_SEED_BASE


@pytest.fixture(scope="session")
def games(tmp_path_factory):
    """A handful of tiny games (a training pool of three and one held-out game), generated once per test run."""
    root = str(tmp_path_factory.mktemp("textworld"))
    generate_games("custom", TINY, SEEDS + [HELD_OUT], root=root, workers=2)
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


def test_an_action_with_backslashes_or_odd_characters_is_an_error_step_not_a_crash(games):
    # dumb-frotz takes a backslash as one of its own commands; random text with one ("\\q") killed the process
    env = TextWorld(root=games, max_steps=10, **TINY)
    env.reset(0)
    for action in ("\\q", "\\help", "m\"*p$H]*A`crw(XS \u00e9\u2603", "/cJSuHvA_NK6\"!i3(.3mhE_S\\R*U&E[za"):
        obs, reward, done, info = env.step(action)
        assert info["kind"] == "error" and isinstance(obs, str)
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
    with pytest.raises(SystemExit, match=r"\{'world_size': -3\} for custom: sizes must be at least 1"):
        TextWorld(root=games, **TINY | {"world_size": -3})  # tw-make's parser took it, its generator hit a NaN


def test_a_tw_make_crash_is_a_message_not_a_traceback(monkeypatch):
    def crash(*args, **kwargs):
        raise ValueError("cannot convert float NaN to integer")
    monkeypatch.setattr("runpy.run_path", crash)
    code, printed = textworld_env.run_tw_make(["custom", "--seed", "0"])
    assert code == 1 and "tw-make failed: ValueError: cannot convert float NaN to integer" in printed


def test_missing_textworld_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "textworld", None)  # import textworld now raises ImportError
    with pytest.raises(SystemExit, match="pip install textworld==1.7.0"):
        TextWorld()


# ----------------------------------------------------------------------------- playing with a µLM policy

def tiny_char_policy(block_size=1024):
    torch.manual_seed(0)
    tokenizer = CharTokenizer(sorted(set(tasks.ALPHABET)))
    model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=block_size, n_layer=1, n_head=2,
                                      n_embd=32))
    return Policy(model, tokenizer)


def test_choose_takes_the_command_the_policy_scores_highest(games):
    env = TextWorld(root=games, **TINY)
    policy = tiny_char_policy()

    def walkthrough_first(items):  # a policy that finds the teacher's command likeliest
        right = env.teacher_action() + "\n"
        scores = torch.tensor([0.0 if item["text"].endswith(right) else -10.0 for item in items])
        return scores, torch.ones(len(items), dtype=torch.long)
    policy.action_log_likelihood = walkthrough_first
    for seed in SEEDS:
        episode = tasks.play_episode(env, policy.actor(0.0, seed, env, "choose"), seed)
        assert episode["success"] and episode["actions"] == episode["teacher_actions"]
    env.close()


def test_choose_untried_never_takes_a_command_twice_in_the_same_state(games):
    env = TextWorld(root=games, max_steps=4, **TINY)
    env.reset(0)
    start = env.state_key()
    env.step("look")
    assert env.state_key() == start  # nothing changed
    env.step(env.teacher_action())
    assert env.state_key() != start
    policy = tiny_char_policy()

    def look_first(items):  # a policy stuck on a command that changes nothing
        return torch.tensor([0.0 if item["text"].endswith("look\n") else -1.0 for item in items]), \
            torch.ones(len(items), dtype=torch.long)
    policy.action_log_likelihood = look_first
    stuck = tasks.play_episode(env, policy.actor(0.0, 0, env, "choose"), 0)
    assert stuck["actions"] == ["look"] * 4
    moving = tasks.play_episode(env, policy.actor(0.0, 0, env, "choose", untried=True), 0)
    assert moving["actions"][0] == "look" and moving["actions"][1] != "look"
    env.close()


def test_failures_are_sorted_into_loops_and_the_rest(games):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import textworld_failures
    policy = tiny_char_policy()
    policy.action_log_likelihood = lambda items: (  # stuck on 'look', the teacher's command last
        torch.tensor([0.0 if item["text"].endswith("look\n") else -1.0 for item in items]),
        torch.ones(len(items), dtype=torch.long))
    options = {"root": games, "max_steps": 3, **TINY}
    stuck = textworld_failures.play(policy, options, 1, untried=False)
    assert stuck["success"] == 0.0 and stuck["kinds"]["loop"] == 1
    assert stuck["failures"][0]["chosen"] == "look" and stuck["failures"][0]["first_wrong_step"] == 0
    moving = textworld_failures.play(policy, options, 1, untried=True)
    assert moving["kinds"]["loop"] == 0


def test_choose_scores_the_real_model_and_samples_when_warm(games):
    env = TextWorld(root=games, **TINY)
    policy = tiny_char_policy()
    transcript = f"task textworld\nobs {env.reset(0)}\n"
    commands = env.admissible_actions()
    assert policy.choose(transcript, commands) == policy.choose(transcript, commands)  # greedy is deterministic
    picks = {policy.choose(transcript, commands, temperature=100.0, seed=s) for s in range(20)}
    assert len(picks) > 1 and picks <= set(commands)
    env.close()


def world_config(tmp_path, games, **overrides):
    cfg = configure(world.DEFAULTS, [])
    cfg.update(out_dir=str(tmp_path / "run"), tasks={"textworld": {"root": games, "games": len(SEEDS), **TINY}},
               act="choose", imitation_episodes=40, imitation_iters=3, clone_iters=2, imitation_batch_size=2,
               n_layer=1, n_head=2, n_embd=32, block_size=1024, episodes=4, episodes_per_update=2,
               update_batch_size=2, eval_interval=4, eval_episodes=1, teacher_help=True)
    cfg.update(overrides)
    return cfg


def test_world_run_imitates_and_learns_on_textworld_games(games, tmp_path, capsys):
    before = children()  # earlier tests may leave long-lived helpers (multiprocessing's resource tracker)
    world.run(world_config(tmp_path, games))
    rows = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["episode"] for r in rows if "eval" in r] == [0, 4]
    assert "episodes/min with act=choose" in capsys.readouterr().out
    assert set(children()) <= set(before)


def test_a_bpe_checkpoint_from_train_py_plays_textworld_end_to_end(games, tmp_path):
    text = "You are in a kitchen. There is a box. You take the key from the box.\n" * 200
    (tmp_path / "story.txt").write_text(text)
    prepare.prepare(configure(prepare.DEFAULTS, [f"--dataset={tmp_path / 'story.txt'}", "--name=story",
                                                 "--tokenizer=gpt2", f"--data_dir={tmp_path / 'data'}"]))
    run = configure(train.DEFAULTS, []) | dict(
        out_dir=str(tmp_path / "lm"), data_dir=str(tmp_path / "data"), dataset="story", device="cpu", n_layer=1,
        n_head=2, n_embd=16, block_size=384, batch_size=2, max_iters=2, eval_interval=2, eval_iters=1,
        log_interval=1, warmup_iters=1, compile=False)
    train.train(run)
    for act in ("generate", "choose"):
        # an untrained BPE model never ends a line: 3 turns of MAX_ACTION_CHARS tokens each keep this fast
        cfg = world_config(tmp_path, games, init_from=str(tmp_path / "lm"), out_dir=str(tmp_path / act), act=act,
                           tasks={"textworld": {"root": games, "games": len(SEEDS), "max_steps": 3, **TINY}},
                           episodes=1, update_batch_size=1, episodes_per_update=1, eval_interval=1)
        result = world.run(cfg)
        assert 0.0 <= result["textworld"]["success"] <= 1.0
        assert load_policy(cfg["out_dir"]).tokenizer.name == "gpt2"


def test_a_block_too_small_for_one_turn_or_missing_characters_is_a_clear_error(games, tmp_path):
    small = str(tmp_path / "small.pt")
    save_checkpoint(small, world_checkpoint(tiny_char_policy(block_size=32)))
    with pytest.raises(SystemExit, match="block_size 32 is smaller than one turn"):
        world.run(world_config(tmp_path, games, init_from=small, out_dir=str(tmp_path / "a")))
    policy = tiny_char_policy()
    policy.tokenizer = CharTokenizer([c for c in tasks.ALPHABET if c != "="])
    lacking = str(tmp_path / "lacking.pt")
    save_checkpoint(lacking, world_checkpoint(policy))
    with pytest.raises(SystemExit, match="lacks '='"):
        world.run(world_config(tmp_path, games, init_from=lacking, out_dir=str(tmp_path / "b")))


def test_choose_needs_a_task_that_lists_its_commands(tmp_path, games):
    with pytest.raises(SystemExit, match="act=choose picks among the commands a task lists, and arith lists none"):
        world.run(world_config(tmp_path, games, tasks={"arith": {}}))


def world_checkpoint(policy):
    return {"model_args": dataclasses.asdict(policy.model.config), "model": policy.model.state_dict(),
            "tokenizer": policy.tokenizer_meta()}


def test_tw_make_is_found_beside_a_target_install(tmp_path, monkeypatch):
    """`pip install --target DIR` (the GPU machine's way) puts tw-make in DIR/bin, not beside python."""
    (tmp_path / "textworld").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tw-make").write_text("")
    fake = type("textworld", (), {"__file__": str(tmp_path / "textworld" / "__init__.py")})
    monkeypatch.setattr(textworld_env, "import_textworld", lambda: fake)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python" / "bin" / "python"))
    monkeypatch.setenv("PATH", "")
    assert textworld_env.tw_make_path() == str(tmp_path / "bin" / "tw-make")


def test_suite_runs_wait_for_the_run_whose_policy_they_start_from():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import textworld_suite
    cfg = configure(textworld_suite.DEFAULTS, [os.path.join(root, "config", "textworld_suite_gpu.py")])
    plan = textworld_suite.jobs(cfg)
    assert {"easy1000_generate", "hard_reinforce", "walk300_pretrained", "shift_no_replay", "hard_only"} <= set(plan)
    for name, (_, args, waits) in plan.items():
        assert set(waits) <= set(plan)
        for arg in args:
            start = arg.get("init_from", "") if isinstance(arg, dict) else str(arg)
            producers = [other for other in plan if os.path.join(cfg["out"], other) + os.sep in start]
            assert set(producers) <= set(waits), (name, start)


def test_suite_runs_only_the_chosen_experiments_and_makes_only_their_games(monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import textworld_suite
    cfg = configure(textworld_suite.DEFAULTS, [os.path.join(root, "config", "textworld_suite_gpu.py"), "--experiments=[2,4]"])
    assert set(textworld_suite.jobs(cfg)) == {"easy300_choose", "hard_imitation", "hard_expert_iteration", "hard_reinforce",
                                              "shift_replay", "shift_no_replay", "hard_only"}
    made = {}
    monkeypatch.setattr(textworld_suite.textworld_env, "generate_games",
                        lambda challenge, options, seeds: made.setdefault(options["world_size"], seeds))
    textworld_suite.make_games(cfg)
    easy, hard = made[cfg["easy"]["world_size"]], made[cfg["hard"]["world_size"]]
    assert max(s for s in easy if s < HELD_OUT) == cfg["start_games"] - 1  # not experiment 1's 1000 games
    assert len(easy) == cfg["start_games"] + cfg["eval_episodes"] and len(hard) == cfg["hard_games"] + cfg["eval_episodes"]


def test_suite_passes_the_online_learning_options_to_every_online_run():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import textworld_suite
    cfg = configure(textworld_suite.DEFAULTS, [os.path.join(root, "config", "textworld_suite_gpu.py"), "--experiments=[2,4]",
                                               "--choice_loss=True", "--temperature_start=0.3", "--temperature_end=0.1"])
    plan = textworld_suite.jobs(cfg)
    for name in ("hard_expert_iteration", "hard_reinforce", "shift_replay", "shift_no_replay", "hard_only"):
        run = plan[name][1][0]
        assert run["choice_loss"] and (run["temperature_start"], run["temperature_end"]) == (0.3, 0.1), name


def test_every_world_run_the_suite_plans_passes_world_checks():
    # the GPU suite once planned act=generate runs with choice_loss on, which world.py refuses at start
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import textworld_suite
    cfg = configure(textworld_suite.DEFAULTS, [os.path.join(root, "config", "textworld_suite_gpu.py")])
    runs = [(name, args[0]) for name, (function, args, _) in textworld_suite.jobs(cfg).items()
            if function is textworld_suite.world_run]
    assert {"easy1000_generate", "hard_expert_iteration", "shift_replay"} <= {name for name, _ in runs}
    for name, run in runs:
        world.check_config(configure(world.DEFAULTS, []) | run)  # the suite passes overrides to python world.py
        assert run["choice_loss"] == (run["act"] == "choose"), name
    fewer = configure(textworld_suite.DEFAULTS, [os.path.join(root, "config", "textworld_suite_gpu.py"),
                                                 "--generate_held_out=50"])
    plan = textworld_suite.jobs(fewer)
    assert plan["easy1000_generate"][1][0]["eval_episodes"] == 50
    assert plan["easy1000_choose"][1][0]["eval_episodes"] == fewer["held_out"] == 200


def test_suite_runs_only_the_chosen_learners(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import textworld_suite
    cfg = configure(textworld_suite.DEFAULTS, [os.path.join(root, "config", "textworld_suite_gpu.py"),
                                               "--experiments=[2]", "--learners=['reinforce']"])
    assert set(textworld_suite.jobs(cfg)) == {"hard_imitation", "hard_reinforce"}
    with pytest.raises(SystemExit, match="unknown \\['ppo'\\]"):
        textworld_suite.main(["--learners=['ppo']", f"--out={tmp_path}"])


def test_suite_reads_a_finished_run_back_and_records_a_failed_one(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import textworld_suite
    from checkpoint import write_json_atomic
    cfg = {"out": str(tmp_path)}
    write_json_atomic(str(tmp_path / "done.json"), {"success": 0.5})
    assert textworld_suite.run_job("done", None, [], cfg, 1) == {"success": 0.5}  # not run again

    def fails(cfg):
        raise SystemExit("no games")
    fd1, fd2 = os.dup(1), os.dup(2)  # run_job sends this process's output to its log, as in a worker
    try:
        assert textworld_suite.run_job("broken", fails, [], cfg, 1) == {"error": "SystemExit: no games"}
    finally:
        os.dup2(fd1, 1)
        os.dup2(fd2, 2)
    assert "no games" in (tmp_path / "broken.log").read_text()
    assert not (tmp_path / "broken.json").exists()  # a later suite tries it again


def test_failures_refuses_empty_sizes_before_making_anything(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import textworld_failures
    for bad in ("--held_out=0", "--games=0", "--seeds=[]"):
        with pytest.raises(SystemExit, match="need games, held_out and imitation_per_game >= 1"):
            textworld_failures.main([bad, f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_seeds_report_means_and_spreads_of_suite_runs(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import textworld_seeds
    from checkpoint import read_json, write_json_atomic

    def suite(seed, easy, hard, shift):
        path = str(tmp_path / f"suite{seed}.json")
        write_json_atomic(path, {"config": {"seed": seed, "experiments": [1, 2, 4]},
                                 "summary": {"1_easy": easy, "2_hard": hard, "4_shift": shift}})
        return path

    def shift(before, end, new, hard_only):
        side = {"old_before_shift": before, "old_at_end": end, "new": [[4, 0.1], [8, new]]}
        return {"shift_replay": side, "shift_no_replay": dict(side, old_at_end=None), "hard_only": {"new": [[8, hard_only]]}}

    runs = [suite(1, [{"games": 10, "choose": 0.9, "generate": None}],
                  {"episodes": 8, "imitation": 0.2, "expert_iteration": [[0, 0.2], [8, 0.5]], "reinforce": [[0, 0.2], [4, 0.3]]},
                  shift(0.8, 0.7, 0.4, 0.5)),
            suite(2, [{"games": 10, "choose": 0.7, "generate": 0.1}],
                  {"episodes": 8, "imitation": 0.1, "expert_iteration": [[0, 0.1], [8, 0.2]], "reinforce": [[0, 0.1], [8, 0.1]]},
                  shift(0.9, 0.9, 0.2, 0.4))]
    textworld_seeds.main([f"--runs={runs}", f"--out={tmp_path / 'seeds'}"])
    numbers = read_json(str(tmp_path / "seeds.json"), "")
    choose = numbers["1_easy"]["10"]["choose"]
    assert choose["n"] == 2 and abs(choose["mean"] - 0.8) < 1e-9 and abs(choose["std"] - 0.1414) < 1e-3
    assert numbers["1_easy"]["10"]["generate"]["values"] == [0.1]  # a run without the number is left out
    ei, rf = numbers["2_hard"]["8"]["expert_iteration"], numbers["2_hard"]["8"]["reinforce"]
    assert [round(v, 6) for v in ei["lift_at_end"]["values"]] == [0.3, 0.1]
    assert rf["lift_at_end"]["values"] == [0.0] and rf["last_episode"] == [4, 8]  # seed 1's was cut at 4 of 8
    replay = numbers["4_shift"]["shift_replay"]
    assert [round(v, 6) for v in replay["old_drop"]["values"]] == [0.1, 0.0]
    assert [round(v, 6) for v in replay["new_over_hard_only"]["values"]] == [0.8, 0.5]
    assert numbers["4_shift"]["shift_no_replay"]["old_drop"]["n"] == 0
    assert (tmp_path / "seeds.png").stat().st_size > 0
    only_reinforce = str(tmp_path / "suite3.json")  # a suite run of experiment 2 and one learner
    write_json_atomic(only_reinforce, {"config": {"seed": 3, "experiments": [2]}, "summary": {"2_hard": {
        "episodes": 8, "imitation": 0.2, "expert_iteration": [], "reinforce": [[0, 0.2], [8, 0.3]]}}})
    textworld_seeds.main([f"--runs={[only_reinforce]}", f"--out={tmp_path / 'rf'}"])  # one panel: experiment 2's
    assert read_json(str(tmp_path / "rf.json"), "")["2_hard"]["8"]["reinforce"]["lift_at_end"]["n"] == 1
    cut = str(tmp_path / "suite4.json")  # stopped before any experiment had a number
    write_json_atomic(cut, {"config": {"seed": 4, "experiments": [2]}, "summary": {}})
    textworld_seeds.main([f"--runs={[cut]}", f"--out={tmp_path / 'cut'}"])
    assert (tmp_path / "cut.json").exists() and not (tmp_path / "cut.png").exists()
    with pytest.raises(SystemExit, match="--runs is empty"):
        textworld_seeds.main([f"--out={tmp_path / 'none'}"])


def test_textworld_is_a_gymnasium_env_that_passes_the_checker(games):
    gymnasium = pytest.importorskip("gymnasium")  # optional (requirements-extras.txt)
    import gym_envs  # noqa: F401  (registers ulm/textworld-v0)
    from gymnasium.utils.env_checker import check_env
    env = gymnasium.make("ulm/textworld-v0", root=games, games=len(SEEDS), **TINY)
    check_env(env.unwrapped)
    obs, info = env.reset(seed=1)
    assert obs and info["teacher_action"] in info["admissible_commands"]
    terminated = truncated = False
    while not (terminated or truncated):
        obs, reward, terminated, truncated, info = env.step(info["teacher_action"])
    assert terminated and info["success"]
    env.close()
