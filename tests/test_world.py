import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import sample
import tasks
import world
from checkpoint import load_checkpoint, save_checkpoint, write_json_atomic
from configurator import ConfigError, configure, read_config_file
from conftest import ROOT
from model import GPT, GPTConfig
from policy import json_roundtrip, load_policy, reusable_policy
from runtime import read_jsonl
from test_policy import tiny_policy
from tokenizer import CharTokenizer


# ----------------------------------------------------------------------------- a whole run

def tiny_run_config(tmp_path, **overrides):
    cfg = configure(world.DEFAULTS, [])
    cfg.update(out_dir=str(tmp_path / "run"), tasks={"arith": {"max_steps": 2}}, imitation_episodes=20,
               imitation_iters=4, clone_iters=2, imitation_batch_size=4, n_layer=1, n_head=2, n_embd=32,
               block_size=192, episodes=8, episodes_per_update=4, update_batch_size=4, eval_interval=4,
               eval_episodes=2, teacher_help=True, temperature_start=1.0, temperature_end=1.0)
    cfg.update(overrides)
    return cfg


def test_choice_loss_needs_act_choose(tmp_path):
    with pytest.raises(ConfigError, match="act=choose"):
        world.check_config(tiny_run_config(tmp_path, choice_loss=True))


def test_world_run_writes_metrics_plot_and_a_loadable_policy(tmp_path):
    cfg = tiny_run_config(tmp_path)
    world.run(cfg)
    rows = read_jsonl(f"{cfg['out_dir']}/metrics.jsonl")
    assert [r["episode"] for r in rows if "eval" in r] == [0, 4, 8]
    assert (tmp_path / "run" / "world.png").exists()
    policy = load_policy(cfg["out_dir"])
    assert isinstance(tasks.play_episode(tasks.make_env("arith"), policy.act, 1)["success"], bool)
    recipe = json.loads((tmp_path / "run" / "imitation" / "recipe.json").read_text())
    assert recipe["checkpoint"].endswith("cloned.pt") and recipe["recipe"]["train"]["warmup_iters"] == 50
    assert "n_layer" in recipe["recipe"]["train"] and "grad_clip" not in recipe["recipe"]["train"]  # overrides only


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
    changes = [(100, "arith", {"tool": "compute"}), (200, "guess", {})]
    assert world.task_options_at(99, {"arith": {}}, changes) == {"arith": {}}
    assert world.task_options_at(150, {"arith": {}}, changes) == {"arith": {"tool": "compute"}}
    assert set(world.task_options_at(200, {"arith": {}}, changes)) == {"arith", "guess"}


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
        # issue 27: each of these was a traceback
        ({"tasks": {}}, "tasks must name at least one task"),  # ZeroDivisionError
        ({"tasks": {"arith": 5}}, "tasks maps each task name to a dict of its options"),  # a world job accepted, then died
        ({"changes": [(5, "arith")]}, r"each change is \(episode, task, options\)"),
        ({"tasks": {"arith": {"terms": (5, 2)}}}, r"terms is a range \(low, high\) of integers .* got \(5, 2\)"),
        ({"tasks": {"arith": {"terms": "ab"}}}, r"terms is a range \(low, high\) of integers .* got 'ab'"),
        ({"tasks": {"rooms": {"rooms": (3, 40)}}}, "at most 12 rooms have names"),
        ({"init_from": int8_export(tmp_path)}, r"is an inference export \(int8, compress.py\).*start from the checkpoint"),
    ]


def int8_export(tmp_path):
    """compress.py's int8 export of a tiny policy (quantized weights: they play, but cannot be trained)."""
    import compress
    source = save_tiny_policy(tmp_path / "to_export.pt")
    return compress.export(configure(compress.DEFAULTS, [f"--ckpt={source}", "--format=int8", "--device=cpu",
                                                         f"--out={tmp_path / 'export_int8.pt'}"]))


def test_resuming_a_checkpoint_without_a_learning_state_says_how_to_start_from_it(tmp_path):
    cfg = tiny_run_config(tmp_path, init_from="resume")
    os.makedirs(cfg["out_dir"])
    save_tiny_policy(os.path.join(cfg["out_dir"], "policy.pt"))  # weights only, as an imitation's cloned.pt
    with pytest.raises(SystemExit, match=r"policy.pt cannot be resumed: it holds no learning state \(no optimizer, "
                                         r"baselines, replay.*--init_from=.*policy.pt --out_dir=<a new folder>"):
        world.run(cfg)  # a KeyError on 'replay' before


def unwritable_folder(tmp_path):
    """A folder this process cannot create files in: root writes anywhere but a read-only file system."""
    if os.geteuid() == 0:
        return "/sys/ulm_world_test/run" if os.path.isdir("/sys") else pytest.skip("root and no read-only /sys")
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o500)
    return str(folder / "run")


def test_a_read_only_out_dir_is_a_clear_error_not_a_traceback(tmp_path):
    start = save_tiny_policy(tmp_path / "start.pt")
    with pytest.raises(SystemExit, match="cannot write to .*give --out_dir a folder you can write to"):
        world.run(tiny_run_config(tmp_path, init_from=start, out_dir=unwritable_folder(tmp_path)))


def test_a_job_with_a_bad_task_shape_exits_with_a_message_before_it_writes(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "world.py"), "--tasks={'arith': 5}",
                          f"--out_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0 and "tasks maps each task name to a dict" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


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
    recipe = world.imitation_recipe(tiny_run_config(tmp_path))
    assert recipe["train"]["warmup_iters"] == 50 and recipe["train"]["beta2"] == 0.99  # the hard-coded ones too
    checkpoint, path = save_tiny_policy(tmp_path / "cloned.pt"), str(tmp_path / "recipe.json")
    write_json_atomic(path, {"recipe": recipe, "checkpoint": checkpoint})
    assert reusable_policy(path, recipe) == checkpoint
    for stage, key in [("train", "beta2"), ("train", "warmup_iters"), ("clone", "final_lr_fraction"), ("teacher", "noise")]:
        changed = json_roundtrip(recipe)
        changed[stage][key] += 0.01
        assert reusable_policy(path, changed) is None, (stage, key)


def test_world_configs_each_write_their_own_out_dir():
    paths = sorted(glob.glob(os.path.join(ROOT, "config", "world_*.py")))
    out_dirs = [read_config_file(p)["out_dir"] for p in paths]
    assert len(paths) >= 6 and len(set(out_dirs)) == len(out_dirs)


def test_a_failing_imitation_step_shows_the_childs_last_lines_and_its_command(tmp_path):
    cfg = tiny_run_config(tmp_path, imitation_episodes=1, block_size=1024)  # too little text for the block
    with pytest.raises(SystemExit, match=r"(?s)train.py failed \(exit code 1\); its last lines:.*too few for "
                                         r"block_size=1024.*the command was: .*train.py .*--block_size=1024"):
        world.run(cfg)


def test_sigterm_during_imitation_stops_train_py_once_with_its_checkpoint_saved(tmp_path):
    out_dir = tmp_path / "run"
    args = [f"--out_dir={out_dir}", "--tasks={'arith': {'max_steps': 2}}", "--imitation_episodes=50",
            "--imitation_iters=100000", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=192"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "world.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        metrics, deadline = out_dir / "imitation" / "metrics.jsonl", time.monotonic() + 120
        while time.monotonic() < deadline and not metrics.exists():  # train.py has logged its first evaluation
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # to world.py alone, as a job runner or kill does
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "stopped during imitation" in out and "the same command starts it again" in out, out
    assert "SIGTERM: saving" in out and "again: quitting now without saving" not in out, out  # one signal reached it
    assert load_checkpoint(str(out_dir / "imitation" / "ckpt.pt"))["step"] < 100000  # saved where it stopped
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert not [line for line in running if "train.py" in line and str(out_dir) in line]  # no child left behind
