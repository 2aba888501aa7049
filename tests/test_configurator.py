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
        if any(name in path for name in ("world", "swarm", "serve", "loops_chains", "thinking", "th1nker")):  # other scripts'
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
    from configurator import key_comments
    defaults = runpy.run_path(path)["DEFAULTS"]
    lines = {line.split("=")[0].strip(): line for line in out.splitlines() if line.startswith("  --")}
    documented = key_comments(path)
    assert any(key in documented for key in defaults)
    for key, value in defaults.items():
        assert f"--{key}={value!r}" in lines[f"--{key}"]
        assert documented.get(key, "") in lines[f"--{key}"]
