"""
One swarm worker as a program: swarm_agent.py's serve over stdin/stdout. swarm.py starts it as a child process
(`python swarm_worker.py`, or any command that runs it: worker_command), sends a hello, then goals, messages,
scores, learning and saves, until stop.

    python swarm_worker.py        # speaks the protocol on stdin/stdout; stderr is its log
"""
import os
import sys

from swarm_agent import ModelAgent, serve


def main(make_agent=ModelAgent):
    """The worker program: the protocol on a private copy of stdout, everything else printed to stderr."""
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print lands in the log, not the protocol
    sys.stdout = sys.stderr
    return serve(sys.stdin, protocol_out, make_agent)


if __name__ == "__main__":
    sys.exit(main())
