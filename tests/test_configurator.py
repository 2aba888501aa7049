import pytest

from configurator import ConfigError, configure

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, device="cpu", compile=False, memory_layers=[], seed=None)


def test_files_then_arguments_override_defaults_in_order(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("batch_size = 32\ndevice = 'cuda'\n")
    cfg = configure(DEFAULTS, [str(f), "--batch_size=64", "--learning_rate=1", "--memory_layers=[1, 3]"])
    assert cfg["batch_size"] == 64 and cfg["device"] == "cuda"
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["memory_layers"] == [1, 3] and DEFAULTS["batch_size"] == 12


def test_bare_words_are_strings():
    assert configure(DEFAULTS, ["--device=mps"])["device"] == "mps"


def test_unknown_config_key_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        configure(DEFAULTS, ["--bach_size=3"])


def test_unknown_key_in_a_config_file_names_the_file(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("learnig_rate = 1e-3\n")
    with pytest.raises(ConfigError, match=r"c\.py.*learning_rate"):
        configure(DEFAULTS, [str(f)])


@pytest.mark.parametrize("arg, expected", [("--batch_size=2.5", "int"), ("--compile=1", "bool"),
                                           ("--device=3", "str"), ("--memory_layers=4", "list")])
def test_wrong_type_names_key_expected_and_given(arg, expected):
    key = arg[2:].split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}' expects {expected}"):
        configure(DEFAULTS, [arg])


def test_broken_config_file_names_file_and_line(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("batch_size = 8\nlearning_rate = 1 / 0\n")
    with pytest.raises(ConfigError, match=r"broken\.py:2: .*ZeroDivisionError"):
        configure(DEFAULTS, [str(f)])
    f.write_text("batch_size = 8\n\nlearning_rate = (\n")
    with pytest.raises(ConfigError, match=r"broken\.py:\d+: syntax error"):
        configure(DEFAULTS, [str(f)])


def test_missing_config_file_and_malformed_argument_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        configure(DEFAULTS, [str(tmp_path / "nope.py")])
    with pytest.raises(ConfigError, match="--batch_size=value"):
        configure(DEFAULTS, ["--batch_size"])


def test_shipped_config_files_load_into_train_defaults():
    import glob
    import os
    import train
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in glob.glob(os.path.join(root, "config", "*.py")):
        if any(name in path for name in ("world", "swarm", "serve", "loops_chains", "thinking", "distill_memory",
                                         "residual_widths", "turing", "rl_reward_model",
                                         "th1nker")):  # other scripts'
            continue
        configure(train.DEFAULTS, [path])


def test_the_thinking_configs_load_into_thinking_defaults():
    import glob
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import thinking
    for path in glob.glob(os.path.join(root, "config", "thinking_*.py")):
        configure(thinking.DEFAULTS, [path])


def test_the_experiment_configs_load_into_their_scripts_defaults():
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import glob
    import distill_memory
    import residual_widths
    import rl_reward_model
    import turing
    for script, pattern in ((distill_memory, "distill_memory.py"), (residual_widths, "residual_widths.py"),
                            (turing, "turing_*.py"), (rl_reward_model, "rl_reward_model_*.py")):
        paths = glob.glob(os.path.join(root, "config", pattern))
        assert paths, pattern
        for path in paths:
            configure(script.DEFAULTS, [path])


def scripts_with_a_config():
    """Every script a user runs: the root's and experiments/ .py files that call configure()."""
    import glob
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "experiments", "*.py")))
    return [os.path.relpath(p, root) for p in paths
            if not p.endswith("configurator.py") and "configure(" in open(p, encoding="utf-8").read()]


@pytest.mark.parametrize("script", scripts_with_a_config())
def test_every_script_answers_help_with_its_keys_defaults_and_comments(script, capsys, monkeypatch):
    import os
    import runpy
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, script)
    flag = "-h" if "plot" in script else "--help"
    monkeypatch.setattr("sys.argv", [path, flag])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert stop.value.code in (0, None), out
    from configurator import key_docs
    defaults = runpy.run_path(path)["DEFAULTS"]
    blocks = help_blocks(out)
    documented, _ = key_docs(path)
    assert any(key in documented for key in defaults)
    for key, value in defaults.items():
        assert f"--{key}={value!r}" in blocks[key]
        assert " ".join(documented.get(key, "").split()) in " ".join(blocks[key].split())


def help_blocks(out):
    """{key: the lines --help printed for it (its setting, then its comment, wrapped)}."""
    blocks, key = {}, None
    for line in out.splitlines():
        if line.startswith("  --"):
            key = line.split("=")[0].strip()[2:]
            blocks[key] = line
        elif key and line.startswith("    "):
            blocks[key] += "\n" + line
        else:
            key = None
    return blocks


def test_help_puts_section_headings_on_lines_of_their_own(capsys, monkeypatch):
    import os
    import runpy
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setattr("sys.argv", ["train.py", "--help"])
    monkeypatch.setenv("COLUMNS", "120")  # the help wraps to the terminal; a test worker (pytest -n) has none of its own
    with pytest.raises(SystemExit):
        runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
    out = capsys.readouterr().out
    blocks = help_blocks(out)
    assert "model: every option" not in blocks["eval_loops"]  # the heading below eval_loops is not its comment
    assert "\n  model: every option of architecture.py is a key" in out
    assert "\n  thinking by iterating" in out and "thinking" not in blocks["exit_tol"]
    assert "its weights, with a fresh optimizer" in " ".join(blocks["init_from"].split())  # carried on below its key
    assert max(len(line) for line in out.splitlines()) <= 200


def test_help_prefers_the_scripts_defaults_comment_over_a_class_field_of_the_same_name(tmp_path):
    from configurator import key_docs
    script = tmp_path / "script.py"
    script.write_text('class State:\n    seed: int = 0  # a field of the server\n\n\n'
                      'DEFAULTS = dict(\n    seed=1,  # the sampler\'s seed\n)\n')
    documented, _ = key_docs(str(script))
    assert documented["seed"] == "the sampler's seed"
