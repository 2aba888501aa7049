"""
A stand-in for a captured CUDA graph, so tests on a CPU can take the graph paths of generation.py (test_decode.py)
and batching.py (test_batching.py): the capture is replaced by an object whose replay runs the step again.
"""


class StandInGraph:
    """What capture_graph (or step_and_capture) returns, on a CPU: each replay runs the captured step again."""

    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()
