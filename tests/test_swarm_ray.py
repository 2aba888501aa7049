"""swarm.py --backend=ray: the same workers as Ray actors give the subprocess backend's numbers on the same
seeds (fake workers that crash, hang and overflow, restarted once then dropped; tiny real policies that
learn), and bad Ray settings (an unreachable address, no Ray, an agent that is not there) are clear errors
before anything starts. One local Ray for the whole module: it takes ~10 s to start."""
import importlib.util
import json
import os
import sys

import pytest

import swarm
import swarm_ray
from child_processes import wait_until_gone
from configurator import ConfigError, configure
from swarm_fakes import fake_checkpoint, fake_command

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (requirements-extras.txt)")
DETERMINED = ("goal", "proposals", "aggregate", "decision", "checkpoint")  # events whose content is the run's


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray, started as swarm.py starts one; every run of the module connects to it."""
    transport = swarm_ray.RayActors("", swarm.DEFAULTS["ray_agent"], "", count=8)
    transport.connect()
    yield transport.ray
    transport.ray.shutdown()


def fake_config(tmp_path, kind, modes, **overrides):
    """Fake workers of these modes (tests/swarm_fakes.py), as subprocesses or (kind="ray") as Ray actors."""
    cfg = configure(swarm.DEFAULTS, [])
    cfg.update(out_dir=str(tmp_path / kind), num_goals=3, workers=len(modes), reply_timeout=2.0, start_timeout=60.0,
               checkpoints=[fake_checkpoint(str(tmp_path / "fakes"), m) for m in modes])
    if kind == "ray":
        cfg.update(backend="ray", ray_agent="swarm_fakes:FakeAgent")
    else:
        cfg.update(worker_command=fake_command())
    return cfg | overrides


def events(cfg):
    with open(os.path.join(cfg["out_dir"], "swarm.jsonl")) as f:
        return [json.loads(line) for line in f]


def determined(cfg):
    """The events a run's seeds and workers decide, without their timestamps (replies arrive in any order)."""
    out = []
    for e in events(cfg):
        if e["event"] in DETERMINED:
            e.pop("time")
            out.append(e)
    return out


def without_timing(summary):
    return {k: v for k, v in summary.items() if "seconds" not in k and "per_minute" not in k}


@needs_ray
def test_ray_actors_give_the_subprocess_numbers_and_a_failing_actor_is_restarted_once_then_dropped(tmp_path,
                                                                                                     local_ray):
    modes = ["teacher", "echo", "crash", "hang", "flood"]
    runs = {}
    for backend in ("subprocess", "ray"):
        cfg = fake_config(tmp_path, backend, modes, debate_rounds=1, learning="each", save_every=2)
        runs[backend] = (without_timing(swarm.run(cfg)), determined(cfg), events(cfg))
    assert runs["ray"][0] == runs["subprocess"][0]
    assert runs["ray"][0]["worker_failures"] == 6 and runs["ray"][0]["decision_success"] == 1.0
    ray_events = runs["ray"][2]
    assert [e for e in runs["ray"][1] if e["event"] != "checkpoint"] == \
        [e for e in runs["subprocess"][1] if e["event"] != "checkpoint"]
    for kind in ("restart", "drop"):  # in the order the failures came
        assert sorted(e["worker"] for e in ray_events if e["event"] == kind) == [2, 3, 4]
    reasons = {e["worker"]: e["reason"] for e in ray_events if e["event"] == "drop"}
    assert "actor died" in reasons[2] and "no proposal within 2 s" in reasons[3]
    assert "over the cap" in reasons[4]
    assert all("actor" in e for e in ray_events if e["event"] == "start")
    pids = [e["message"]["pid"] for e in ray_events if e["event"] == "receive" and e["message"]["type"] == "ready"]
    assert len(pids) == 5 + 3 and wait_until_gone(pids) == []  # every actor, restarted or not, is gone
    saved = [c["paths"] for c in ray_events if c["event"] == "checkpoint"][-1]
    assert set(saved) == {"worker_0", "worker_1"}  # the dropped workers saved nothing
    with open(saved["worker_0"]) as f:
        assert json.load(f) == {"fake": "teacher", "learned": 3}  # it learnt from each goal's shared success


@needs_ray
def test_real_policies_as_ray_actors_propose_and_learn_exactly_as_subprocesses(tmp_path, tiny_policy, local_ray):
    runs = {}
    for backend in ("subprocess", "ray"):
        cfg = configure(swarm.DEFAULTS, [])
        cfg.update(out_dir=str(tmp_path / backend), checkpoints=[tiny_policy], workers=2, temperatures=[0.5, 1.0],
                   num_goals=2, seed=3, learning="each", teacher_help=True, learning_rate=1e-2, reply_timeout=60.0,
                   backend=backend)
        summary = without_timing(swarm.run(cfg))
        learned = [e["message"] for e in events(cfg) if e["event"] == "receive" and e["message"]["type"] == "learned"]
        runs[backend] = summary, determined(cfg), sorted(json.dumps(m, sort_keys=True) for m in learned)
    assert runs["ray"][0] == runs["subprocess"][0] and runs["ray"][0]["goals"] == 2
    assert [e for e in runs["ray"][1] if e["event"] != "checkpoint"] == \
        [e for e in runs["subprocess"][1] if e["event"] != "checkpoint"]
    assert runs["ray"][2] == runs["subprocess"][2] and len(runs["ray"][2]) == 2 * 2  # the same losses, bit for bit


# ----------------------------------------------------------------------------- bad settings

def test_an_unreachable_ray_address_is_a_clear_error_before_anything_starts(tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: the missing Ray is the error")
    cfg = fake_config(tmp_path, "ray", ["echo"], ray_address="127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"cannot reach a Ray cluster at ray_address='127.0.0.1:1'.*ray start --head"):
        swarm.run(cfg)
    assert not os.path.exists(cfg["out_dir"])


@pytest.mark.parametrize("overrides, message", [
    ({"backend": "dask"}, "backend must be one of subprocess, ray"),
    ({"ray_address": "10.0.0.1:6379"}, "ray_address needs backend=ray"),
    ({"backend": "ray", "worker_command": "ssh gpu1 {python} {worker}"}, "leave worker_command empty"),
    ({"backend": "ray", "device": "cuda:0,1"}, "device is cpu or cuda"),
    ({"backend": "ray", "ray_agent": "swarm_worker"}, "is not module:Class"),
    ({"backend": "ray", "ray_agent": "no_such_module:Agent"}, "no module 'no_such_module'"),
    ({"backend": "ray", "ray_address": "nowhere"}, "is not host:port"),
])
def test_bad_backend_settings_are_clear_errors(tmp_path, overrides, message):
    if overrides.get("backend") == "ray" and importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: the missing Ray is the error")
    cfg = fake_config(tmp_path, overrides.get("backend", "subprocess"), ["echo"], **overrides)
    with pytest.raises(ConfigError, match=message):
        swarm.run(cfg)
    assert not os.path.exists(cfg["out_dir"])


def test_without_ray_installed_backend_ray_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray finds
    cfg = fake_config(tmp_path, "ray", ["echo"])
    with pytest.raises(ConfigError, match="backend=ray needs Ray: pip install -r requirements-extras.txt"):
        swarm.run(cfg)


def test_each_actor_asks_for_a_share_of_the_clusters_gpus_that_lets_all_fit():
    assert swarm_ray.gpu_share(4, 8) == 0.5 and swarm_ray.gpu_share(2, 2) == 1.0 and swarm_ray.gpu_share(1, 3) == 1 / 3
    with pytest.raises(SystemExit, match="no GPU"):
        swarm_ray.gpu_share(0, 2)


def test_an_actors_output_is_cut_into_lines_each_bounded_as_a_pipes():
    out = swarm_ray.Output(limit=10)
    out.write('{"a": 1}\n{"b"')
    out.write(': 2}\nnext')
    assert out.take(0) == {"lines": ['{"a": 1}\n', '{"b": 2}\n'], "too_long": False, "ended": False, "reason": None}
    out.write("x" * 20)  # no newline, over the limit: read no further
    out.write("\n{}\n")
    assert out.take(0)["too_long"] and out.take(0)["lines"] == []
    done = swarm_ray.Output()
    done.write("last\n")
    done.end("its worker loop ended with code 0")
    assert done.take(0) == {"lines": ["last\n"], "too_long": False, "ended": True,
                            "reason": "its worker loop ended with code 0"}


def test_an_agent_a_node_cannot_load_answers_the_hello_with_why():
    refuse = swarm_ray.agent_class("swarm_fakes:NoSuchAgent")
    with pytest.raises(SystemExit, match="cannot be loaded on this node: AttributeError: .*NoSuchAgent"):
        refuse({"worker": 0}, None)
    assert swarm_ray.agent_class("swarm_fakes:FakeAgent").__name__ == "FakeAgent"
