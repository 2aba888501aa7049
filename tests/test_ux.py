"""What a user meets first: the two set-up commands, a lean core install, the quickstart that runs twice, CPU
threads that stay fast on a busy machine, progress that suits a terminal and a log alike, run summaries, and
plot.py's options."""
import ast
import glob
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import plot
import runtime
import sample
import train
from conftest import ROOT, tiny_train_config

CORE = {"torch", "numpy", "tiktoken", "matplotlib", "tqdm"}
OPTIONAL = ("fastapi", "uvicorn", "pydantic", "starlette", "httpx", "openai", "datasets", "textworld", "gymnasium",
            "transformers", "safetensors", "selenium", "pytest")


# ----------------------------------------------------------------------------- the first two commands

def readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_opens_with_two_set_up_commands_and_ci_runs_the_second():
    first, second = readme_commands()  # exactly two
    assert first.startswith("pip install -r requirements.txt && python prepare.py && python train.py "
                            "config/cpu_quick.py --overwrite=True && python sample.py")
    assert second == "pip install -r requirements-dev.txt && python -m pytest -q -n 2 --dist loadfile tests"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert second in f.read().splitlines()


def requirement_names(name):
    with open(os.path.join(ROOT, name)) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return [line for line in lines if line]


def test_the_core_install_is_what_the_main_job_needs_and_dev_installs_every_extra():
    core = requirement_names("requirements.txt")
    assert {line.split("==")[0] for line in core} == CORE and "torch==2.13.0" in core
    dev = requirement_names("requirements-dev.txt")
    extras = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "requirements-*.txt"))
                    if not p.endswith(("-dev.txt", "-gpu.txt")))
    assert set(dev) >= {"-r requirements.txt", *(f"-r {name}" for name in extras)}
    assert {"requirements-serve.txt", "requirements-world.txt", "requirements-data.txt",
            "requirements-extras.txt"} <= set(extras)
    every = {line.split("==")[0] for name in extras for line in requirement_names(name)}
    assert {"fastapi", "uvicorn", "httpx", "openai", "textworld", "datasets", "gymnasium", "transformers",
            "lm-eval[api]", "ray"} <= every


def test_the_quickstart_imports_nothing_beyond_the_core():
    """The scripts on the quickstart's path (and the other core ones) import no optional package at import
    time: a core install runs them."""
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               f"        if name.split('.')[0] in {OPTIONAL!r}:\n"
               "            raise ImportError(f'{name} is not part of the core install')\n"
               "sys.meta_path.insert(0, Block())\n"
               "import prepare, train, sample, plot, compress, world, swarm, swarm_worker, analyze, metrics\n")
    done = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_script_imports_another_script():
    """A script's globals and command line are its own: what two scripts share lives in a module."""
    scripts = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))
               if '__name__ == "__main__"' in open(p, encoding="utf-8").read()}
    found = []
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "experiments", "*.py")):
        names = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found += [(os.path.relpath(path, ROOT), name) for name in names & scripts
                  if name != os.path.basename(path)[:-3]]
    assert "plot" in scripts and not [f for f in found if f[1] == "plot"]
    assert found == []


def test_the_quickstart_runs_twice_into_the_same_out_dir(tiny_data, capsys):
    cfg = tiny_train_config(tiny_data, max_iters=4, eval_interval=2)
    argv = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in cfg.items()]
    for _ in range(2):
        train.main(argv + ["--overwrite=True"])
        sample.main([f"--out_dir={cfg['out_dir']}", "--device=cpu", "--max_new_tokens=5", "--start=line"])
    out = capsys.readouterr().out
    assert out.count("done at step 4 of 4: best val") == 2 and "next: python sample.py" in out
    assert len(glob.glob(os.path.join(cfg["out_dir"], "replaced-*"))) == 1  # the first run, moved aside


# ----------------------------------------------------------------------------- CPU threads

@pytest.mark.parametrize("omp, cores, load, processes, expected", [
    ("3", 8, 0.0, 1, 3),      # the user's OMP_NUM_THREADS wins
    ("4", 8, 0.0, 2, 2),      # ... shared among the processes
    (None, 2, 0.1, 1, 2),     # an idle 2-core machine: both cores
    (None, 2, 1.6, 1, 1),     # another busy process: one thread, never two that wait on each other
    (None, 2, 6.0, 1, 1),     # very busy: still one
    (None, 16, 3.2, 1, 13),
    (None, 2, 0.1, 8, 1),     # eight workers on two cores: one thread each
])
@pytest.mark.parametrize("measured", ["now", "load_average"])
def test_automatic_threads_take_the_cores_the_load_leaves_idle(monkeypatch, omp, cores, load, processes, expected,
                                                               measured):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    if measured == "now":  # the busy cores of the last instant; the load average (a minute behind) is not read
        monkeypatch.setattr(runtime, "busy_cores", lambda cpus=None: load)
        monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    else:  # no /proc/stat (macOS): the load average
        monkeypatch.setattr(runtime, "busy_cores", lambda cpus=None: None)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert runtime.auto_threads(processes) == expected


def test_busy_cores_reads_only_the_cpus_this_process_may_use():
    busy = runtime.busy_cores(0.05)
    assert busy is None or 0 <= busy <= len(os.sched_getaffinity(0))
    one = runtime.busy_cores(0.05, cpus=[0])  # one CPU: at most one busy, however many the machine has
    assert one is None or 0 <= one <= 1


def test_set_threads_sets_torch_and_takes_no_more_than_its_default(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "64")
        assert runtime.set_threads(0) <= runtime._torch_default_threads()
        assert runtime.set_threads(1) == 1 == torch.get_num_threads()
        with pytest.raises(SystemExit, match="threads must be 0"):
            runtime.set_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_every_script_that_runs_torch_takes_threads():
    import analyze
    import bench
    import compress
    import serve
    import swarm
    import world
    for script in (train, sample, world, swarm, serve, compress, bench, analyze):
        assert script.DEFAULTS["threads"] == 0, script.__name__


def test_a_run_says_how_many_threads_it_used(tiny_data, capsys):
    train.train(tiny_train_config(tiny_data, max_iters=2, eval_interval=2, threads=1))
    assert "1 CPU thread)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- progress and summaries

def test_a_progress_bar_off_a_terminal_writes_whole_lines_and_one_at_the_end():
    out = io.StringIO()
    bar = runtime.progress(10, "steps", "step", interval=0, file=out)
    for _ in range(10):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0].startswith("steps:   0%") and lines[-1].startswith("steps: 100%")
    assert sum(line.startswith("steps: 100%") for line in lines) == 1  # the closing redraw adds no copy
    quiet = io.StringIO()
    bar = runtime.progress(10, "steps", interval=3600, file=quiet)
    for _ in range(10):
        bar.update()
    bar.close()
    assert len(quiet.getvalue().splitlines()) == 2  # the start and the end: nothing in between within an hour


def test_train_ends_with_its_best_val_time_files_and_next_command(tiny_cfg, capsys):
    train.train(tiny_cfg)
    out = capsys.readouterr().out.splitlines()
    best = min(r["val_loss"] for r in map(json.loads, open(os.path.join(tiny_cfg["out_dir"], "metrics.jsonl")))
               if "val_loss" in r)
    assert out[-3].startswith(f"done at step 20 of 20: best val {best:.4f} at step") and "s of training" in out[-3]
    assert out[-2].startswith(f"{tiny_cfg['out_dir']}: ckpt.pt")
    assert out[-1] == f"next: python sample.py --out_dir={tiny_cfg['out_dir']}   or   python plot.py {tiny_cfg['out_dir']}"


def test_an_evaluate_only_world_run_ends_with_its_success_and_plots_bars(tmp_path, capsys, monkeypatch):
    import world
    from test_world import save_tiny_policy, tiny_run_config
    drawn = []
    monkeypatch.setattr(world, "plot_evaluation", lambda out_dir, evals: drawn.append(evals))
    cfg = tiny_run_config(tmp_path, mode="evaluate", init_from=save_tiny_policy(tmp_path / "start.pt"))
    world.run(cfg)
    out = capsys.readouterr().out.splitlines()
    assert out[-3].startswith("evaluated in ") and "held-out success arith " in out[-3]
    assert out[-2].startswith(f"{cfg['out_dir']}: policy.pt, world.png") and out[-1].startswith("next: python swarm.py")
    assert drawn and drawn[-1][-1]["episode"] == 0 and "arith" in drawn[-1][-1]["eval"]  # bars, not a dot at (0, 0)


# ----------------------------------------------------------------------------- plot.py

def test_plot_leaves_out_step_0_and_takes_log_y_and_limits(tiny_cfg, capsys):
    from metrics import curve_rows, read_metrics
    train.train(tiny_cfg)
    rows = read_metrics(tiny_cfg["out_dir"])
    assert min(r["step"] for r in curve_rows(rows)) > 0 and min(r["step"] for r in curve_rows(rows, 0)) == 0
    png = os.path.join(tiny_cfg["out_dir"], "log.png")
    plot.main([tiny_cfg["out_dir"], f"--out={png}", "--logy=True", "--ymin=1.0", "--ymax=5", "--x=train_time"])
    assert os.path.getsize(png) > 0
    with pytest.raises(SystemExit, match="with logy=True, ymin and ymax must be positive"):
        plot.main([tiny_cfg["out_dir"], f"--out={png}", "--logy=True", "--ymin=0"])
    with pytest.raises(SystemExit, match="ymax must be a number"):
        plot.main([tiny_cfg["out_dir"], f"--out={png}", "--ymax=high"])


def test_plot_help_names_the_run_folders(capsys):
    with pytest.raises(SystemExit):
        plot.main(["--help"])
    assert "usage: python plot.py RUN_DIR [RUN_DIR ...] [--key=value ...]" in capsys.readouterr().out
