"""
How long do the README's two set-up commands take on a fresh venv? Each part timed on its own: the venv, the
core install (requirements.txt), the quickstart (prepare, train cpu_quick, sample) run twice, the rest of the
install (requirements-dev.txt) and, with --tests=True, the test suite. Run from the repository root; the
quickstart writes data/ and out/cpu_quick as the README's line does.

    python experiments/install_time.py --venv=/tmp/v --out=experiments/results/install_cpu.json

pip reads whatever index and wheel folders its configuration names (pip config list): a machine with a local
wheel mirror installs faster than one that downloads, so the JSON records pip's configuration too. Each part
records the load average before it: on a shared machine, others' work is part of the time.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configurator import configure, print_config  # noqa: E402
from runtime import code_version  # noqa: E402

DEFAULTS = dict(
    venv="/tmp/ulm-fresh-venv",  # removed and made again
    python="python3",            # the interpreter that makes the venv
    tests=False,                 # also time the test suite (the second command's second half; ~10 min)
    nice=0,                      # run every part under nice -n this (a shared machine: 10)
    out="out/install_time.json",
)


def timed(parts, name, command, env=None):
    """Run a shell command from the repository root, record its seconds, exit code and output's last lines."""
    print(f"== {name}: {command}", flush=True)
    before = os.getloadavg()
    t0 = time.perf_counter()
    done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, env=env)
    parts.append({"part": name, "command": command, "seconds": round(time.perf_counter() - t0, 1),
                  "returncode": done.returncode, "loadavg_before": [round(x, 2) for x in before],
                  "tail": (done.stdout + done.stderr)[-1500:]})
    print(json.dumps({k: v for k, v in parts[-1].items() if k != "tail"}), flush=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{parts[-1]['tail']}")
    return done.stdout + done.stderr


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    venv = cfg["venv"]
    shutil.rmtree(venv, ignore_errors=True)
    nice = f"nice -n {cfg['nice']} " if cfg["nice"] else ""
    activate = f". {shlex.quote(venv)}/bin/activate && {nice}"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "VIRTUAL_ENV")}  # as a user's shell
    parts = []
    timed(parts, "venv", f"{cfg['python']} -m venv {shlex.quote(venv)}", env)
    timed(parts, "core install", f"{activate}pip install -q -r requirements.txt", env)
    packages = timed(parts, "core packages", f"{activate}pip list --format=freeze", env)
    quickstart = ("python prepare.py && python train.py config/cpu_quick.py --overwrite=True && "
                  "python sample.py --out_dir=out/cpu_quick --start='ROMEO:'")
    runs = []
    for i in (1, 2):  # the second proves it runs again as it is
        text = timed(parts, f"quickstart {i}", f"{activate}sh -c {shlex.quote(quickstart)}", env)
        runs.append({"train_line": next((l for l in text.splitlines() if l.startswith("done at step")), None),
                     "threads": next((l for l in text.splitlines() if l.startswith("device ")), None),
                     "sample_tokens_per_s": [float(x) for x in re.findall(r"([\d.]+) tokens/s", text)]})
    timed(parts, "the rest of the install", f"{activate}pip install -q -r requirements-dev.txt", env)
    if cfg["tests"]:  # the README's test command as it stands (two test processes)
        timed(parts, "tests", f"{activate}python -m pytest -q -n 2 --dist loadfile tests", env)
    pip_config = subprocess.run([f"{venv}/bin/pip", "config", "list"], capture_output=True, text=True).stdout
    result = {"config": cfg, "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(),
              "code": code_version(__file__), "pip_config": pip_config.splitlines(), "parts": parts,
              "core_packages": [l for l in packages.splitlines() if "==" in l], "quickstart": runs}
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
    with open(cfg["out"], "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
