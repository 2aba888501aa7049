"""
Test workers for swarm.py: a worker program that speaks swarm_protocol.py without a model.

    python tests/swarm_fakes.py      # as swarm_worker.py, started through worker_command=fake_command()

Its "checkpoint" is a small JSON file naming its mode (write one with fake_checkpoint): echo proposes a
fixed answer, teacher the world's teacher actions; crash, hang and garbage misbehave on their first
goal; flood answers it with a line over the cap, floodraw prints 400 MiB without a newline; crashlearn
dies in its first weight update. They learn by counting: their saved "weights" are that JSON file with
the count, so a restarted or resumed fake goes on from it.
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import swarm_worker  # noqa: E402
import tasks  # noqa: E402
from swarm_protocol import MAX_LINE_BYTES, goal_env  # noqa: E402

MODES = ("echo", "teacher", "crash", "hang", "garbage", "flood", "floodraw", "crashlearn")
FLOOD_BYTES = 400 << 20


def fake_checkpoint(folder, mode, learned=0):
    """The path of a fake worker's checkpoint of this mode, written under folder."""
    path = os.path.join(folder, f"fake_{mode}.json")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"fake": mode, "learned": learned}, f)
    return path


def fake_command(template="{python} {fakes}"):
    """A worker_command that starts this program; template may wrap it (e.g. in sh -c '...')."""
    return template.replace("{fakes}", os.path.abspath(__file__))


class FakeAgent:
    def __init__(self, hello, out):
        try:
            with open(hello["checkpoint"]) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"not a fake worker checkpoint: {hello['checkpoint']} ({e})")
        self.mode, self.learned, self.out = state["fake"], state["learned"], out
        if self.mode not in MODES:
            raise SystemExit(f"unknown fake worker {self.mode!r}; known: {', '.join(MODES)}")

    def propose(self, goal, notes=(), confidence=False):
        if self.mode == "crash":
            os._exit(3)
        if self.mode == "hang":
            while True:
                time.sleep(60)
        if self.mode == "garbage":
            self.out.write("Traceback? no: this line is not JSON\n")
            self.out.flush()
            return {"answer": "too late", "actions": []}
        if self.mode == "flood":
            return {"answer": "x", "actions": ["x" * MAX_LINE_BYTES]}
        if self.mode == "floodraw":
            chunk = "x" * (1 << 20)
            for _ in range(FLOOD_BYTES // len(chunk)):
                self.out.write(chunk)  # blocks once the coordinator stops reading: it kills us
            self.out.flush()
        if self.mode == "teacher":
            env = goal_env(goal)
            episode = tasks.play_episode(env, tasks.teacher_act(env), goal["seed"])
            proposal = {"answer": episode["actions"][-1], "actions": episode["actions"]}
        else:
            proposal = {"answer": "ECHO", "actions": ["ECHO"]}
        return dict(proposal, confidence=1.0) if confidence else proposal

    def score(self, goal, proposals):
        return [float(p["answer"] == "ECHO") for p in proposals]

    def revise(self, goal, own, proposals):
        return dict(own, adopted_from=None)

    def learn(self, experience):
        if self.mode == "crashlearn":
            os._exit(4)
        self.learned += len(experience)
        return {"items": len(experience), "loss": 0.0}

    def save(self, path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(f"{path}.tmp", "w") as f:
            json.dump({"fake": self.mode, "learned": self.learned}, f)
        os.replace(f"{path}.tmp", path)
        return {"path": path}

    def load_weights(self, path):
        with open(path) as f:
            self.learned = json.load(f)["learned"]
        return {"path": path}


if __name__ == "__main__":
    sys.exit(swarm_worker.main(FakeAgent))
