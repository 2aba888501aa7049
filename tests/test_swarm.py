import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import swarm
import swarm_protocol
import tasks
from configurator import ConfigError, configure
from child_processes import clean_up, gone, wait_until_gone
from conftest import ROOT
from swarm_fakes import fake_checkpoint, fake_command

SWARM = os.path.join(ROOT, "swarm.py")
WORKER = os.path.join(ROOT, "swarm_worker.py")
FAKES = os.path.join(ROOT, "tests", "swarm_fakes.py")


def fake(tmp_path, path):
    """A checkpoint written "fake:MODE" in these tests: the file of a fake worker of that mode (tests/swarm_fakes.py)."""
    return fake_checkpoint(str(tmp_path / "fakes"), path.removeprefix("fake:")) if path.startswith("fake:") else path


def swarm_config(tmp_path, **overrides):
    """Fake workers, three goals, timeouts short enough that a hung worker costs a second. A run of real
    policies passes worker_command=""."""
    cfg = configure(swarm.DEFAULTS, [])
    cfg.update(out_dir=str(tmp_path / "swarm"), num_goals=3, workers=3, reply_timeout=1.0, start_timeout=20.0,
               checkpoints=["fake:teacher", "fake:echo", "fake:teacher"], worker_command=fake_command())
    cfg.update(overrides)
    cfg.update(checkpoints=[fake(tmp_path, p) for p in cfg["checkpoints"]], guide=fake(tmp_path, cfg["guide"]),
               learner=fake(tmp_path, cfg["learner"]))
    return cfg


def fake_args(tmp_path, *modes, command="{python} {fakes}"):
    """swarm.py's command-line arguments for fake workers of these modes, started by `command`."""
    return [f"--checkpoints={[fake(tmp_path, f'fake:{mode}') for mode in modes]!r}",
            f"--worker_command={fake_command(command)}"]


def events(cfg):
    with open(os.path.join(cfg["out_dir"], "swarm.jsonl")) as f:
        return [json.loads(line) for line in f]  # every line is whole JSON, even after failures


def wait_for_events(path, event, count, timeout=60):
    """The lines of swarm.jsonl once it holds `count` events of a kind (a coordinator run as a subprocess)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if sum(f'"event": "{event}"' in line for line in lines) >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"no {count} {event} events in {path} within {timeout} s")


# ----------------------------------------------------------------------------- protocol

def talk(proc, message):
    proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def test_protocol_round_trip_with_a_worker_process(tmp_path):
    proc = subprocess.Popen([sys.executable, FAKES], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        hello = {"type": "hello", "protocol": swarm_protocol.PROTOCOL, "worker": 5,
                 "checkpoint": fake(tmp_path, "fake:teacher"), "seed": 0, "temperature": 1.0, "device": "cpu", "threads": 1}
        ready = talk(proc, hello)
        assert ready == {"type": "ready", "protocol": swarm_protocol.PROTOCOL, "worker": 5, "pid": proc.pid}
        goal = {"task": "arith", "seed": 3}
        proposal = talk(proc, {"type": "goal", "round": 1, "goal": goal})
        assert proposal["type"] == "proposal" and proposal["round"] == 1
        assert swarm_protocol.play_proposal(goal, proposal["actions"])["success"]
        scores = talk(proc, {"type": "score", "round": 2, "goal": goal, "proposals": [proposal]})
        assert scores["type"] == "scores" and scores["round"] == 2 and len(scores["scores"]) == 1
        proc.stdin.write(json.dumps({"type": "stop"}) + "\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("argv", [[WORKER], [SWARM, "--worker"]])  # the worker program, and the older command form
def test_worker_refuses_a_hello_of_another_protocol_version(argv):
    out = subprocess.run([sys.executable, *argv], input=json.dumps({"type": "hello", "protocol": 99}) + "\n",
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    reply = json.loads(out.stdout)
    assert out.returncode == 2 and reply["type"] == "error" and f"protocol {swarm_protocol.PROTOCOL}" in reply["message"]


@pytest.mark.parametrize("line, problem", [("not json\n", "garbage"), ('{"type": "scores", "round": 1}\n', "expected"),
                                           ('{"type": "proposal", "round": 0}\n', "round"),
                                           ('{"type": "error", "message": "no such file"}\n', "error: no such file")])
def test_replies_that_are_not_protocol_are_named_as_such(line, problem):
    assert problem in swarm_protocol.parse_reply(line, "proposal", 1)


# ----------------------------------------------------------------------------- aggregators

def canned(*answers, rewards=None, scores=None):
    proposals = [{"worker": i, "answer": a, "actions": [a]} for i, a in enumerate(answers)]
    for key, values in (("reward", rewards), ("guide_score", scores)):
        for p, v in zip(proposals, values or []):
            p[key] = v
    return proposals


def test_majority_vote_picks_the_most_common_answer_and_breaks_ties_by_order():
    assert swarm.majority_vote(canned("ANSWER 3", "ANSWER 5", " ANSWER 5", "ANSWER 3", "ANSWER 5")) == 1
    assert swarm.majority_vote(canned("ANSWER 7", "ANSWER 8")) == 0
    assert swarm.majority_vote([]) is None


def test_verifier_picks_the_highest_world_reward():
    assert swarm.best_of_n_verifier(canned("a", "b", "c", rewards=[0.0, 1.0, -0.1])) == 1
    assert swarm.best_of_n_verifier(canned("a", "b")) is None  # nothing verified: no choice


def test_guide_picks_the_proposal_it_finds_most_likely():
    assert swarm.guide_choice(canned("a", "b", "c", scores=[-2.0, -0.5, -1.0])) == 1
    assert swarm.guide_choice(canned("a")) is None


def test_aggregators_are_a_plain_dict_of_the_three():
    assert set(swarm.AGGREGATORS) == {"majority", "verifier", "guide"}


# ----------------------------------------------------------------------------- runs with fake workers

def test_a_swarm_of_fake_workers_solves_every_goal_and_logs_everything(tmp_path):
    cfg = swarm_config(tmp_path, debate_rounds=1)
    summary = swarm.run(cfg)
    assert summary["goals"] == 3 and summary["decision_success"] == 1.0
    assert summary["single_worker_success"] == pytest.approx(2 / 3, abs=1e-3)
    assert summary["majority_success"] == summary["verifier_success"] == 1.0
    kinds = [e["event"] for e in events(cfg)]
    assert kinds[0] == "config" and kinds[-1] == "summary"
    assert kinds.count("goal") == kinds.count("decision") == 3
    assert kinds.count("receive") == 3 * 3 + 3 * 3 + 3  # ready, proposals, revised proposals
    assert all("time" in e for e in events(cfg))
    assert os.path.exists(os.path.join(cfg["out_dir"], "summary.json"))


def test_a_guide_worker_scores_proposals_and_the_guide_aggregator_follows_it(tmp_path):
    # the fake guide prefers ECHO, so guide aggregation picks the echo worker's (wrong) answer
    cfg = swarm_config(tmp_path, guide="fake:echo", aggregators=["guide", "majority"])
    summary = swarm.run(cfg)
    assert summary["guide_success"] == 0.0 and summary["majority_success"] == 1.0
    decisions = [e for e in events(cfg) if e["event"] == "decision"]
    assert {d["chosen_worker"] for d in decisions} == {1}


@pytest.mark.parametrize("mode", ["crash", "hang", "garbage"])
def test_a_failing_worker_is_restarted_once_then_dropped_and_the_rounds_complete(tmp_path, mode):
    cfg = swarm_config(tmp_path, checkpoints=["fake:teacher", f"fake:{mode}", "fake:teacher"])
    summary = swarm.run(cfg)
    assert summary["goals"] == 3 and summary["decision_success"] == 1.0
    log = events(cfg)
    assert [e["worker"] for e in log if e["event"] == "restart"] == [1]
    assert [e["worker"] for e in log if e["event"] == "drop"] == [1]
    starts = [e for e in log if e["event"] == "start" and e["worker"] == 1]
    assert len(starts) == 2 and all(gone(e["pid"]) for e in starts)
    last_goal_proposals = [e for e in log if e["event"] == "proposals"][-1]["proposals"]
    assert [p["worker"] for p in last_goal_proposals] == [0, 2]


def test_when_every_worker_is_dropped_the_run_stops_with_a_message(tmp_path):
    cfg = swarm_config(tmp_path, workers=1, checkpoints=["fake:crash"])
    with pytest.raises(SystemExit, match="every worker was dropped"):
        swarm.run(cfg)
    assert all(gone(e["pid"]) for e in events(cfg) if e["event"] == "start")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_leaves_no_orphan_workers(tmp_path, sig):
    out_dir = tmp_path / "swarm"
    # SIGINT as a terminal delivers it: a test run started in the background (`pytest &`) ignores SIGINT, and
    # its children would inherit that (measured: the coordinator then never saw the signal)
    coordinator = subprocess.Popen([sys.executable, SWARM, "--workers=3", *fake_args(tmp_path, "hang"),
                                    f"--out_dir={out_dir}", "--reply_timeout=60.0"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        transcript = out_dir / "swarm.jsonl"
        lines = wait_for_events(transcript, "send", 3)  # all three are working on the first goal
        pids = [json.loads(line)["pid"] for line in lines if '"event": "start"' in line]
        assert len(pids) == 3 and not any(gone(p) for p in pids)
        coordinator.send_signal(sig)
        assert coordinator.wait(timeout=20) != 0
    finally:
        coordinator.kill()
        coordinator.wait()
    assert all(gone(p) for p in pids)
    assert '"event": "interrupted"' in transcript.read_text() or sig == signal.SIGTERM


def test_workers_of_a_coordinator_killed_with_sigkill_exit_by_themselves(tmp_path):
    out_dir = tmp_path / "swarm"
    coordinator = subprocess.Popen([sys.executable, SWARM, "--workers=2", *fake_args(tmp_path, "hang"),
                                    f"--out_dir={out_dir}", "--reply_timeout=60.0"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        lines = wait_for_events(out_dir / "swarm.jsonl", "send", 2)  # both are stuck in a "model call"
        pids = [json.loads(line)["pid"] for line in lines if '"event": "start"' in line]
        assert len(pids) == 2 and not any(gone(p) for p in pids)
        coordinator.send_signal(signal.SIGKILL)  # no cleanup code runs in the coordinator
        coordinator.wait(timeout=20)
        deadline = time.monotonic() + 20
        while not all(gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(p) for p in pids)
    finally:
        coordinator.kill()
        coordinator.wait()
        for p in pids if "pids" in locals() else []:
            if not gone(p):
                os.killpg(p, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_shell_wrapped_workers_do_not_outlive_a_killed_coordinator(tmp_path, sig):
    # the worker's parent is the shell, which waits for it: only the group kill (SIGTERM) or the kernel's
    # parent-death signal down the chain coordinator -> shell -> worker (SIGKILL) ends them
    out_dir = tmp_path / "swarm"
    coordinator = subprocess.Popen([sys.executable, SWARM, "--workers=2", f"--out_dir={out_dir}", "--reply_timeout=60.0",
                                    *fake_args(tmp_path, "hang", command="sh -c '{python} {fakes}; echo done'")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    pids = []
    try:
        rows = [json.loads(line) for line in wait_for_events(out_dir / "swarm.jsonl", "send", 2)]
        shells = [e["pid"] for e in rows if e["event"] == "start"]
        workers = [e["message"]["pid"] for e in rows if e["event"] == "receive"]
        pids = shells + workers
        assert len(shells) == len(workers) == 2 and not set(shells) & set(workers) and not any(gone(p) for p in pids)
        coordinator.send_signal(sig)
        coordinator.wait(timeout=20)
        assert wait_until_gone(pids) == []
    finally:
        clean_up(coordinator, pids)


def test_a_worker_stuck_in_a_call_exits_when_its_input_ends_and_nobody_reads_it(tmp_path):
    # what a worker behind ssh sees of a dead coordinator: its parent lives on, its pipes are closed
    proc = subprocess.Popen([sys.executable, FAKES], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        hello = {"type": "hello", "protocol": swarm_protocol.PROTOCOL, "worker": 0, "checkpoint": fake(tmp_path, "fake:hang"),
                 "seed": 0, "temperature": 1.0, "device": "cpu", "threads": 1}
        assert talk(proc, hello)["type"] == "ready"
        proc.stdin.write(json.dumps({"type": "goal", "round": 1, "goal": {"task": "arith", "seed": 1}}) + "\n")
        proc.stdin.flush()
        time.sleep(0.5)
        assert proc.poll() is None  # hung in its "model call"
        proc.stdin.close()
        proc.stdout.close()
        assert proc.wait(timeout=10) != 0
    finally:
        proc.kill()
        proc.wait()

def test_garbage_on_a_worker_stdin_gets_an_error_reply_and_the_worker_keeps_serving(tmp_path):
    hello = {"type": "hello", "protocol": swarm_protocol.PROTOCOL, "worker": 0, "checkpoint": fake(tmp_path, "fake:echo"),
             "seed": 0, "temperature": 1.0, "device": "cpu", "threads": 1}
    lines = [json.dumps(hello), "hello there", "[1, 2]", '{"type": "goal", "round": 1}',
             '{"type": "goal", "round": 2, "goal": {"task": "chess", "seed": 1}}',
             '{"type": "goal", "round": 3, "goal": {"task": "arith", "seed": 1}}', '{"type": "stop"}']
    out = subprocess.run([sys.executable, FAKES], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert [r["type"] for r in replies] == ["ready", "error", "error", "error", "error", "proposal"]
    assert "not a JSON line" in replies[1]["message"] and "needs goal" in replies[3]["message"]
    assert "unknown task 'chess'" in replies[4]["message"] and replies[5]["round"] == 3
    assert "not a JSON line" in out.stderr


def test_learning_settings_a_worker_does_not_know_are_named_at_the_hello():
    hello = {"type": "hello", "protocol": swarm_protocol.PROTOCOL, "worker": 0, "checkpoint": "nowhere.pt", "seed": 0,
             "temperature": 1.0, "device": "cpu", "threads": 1, "learning": {"learning_rate": 0.1, "mode": "x"}}
    out = subprocess.run([sys.executable, WORKER], input=json.dumps(hello) + "\n", capture_output=True, text=True,
                         cwd=ROOT, timeout=30)
    message = json.loads(out.stdout)["message"]
    assert out.returncode == 2 and "do not fit this worker" in message and "updates_per_batch" in message


def test_a_garbage_hello_is_refused_without_a_traceback():
    out = subprocess.run([sys.executable, WORKER], input="{oops\n", capture_output=True, text=True,
                         cwd=ROOT, timeout=30)
    assert out.returncode == 2 and json.loads(out.stdout)["type"] == "error" and "Traceback" not in out.stderr


def test_a_swarm_whose_workers_all_crash_does_not_exit_0_and_its_summary_counts_them(tmp_path):
    cfg = swarm_config(tmp_path, workers=2, checkpoints=["fake:crash"], num_goals=2)
    with pytest.raises(SystemExit, match="every worker was dropped after 2 goals"):
        swarm.run(cfg)
    summary = json.loads((tmp_path / "swarm" / "summary.json").read_text())
    assert summary["worker_failures"] == 4 and summary["single_worker_success"] == 0.0


@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_an_out_dir_that_cannot_be_written_is_a_clear_error(tmp_path, where):
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "file").write_text("")
    (tmp_path / "ro").mkdir(mode=0o555)
    out_dir = tmp_path / ("file" if where == "under a file" else "ro") / "swarm"
    with pytest.raises(SystemExit, match=f"cannot write (to )?{out_dir}.*(writable folder|a folder you can write to)"):
        swarm.run(swarm_config(tmp_path, out_dir=str(out_dir)))


def test_a_disk_that_fills_mid_run_stops_it_with_a_message_and_no_worker_left(tmp_path, monkeypatch):
    import errno

    def append(path, row):
        if row["event"] == "proposals":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        runtime_append(path, row)
    runtime_append = swarm.append_jsonl
    monkeypatch.setattr(swarm, "append_jsonl", append)
    cfg = swarm_config(tmp_path)
    with pytest.raises(SystemExit, match="cannot write .*swarm.jsonl: No space left on device"):
        swarm.run(cfg)
    starts = [e for e in events(cfg) if e["event"] == "start"]
    assert len(starts) == 3 and all(gone(e["pid"]) for e in starts)


def test_single_worker_success_counts_a_crashed_worker_as_a_failure():
    first = [{"success": True}, {"success": True}]  # two of three workers answered, both right
    records = [{"asked": 3, "first": first, "proposals": first, "choices": {"majority": 0},
                "decision": {"success": True, "verdict": "accept"}}]
    summary = swarm.summarize(records, {"workers": 3, "aggregators": ["majority"]}, 1.0, 1)
    assert summary["single_worker_success"] == pytest.approx(2 / 3, abs=1e-3) and summary["worker_failures"] == 1


def test_verified_returns_copies_and_leaves_its_input_alone():
    proposals = [{"worker": 0, "answer": "ANSWER 1", "actions": ["ANSWER 1"]}]
    checked = swarm.verified({"task": "arith", "seed": 1}, proposals)
    assert proposals == [{"worker": 0, "answer": "ANSWER 1", "actions": ["ANSWER 1"]}]
    assert checked[0]["success"] is False and "reward" in checked[0]


def test_a_second_run_into_the_same_out_dir_refuses_unless_told_to_overwrite(tmp_path):
    cfg = swarm_config(tmp_path, num_goals=1, workers=1, checkpoints=["fake:echo"])
    swarm.run(cfg)
    with pytest.raises(ConfigError, match="already holds a swarm run"):
        swarm.run(cfg)
    swarm.run(cfg | {"overwrite": True})
    assert any(name.startswith("replaced-") for name in os.listdir(cfg["out_dir"]))
    assert [e["event"] for e in events(cfg)].count("config") == 1


# ----------------------------------------------------------------------------- human in the loop

def test_human_accepts_edits_rejects_and_stops_from_stdin(tmp_path):
    cfg = swarm_config(tmp_path, num_goals=5, human=True, checkpoints=["fake:echo"], workers=2)
    # goal 1 accepted (echo is wrong), goal 2 edited to the right answer, goal 3 rejected, then stop
    env = tasks.make_env("arith")
    env.reset(tasks.EVAL_SEED_BASE + 1)
    right = f"ANSWER {env.answer}"
    shown = io.StringIO()
    summary = swarm.run(cfg, inp=io.StringIO(f"a\nmaybe\ne\n{right}\nr\ns\n"), out=shown)
    verdicts = [e["verdict"] for e in events(cfg) if e["event"] == "decision"]
    assert verdicts == ["accept", "edit", "reject", "stop"]
    assert summary["goals"] == 4 and summary["edited"] == 1 and summary["rejected"] == 1
    assert summary["decision_success"] == 0.25  # only the edited goal
    assert "aggregate: 'ECHO'" in shown.getvalue() and "please answer one of" in shown.getvalue()


def test_human_flag_reads_decisions_from_the_terminal_of_the_command(tmp_path):
    out = subprocess.run([sys.executable, SWARM, "--human", "--workers=2", *fake_args(tmp_path, "teacher"),
                          f"--out_dir={tmp_path}", "--num_goals=3"], input="a\nr\n", capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "the decision (a person) solved 33% of the goals" in out.stdout  # the readable summary
    # two answers, then end of input: nobody is left to decide, so the run stops at the third goal
    assert out.returncode == 0 and summary["goals"] == 3 and summary["rejected"] == 1
    assert summary["decision_success"] == pytest.approx(1 / 3, abs=1e-3)
    assert out.stderr.count("aggregate: 'ANSWER") == 3


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("overrides, message", [
    ({"workers": 0}, "workers must be at least 1"),
    ({"checkpoints": ["no/such/ckpt.pt"]}, "no checkpoint at no/such/ckpt.pt"),
    ({"aggregators": ["majority", "vote"]}, "unknown aggregator 'vote'"),
    ({"aggregators": ["guide"]}, "needs --guide"),
    ({"task": "chess"}, "unknown task 'chess'"),
    ({"task_options": {"colour": "red"}}, "bad options"),
    ({"temperatures": [1.0, -1]}, "temperatures must be numbers >= 0"),
    ({"temperatures": ["hot"]}, "temperatures must be numbers >= 0"),
    ({"device": "tpu"}, "device must be"),
    ({"threads": -1}, "threads must not be negative"),
    ({"workers": 3000}, "workers=3000 is more than 256"),
    ({"reply_timeout": 1e400}, "reply_timeout and start_timeout must be positive, at most"),
    ({"start_timeout": float("nan")}, "reply_timeout and start_timeout must be positive, at most"),
])
def test_bad_config_is_a_clear_error_before_any_worker_starts(tmp_path, overrides, message):
    cfg = swarm_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message):
        swarm.run(cfg)
    assert not os.path.exists(cfg["out_dir"])


@pytest.mark.parametrize("arg, key", [("--temperatures=[-1]", "temperatures"), ("--task_options={'tool': 3, 'x': 1}", "task_options"),
                                      ("--workers=0", "workers")])
def test_bad_values_on_the_command_line_exit_nonzero_without_a_traceback(tmp_path, arg, key):
    out = subprocess.run([sys.executable, SWARM, arg, *fake_args(tmp_path, "echo"), f"--out_dir={tmp_path / 'swarm'}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode != 0 and key in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "swarm").exists()


def test_workers_spread_over_the_named_gpus():
    assert swarm.worker_devices("cpu", 2) == ["cpu", "cpu"]
    assert swarm.worker_devices("cuda", 2) == ["cuda:0", "cuda:0"]
    assert swarm.worker_devices("cuda:1,3", 3) == ["cuda:1", "cuda:3", "cuda:1"]


def test_asking_for_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        swarm.run(swarm_config(tmp_path, device="cuda"))


# ----------------------------------------------------------------------------- a real swarm

def test_a_tiny_swarm_of_real_policies_with_debate_and_a_guide_runs_end_to_end(tmp_path, tiny_policy):
    cfg = swarm_config(tmp_path, worker_command="", checkpoints=[tiny_policy], temperatures=[0.5, 1.0], workers=2,
                       num_goals=2, guide=tiny_policy, aggregators=["guide", "majority", "verifier"], debate_rounds=1,
                       reply_timeout=60.0, threads=1)
    summary = swarm.run(cfg)
    assert summary["goals"] == 2 and 0.0 <= summary["decision_success"] <= 1.0
    proposals = [e for e in events(cfg) if e["event"] == "proposals"]
    assert [p["debate_round"] for p in proposals] == [0, 1, 0, 1]
    assert all(len(p["proposals"]) == 2 for p in proposals)
    scores = [s for e in events(cfg) if e["event"] == "aggregate" for s in e["guide_scores"]]
    assert len(scores) == 4 and all(s < 0 for s in scores)  # log-probabilities of an untrained model's actions
    assert not any(e["event"] in ("restart", "drop") for e in events(cfg))


# ----------------------------------------------------------------------------- learning

def sent(cfg, kind, role=None):
    """The messages of one type the coordinator sent (to one role)."""
    return [e for e in events(cfg) if e["event"] == "send" and e["message"]["type"] == kind
            and (role is None or e["role"] == role)]


def test_each_worker_learns_from_the_verified_successes_of_every_goal(tmp_path):
    cfg = swarm_config(tmp_path, learning="each", save_every=2)
    summary = swarm.run(cfg)
    assert summary["goals"] == 3 and summary["learning"] == "each"
    learn = sent(cfg, "learn")
    assert len(learn) == 3 * 3  # every goal, every worker
    for e in learn:  # the two teacher workers play the same plan: one distinct success, no echo failure
        (shared,) = e["message"]["experience"]
        assert not shared["teacher"] and shared["actions"][-1].startswith("ANSWER")
    checkpoints = [e for e in events(cfg) if e["event"] == "checkpoint"]
    assert [c["goals_done"] for c in checkpoints] == [2, 3]
    assert set(checkpoints[-1]["paths"]) == {"worker_0", "worker_1", "worker_2"}
    assert all(os.path.exists(p) for p in checkpoints[-1]["paths"].values())


def test_with_teacher_help_a_goal_nobody_solved_is_shared_for_the_teacher_to_label(tmp_path):
    cfg = swarm_config(tmp_path, learning="each", teacher_help=True, checkpoints=["fake:echo"], workers=2)
    swarm.run(cfg)
    (shared,) = sent(cfg, "learn")[0]["message"]["experience"]
    assert shared["teacher"] and shared["actions"] == ["ECHO"]
    cfg2 = swarm_config(tmp_path / "no_help", learning="each", checkpoints=["fake:echo"], workers=2)
    swarm.run(cfg2)
    assert sent(cfg2, "learn") == []  # nothing succeeded, no teacher: nothing to learn from


def test_a_learner_trains_and_broadcasts_weights_every_k_goals(tmp_path):
    cfg = swarm_config(tmp_path, learning="learner", broadcast_every=2, num_goals=4, save_every=100)
    summary = swarm.run(cfg)
    assert summary["goals"] == 4 and summary["learner_lost_at_goal"] is None
    assert len(sent(cfg, "learn", "learner")) == 4 and sent(cfg, "learn", "worker") == []
    assert [e["goals_done"] for e in events(cfg) if e["event"] == "broadcast"] == [2, 4]
    assert len(sent(cfg, "weights", "worker")) == 2 * 3
    with open(os.path.join(cfg["out_dir"], "checkpoints", "learner_3.pt")) as f:
        assert json.load(f) == {"fake": "teacher", "learned": 4}  # the fake learner counts what it learnt from


def test_a_learner_that_dies_leaves_the_workers_their_last_weights_and_the_run_goes_on(tmp_path):
    cfg = swarm_config(tmp_path, learning="learner", learner="fake:crashlearn", num_goals=4, broadcast_every=2)
    summary = swarm.run(cfg)
    assert summary["goals"] == 4 and summary["decision_success"] == 1.0
    assert summary["learner_lost_at_goal"] == 2  # restarted once at goal 1, dropped at goal 2
    log = events(cfg)
    assert [e["role"] for e in log if e["event"] == "drop"] == ["learner"]
    lost = [e for e in log if e["event"] == "learner_lost"]
    assert len(lost) == 1 and lost[0]["weights_from_goal"] is None
    assert sent(cfg, "weights") == []


def test_a_worker_that_dies_during_a_weight_update_is_restarted_then_dropped(tmp_path):
    cfg = swarm_config(tmp_path, learning="each", checkpoints=["fake:teacher", "fake:crashlearn", "fake:teacher"])
    summary = swarm.run(cfg)
    assert summary["goals"] == 3 and summary["decision_success"] == 1.0
    log = events(cfg)
    assert [e["worker"] for e in log if e["event"] == "restart"] == [1]
    assert [e["worker"] for e in log if e["event"] == "drop"] == [1]
    assert all(gone(e["pid"]) for e in log if e["event"] == "start")


def test_a_learning_swarm_of_real_policies_saves_checkpoints_and_resumes(tmp_path, tiny_policy):
    import torch
    cfg = swarm_config(tmp_path, worker_command="", checkpoints=[tiny_policy], workers=2, num_goals=2, learning="each", teacher_help=True,
                       reply_timeout=60.0, save_every=1, learning_rate=1e-2)
    swarm.run(cfg)
    learned = [e["message"] for e in events(cfg) if e["event"] == "receive" and e["message"]["type"] == "learned"]
    assert len(learned) == 4 and all(m["items"] >= 1 and m["loss"] > 0 for m in learned)
    path = os.path.join(cfg["out_dir"], "checkpoints", "worker_0.pt")
    state, start = torch.load(path, weights_only=True), torch.load(tiny_policy, weights_only=True)
    assert state["step"] >= 2 and len(state["replay"]) >= 2  # two goals of shared experience, in the replay buffer
    assert any(not torch.equal(state["model"][k], start["model"][k]) for k in start["model"])  # the weights moved
    summary = swarm.run(cfg | {"num_goals": 4, "resume": True})
    assert summary["goals"] == 4 and summary["resumed_at_goal"] == 2
    log = events(cfg)
    restarts = [e["hello"] for e in log if e["event"] == "start"][2:]
    assert all(h["resume"] and h["checkpoint"].endswith(f"worker_{h['worker']}.pt") for h in restarts)
    goals = [e["goal"]["seed"] - tasks.EVAL_SEED_BASE for e in log if e["event"] == "goal"]
    assert goals == [0, 1, 2, 3]
    assert torch.load(path, weights_only=True)["step"] > state["step"]


def test_a_real_learner_broadcasts_weights_that_real_workers_load(tmp_path, tiny_policy):
    cfg = swarm_config(tmp_path, worker_command="", checkpoints=[tiny_policy], workers=2, num_goals=2, learning="learner",
                       teacher_help=True, broadcast_every=1, reply_timeout=60.0, learning_rate=1e-2)
    summary = swarm.run(cfg)
    assert summary["goals"] == 2 and summary["learner_lost_at_goal"] is None
    loaded = [e for e in events(cfg) if e["event"] == "receive" and e["message"]["type"] == "loaded"]
    path = os.path.join(cfg["out_dir"], "checkpoints", "learner_2.pt")
    assert len(loaded) == 2 * 2 and all(e["message"]["path"] == path for e in loaded)
    assert not any(e["event"] in ("restart", "drop") for e in events(cfg))


def test_a_learning_run_of_fake_workers_resumes_from_their_checkpoints(tmp_path):
    cfg = swarm_config(tmp_path, learning="each", save_every=1, num_goals=2)
    swarm.run(cfg)
    summary = swarm.run(cfg | {"num_goals": 4, "resume": True})
    assert summary["goals"] == 4 and summary["resumed_at_goal"] == 2 and summary["worker_failures"] == 0
    with open(os.path.join(cfg["out_dir"], "checkpoints", "worker_0.pt")) as f:
        assert json.load(f) == {"fake": "teacher", "learned": 4}  # one shared success a goal, two before the resume


def test_resume_without_a_checkpoint_says_so(tmp_path):
    cfg = swarm_config(tmp_path, num_goals=1)
    swarm.run(cfg)
    with pytest.raises(SystemExit, match="holds no checkpoint yet"):
        swarm.run(cfg | {"resume": True})
    with pytest.raises(SystemExit, match="nothing to resume"):
        swarm.run(cfg | {"resume": True, "out_dir": str(tmp_path / "empty")})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "swarm.jsonl").write_text('{"step": 1}\n[2]\n{"event": "checkpoint", "goals_done": 1}\n')
    with pytest.raises(SystemExit, match="a checkpoint event swarm.py did not write"):
        swarm.run(cfg | {"resume": True, "out_dir": str(foreign)})


# ----------------------------------------------------------------------------- messages and the guide

def test_text_debate_shows_each_worker_the_others_plans_in_a_peers_line(tmp_path):
    cfg = swarm_config(tmp_path, debate_rounds=1, debate="text", num_goals=1)
    summary = swarm.run(cfg)
    second = [e["message"] for e in sent(cfg, "goal")][3:]
    assert len(second) == 3 and summary["episodes"] == 6
    for message in second:
        (peers,) = message["notes"]
        assert peers.startswith("PEERS: ") and peers.count(" | ") == 1
    assert "ECHO" in second[0]["notes"][0] and "ECHO" not in second[1]["notes"][0]


def test_the_guide_hint_reaches_every_worker_and_a_confident_guide_stops_the_round(tmp_path):
    cfg = swarm_config(tmp_path, guide="fake:teacher", hint=True, num_goals=2)
    swarm.run(cfg)
    goals = [e for e in sent(cfg, "goal")]
    guide_asks = [e for e in goals if e["role"] == "guide"]
    assert len(guide_asks) == 2 and all(e["message"]["confidence"] for e in guide_asks)
    hints = [e["message"]["notes"] for e in goals if e["role"] == "worker"]
    assert len(hints) == 6 and all(n[0].startswith("HINT: CALL calc ") for n in hints)
    cfg = swarm_config(tmp_path / "stop", guide="fake:teacher", guide_stop=0.9, num_goals=2)
    summary = swarm.run(cfg)
    assert summary["early_stops"] == 2 and summary["decision_success"] == 1.0 and summary["episodes"] == 2
    assert [e["role"] for e in sent(cfg, "goal")] == ["guide", "guide"]


def test_a_guide_that_learns_gets_the_shared_outcomes_and_saves_a_checkpoint(tmp_path):
    cfg = swarm_config(tmp_path, guide="fake:teacher", hint=True, learning="each", guide_learns=True, num_goals=2)
    swarm.run(cfg)
    assert len(sent(cfg, "learn", "guide")) == 2 and len(sent(cfg, "learn", "worker")) == 2 * 3
    assert os.path.exists(os.path.join(cfg["out_dir"], "checkpoints", "guide_3.pt"))
    with pytest.raises(ConfigError, match="guide_learns needs"):
        swarm.run(swarm_config(tmp_path / "x", guide="fake:teacher", guide_learns=True))


def test_a_reply_over_the_length_cap_counts_as_a_failure(tmp_path):
    cfg = swarm_config(tmp_path, checkpoints=["fake:teacher", "fake:flood"], workers=2, num_goals=2)
    summary = swarm.run(cfg)
    assert summary["goals"] == 2
    reasons = [e["reason"] for e in events(cfg) if e["event"] in ("restart", "drop")]
    assert len(reasons) == 2 and all("over the cap" in r for r in reasons)


def test_a_worker_printing_without_a_newline_is_read_no_further_and_dropped(tmp_path):
    import tracemalloc
    cfg = swarm_config(tmp_path, checkpoints=["fake:teacher", "fake:floodraw"], workers=2, num_goals=2)
    tracemalloc.start()
    try:
        summary = swarm.run(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["goals"] == 2 and summary["decision_success"] == 1.0
    assert peak < 8 << 20  # it printed 400 MiB (twice): the coordinator read one line's cap of each
    reasons = [e["reason"] for e in events(cfg) if e["event"] in ("restart", "drop")]
    assert len(reasons) == 2, reasons
    assert all(f"more than {swarm_protocol.MAX_LINE_BYTES} bytes" in r and "not read" in r for r in reasons)


def test_note_lines_are_capped_and_plans_read_as_one_line():
    line = tasks.note_line("PEERS", ["ANSWER 1\nANSWER 2", "x" * 1000])
    assert line.startswith("PEERS: ANSWER 1 ANSWER 2 | xx") and len(line) == tasks.MAX_NOTE_CHARS
    assert tasks.plan_text(["CALL calc 1+2", " ANSWER 3 "]) == "CALL calc 1+2 ; ANSWER 3"


# ----------------------------------------------------------------------------- workers anywhere

def wrapped(template):
    return f"sh -c '{template}'"


@pytest.mark.parametrize("command", [wrapped(f"exec {{python}} {FAKES}"), wrapped(f"sleep 0.3; exec {{python}} {FAKES}")])
def test_workers_start_through_a_command_template_even_on_a_slow_link(tmp_path, command):
    cfg = swarm_config(tmp_path, worker_command=command)
    summary = swarm.run(cfg)
    assert summary["goals"] == 3 and summary["decision_success"] == 1.0 and summary["worker_failures"] == 0


@pytest.mark.parametrize("command, reason", [
    (wrapped("exit 7"), "exited with code 7"),
    ("/no/such/launcher {python}", "could not run"),
    ("sh {old_worker}", "speaks protocol 99"),
])
def test_a_worker_command_that_dies_cannot_start_or_speaks_another_protocol_is_named(tmp_path, command, reason):
    old_worker = tmp_path / "old_worker.sh"  # a worker of another protocol version
    old_worker.write_text('read hello\necho \'{"type": "ready", "protocol": 99, "worker": 0}\'\nsleep 5\n')
    command = command.replace("{old_worker}", str(old_worker))
    cfg = swarm_config(tmp_path, worker_command=command, workers=1, checkpoints=["fake:teacher"], start_timeout=10.0)
    with pytest.raises(SystemExit, match="every worker was dropped"):
        swarm.run(cfg)
    drops = [e["reason"] for e in events(cfg) if e["event"] in ("restart", "drop")]
    assert len(drops) == 2 and all(reason in r for r in drops), drops


def test_a_worker_command_template_with_unknown_fields_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be filled in"):
        swarm.run(swarm_config(tmp_path, worker_command="ssh {host} {python}"))


# ----------------------------------------------------------------------------- a person steers

def test_a_person_sets_the_next_goal_broadcasts_and_pauses_and_it_is_all_logged(tmp_path):
    cfg = swarm_config(tmp_path, num_goals=2, human=True, checkpoints=["fake:teacher"], workers=2)
    shown = io.StringIO()
    typed = "g 42\nm use the tool\np\nnonsense\nresume\nbanana split\na\na\n" + "m " + "y" * 400 + "\na\n"
    summary = swarm.run(cfg, inp=io.StringIO(typed), out=shown)
    seeds = [e["goal"]["seed"] for e in events(cfg) if e["event"] == "goal"]
    assert seeds == [tasks.EVAL_SEED_BASE, 42, tasks.EVAL_SEED_BASE + 1] and summary["goals"] == 3
    human = [(e["action"]) for e in events(cfg) if e["event"] == "human"]
    assert human == ["set_goal", "broadcast", "pause", "resume", "unknown", "broadcast"]
    second = [e["message"]["notes"] for e in sent(cfg, "goal")][2:4]  # the goal after the broadcast
    assert second == [["HUMAN: use the tool"]] * 2
    assert "message cut to" in shown.getvalue() and "paused" in shown.getvalue()


def test_a_person_setting_a_goal_that_cannot_be_played_is_told_why(tmp_path):
    cfg = swarm_config(tmp_path, num_goals=1, human=True, checkpoints=["fake:teacher"], workers=1)
    shown = io.StringIO()
    swarm.run(cfg, inp=io.StringIO("g chess 3\ng soon\na\n"), out=shown)
    assert "unknown task 'chess'" in shown.getvalue() and "must be an integer" in shown.getvalue()



def command(out_dir, action, text=""):
    with open(out_dir / "control.jsonl", "a") as f:
        f.write(json.dumps({"action": action, "text": text}) + "\n")


def test_a_person_on_the_web_page_steers_the_swarm_through_its_control_file(tmp_path):
    out_dir = tmp_path / "swarm"
    out_dir.mkdir()
    command(out_dir, "stop")  # written before the run started: another session's, never read
    proc = subprocess.Popen([sys.executable, SWARM, "--human", "--human_input=file", "--workers=2", "--num_goals=4",
                             *fake_args(tmp_path, "echo"), f"--out_dir={out_dir}"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_events(out_dir / "swarm.jsonl", "awaiting_human", 1)
        env = tasks.make_env("arith")
        env.reset(tasks.EVAL_SEED_BASE)
        command(out_dir, "note", "use the\ntool")  # one line, whatever the page sent
        command(out_dir, "hint", "CALL calc 1+1 ; ANSWER 2")
        command(out_dir, "pause")
        command(out_dir, "resume")
        command(out_dir, "edit", f"ANSWER {env.answer}")
        wait_for_events(out_dir / "swarm.jsonl", "awaiting_human", 2)
        with open(out_dir / "control.jsonl", "a") as f:
            f.write("not json\n")
        command(out_dir, "reject")
        wait_for_events(out_dir / "swarm.jsonl", "awaiting_human", 3)
        command(out_dir, "stop")
        out, err = proc.communicate(timeout=60)
    finally:
        clean_up(proc, [])
    assert proc.returncode == 0, err
    cfg = {"out_dir": str(out_dir)}
    verdicts = [e["verdict"] for e in events(cfg) if e["event"] == "decision"]
    assert verdicts == ["edit", "reject", "stop"]
    human = [e["action"] for e in events(cfg) if e["event"] == "human"]
    assert human == ["broadcast", "hint", "pause", "resume", "unknown"]
    notes = [e["message"]["notes"] for e in sent(cfg, "goal")][2:4]  # the second goal's
    assert notes == [["HUMAN: use the tool", "HINT: CALL calc 1+1 ; ANSWER 2"]] * 2
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["decision_success"] == pytest.approx(1 / 3, abs=1e-3) and "the person edited 1" in out
    assert (out_dir / "swarm.png").exists() and (out_dir / "summary.txt").read_text().strip() in out


def test_a_control_line_becomes_what_a_person_would_type():
    from swarm_console import typed_lines
    assert typed_lines('{"action": "edit", "text": "ANSWER\\n 5"}') == ["e", "ANSWER 5"]
    assert typed_lines('{"action": "accept"}') == ["a"]
    assert typed_lines('{"action": "rm -rf"}') == typed_lines("garbage") == ["?"]
    assert typed_lines('{"action": "note", "text": "' + "x" * 5000 + '"}')[0] == "m " + "x" * 1000

# ----------------------------------------------------------------------------- the experiment script

def swarm_learning(monkeypatch):
    import importlib
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))  # by name: the processes it spawns import it too
    return importlib.import_module("swarm_learning")


def test_the_swarm_learning_experiment_runs_its_main_parts_at_a_tiny_size(tmp_path, monkeypatch, tiny_policy):
    """learning and throughput end to end (messages has its own test below; guide and equal reuse the same runner
    and are left out to keep the suite within CI's minutes; arith starts from a given worker, rooms imitates)."""
    experiment = swarm_learning(monkeypatch)
    tiny = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 192, "imitation_episodes": 40, "imitation_iters": 2,
            "clone_iters": 2, "imitation_batch_size": 2}
    out = tmp_path / "exp"
    experiment.main([f"--out={out}", "--parts=['learning', 'throughput']", "--goals=2", "--workers=1",
                     "--eval_goals=2", "--throughput_workers=[1]", "--throughput_goals=1", f"--worker_ckpt={tiny_policy}"]
                    + [f"--{role}={tiny | {'block_size': 256} if 'rooms' in role else tiny}"
                       for role in ("arith_worker", "rooms_worker")])
    report = json.loads((out / "swarm_learning.json").read_text())
    table = report["table"]
    assert {"arith_learning_vs_frozen", "rooms_learning_vs_frozen", "throughput_episodes_per_minute",
            "throughput_learning_over_frozen"} <= set(table)
    assert set(table["throughput_episodes_per_minute"]) == {"throughput_none_1", "throughput_each_1",
                                                             "throughput_each_1_every4"}
    assert set(table["throughput_learning_over_frozen"]) == {"1", "1_every4"}
    assert 0 <= table["arith_learning_vs_frozen"]["alone_after"]["greedy"] <= 1
    assert (out / "swarm_learning.png").stat().st_size > 0
    assert experiment.in_parallel(1, {"a": (len, "abc")}, deadline=time.monotonic() - 1) == {}  # past it: nothing starts


def test_messages_and_hints_are_compared_with_a_learnt_worker_trained_to_read_them(tmp_path, monkeypatch, tiny_policy):
    experiment = swarm_learning(monkeypatch)
    out = tmp_path / "exp"
    experiment.main([f"--out={out}", "--parts=['messages']", f"--worker_ckpt={tiny_policy}", "--goals=2", "--workers=2",
                     "--eval_goals=1", "--notes_training={'iters': 2, 'episodes': 4, 'share': 1.0}"])
    report = json.loads((out / "swarm_learning.json").read_text())
    trained = report["policies"]["arith_worker_notes"]
    assert "arith_worker" not in report["policies"]  # started from the checkpoint: nothing imitated
    for run in ("compare_frozen", "debate_adopt", "debate_text"):  # every comparison plays the trained worker
        config = next(e for e in events({"out_dir": out / "runs" / run}) if e["event"] == "config")["config"]
        assert config["checkpoints"] == [trained]
    again = experiment.train_on_notes(str(out), tiny_policy, {"iters": 2, "episodes": 4, "share": 1.0}, "cpu")
    assert again == trained  # the same recipe: reused, not trained again
    assert set(report["table"]["reading"]) == {"worker", "before_notes_training"}
    assert set(report["table"]["reading"]["worker"]) == {f"{how}{note}" for how in ("greedy", "sampled")
                                                         for note in ("", "_right_hint", "_right_peers",
                                                                      "_right_peers_all")}
    assert (out / "swarm_learning.png").stat().st_size > 0


@pytest.mark.parametrize("arg, message", [("--worker_ckpt=nowhere.pt", "no worker checkpoint at nowhere.pt"),
                                          ("--notes_training={'iter': 5}", "unknown notes_training keys")])
def test_the_experiment_names_a_missing_worker_or_a_wrong_notes_key_before_any_work(tmp_path, monkeypatch, arg, message):
    experiment = swarm_learning(monkeypatch)
    with pytest.raises(SystemExit, match=message):
        experiment.main([f"--out={tmp_path / 'exp'}", arg])
    assert not (tmp_path / "exp").exists()
