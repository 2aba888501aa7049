"""
µLM's tasks as Gymnasium environments, and any Gymnasium text environment as a task of world.py.

    import gymnasium, gym_envs                          # importing registers ulm/<task>-v0 for every task
    env = gymnasium.make("ulm/arith-v0", tool="compute")   # make's keywords are the task's options
    obs, info = env.reset(seed=7)                        # info: the teacher's action (and the commands listed)
    obs, reward, terminated, truncated, info = env.step(info["teacher_action"])

    python world.py --tasks="{'gym:ulm/rooms-v0': {}}"   # world.py plays any Gymnasium text environment
    python world.py --tasks="{'gym:my_package:MyText-v0': {}}" --init_from=out/world/policy.pt

TaskEnv wraps a tasks.py task (TextWorld too) in Gymnasium's API: text observation and action spaces
(gymnasium.spaces.Text over tasks.ALPHABET, cut at MAX_OBSERVATION_CHARS and MAX_ACTION_CHARS), reset(seed=...,
options=...) -> (obs, info), step(action) -> (obs, reward, terminated, truncated, info); truncated means
the task's step limit. info carries "teacher_action" (what the scripted teacher or walkthrough does next)
and, where the task lists its moves, "admissible_commands"; step's info adds "success" and "kind".

GymTask goes the other way: a Gymnasium environment with text spaces behind tasks.py's task contract,
so world.py's play loop, imitation and evaluation run on it (tasks.make_env builds it for a task named
gym:<env id>). Its teacher is info["teacher_action"] when the environment gives one (world.py's imitation
and teacher help need it), its listed commands info["admissible_commands"], its success info["success"]
(else: terminated with a positive reward).

Gymnasium is an optional dependency (requirements-extras.txt): tasks.py imports this module only for a
gym: task, and the core install never needs it.
"""
import gymnasium
from gymnasium import spaces

from tasks import ALPHABET, EVAL_SEED_BASE, MAX_ACTION_CHARS, TASKS, OPTIONAL_TASKS, make_env

MAX_OBSERVATION_CHARS = 4096  # an observation is cut here (TextWorld's longest, with its commands listed, ~1500)
PREFIX = "gym:"               # world.py's task name for a Gymnasium environment: gym:<env id>
INSTALL = "pip install -r requirements-extras.txt"


# ----------------------------------------------------------------------------- µLM tasks as Gymnasium environments

def env_id(task):
    return f"ulm/{task}-v0"


class TaskEnv(gymnasium.Env):
    """A tasks.py task as a gymnasium.Env (see the module docstring); render_mode "ansi" returns the
    episode so far as the transcript lines a µLM policy reads."""
    metadata = {"render_modes": ["ansi"], "render_fps": 4}  # a text frame per step; recorders ask for a rate

    def __init__(self, task, render_mode=None, **options):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.task, self.render_mode = make_env(task, **options), render_mode
        self.observation_space = spaces.Text(MAX_OBSERVATION_CHARS, min_length=0, charset=ALPHABET)
        self.action_space = spaces.Text(MAX_ACTION_CHARS, min_length=0, charset=ALPHABET.replace("\n", ""))
        self.lines = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if options:  # the task's options are make's keywords; a reset has none of its own
            raise ValueError(f"{self.task.name} takes no reset options (got {sorted(options)}); give the task's "
                             f"options to gymnasium.make")
        # an explicit seed is the task's episode seed (tasks.py and world.py replay episodes by it); without
        # one, the next episode comes from the environment's own generator
        episode = seed if seed is not None else int(self.np_random.integers(EVAL_SEED_BASE))
        obs = observation(self.task.reset(episode))
        self.lines = [f"task {self.task.name}", f"obs {obs}"]
        return obs, self.next_state_info({"seed": episode})

    def step(self, action):
        obs, reward, done, info = self.task.step(action)
        obs = observation(obs)
        self.lines += [f"act {action}", f"{'tool' if info['kind'] == 'tool' else 'obs'} {obs}"]
        truncated = bool(info["truncated"])
        info = {"success": bool(info["success"]), "kind": info["kind"], "steps": info["steps"]}
        return obs, float(reward), bool(done) and not truncated, truncated, info if done else self.next_state_info(info)

    def next_state_info(self, info):
        """info for a state the agent acts in: the teacher's action there, and the commands the task lists."""
        info = dict(info, teacher_action=self.task.teacher_action())
        if hasattr(self.task, "admissible_actions"):
            info["admissible_commands"] = list(self.task.admissible_actions())
        return info

    def render(self):
        if self.render_mode == "ansi":
            return "\n".join(self.lines) + "\n"
        return None

    def close(self):
        if hasattr(self.task, "close"):
            self.task.close()


def observation(text):
    """A task's observation as the space holds it: characters outside ALPHABET become '?', cut to the limit."""
    return "".join(c if c in ALPHABET else "?" for c in text)[:MAX_OBSERVATION_CHARS]


def register_envs():
    """Register ulm/<task>-v0 for every task of tasks.py (TextWorld's needs its package only when made)."""
    for task in [*TASKS, *OPTIONAL_TASKS]:
        if env_id(task) not in gymnasium.registry:
            gymnasium.register(env_id(task), entry_point=TaskEnv, kwargs={"task": task})


# Gymnasium's convention: importing the module that defines environments registers them, so that
# gymnasium.make("gym_envs:ulm/arith-v0") works from any program
register_envs()


# ----------------------------------------------------------------------------- Gymnasium environments as µLM tasks

class GymTask:
    """A Gymnasium environment with text observations and actions behind tasks.py's task contract."""

    def __init__(self, name, max_steps=None, **options):
        self.name, gym_id = name, name.removeprefix(PREFIX)
        try:
            self.env = gymnasium.make(gym_id, disable_env_checker=True, **options)
        except gymnasium.error.Error as e:  # an unknown id, a wrong version, a missing module
            raise ValueError(f"task {name!r}: Gymnasium cannot make {gym_id!r} ({e})") from None
        except TypeError as e:
            raise ValueError(f"bad options {options} for task {name!r}: {e}") from None
        for what, space in (("observation", self.env.observation_space), ("action", self.env.action_space)):
            if not isinstance(space, spaces.Text):
                raise ValueError(f"task {name!r}: world.py plays environments that read and write text, and "
                                 f"{gym_id}'s {what} space is {space}")
        spec_steps = self.env.spec.max_episode_steps if self.env.spec else None
        self.max_steps = max_steps or spec_steps or 50
        self.info, self.done, self.obs = {}, True, ""
        _, probe = self.env.reset(seed=0)  # what its info carries: a teacher, listed commands
        self.teaches = "teacher_action" in probe
        if "admissible_commands" in probe:  # play_episode and act=choose ask hasattr(env, "admissible_actions")
            self.admissible_actions = lambda: list(self.info.get("admissible_commands", []))

    def reset(self, seed):
        obs, self.info = self.env.reset(seed=seed)
        self.seed, self.steps, self.done, self.success = seed, 0, False, False
        self.obs = one_line(obs)
        return self.obs

    def step(self, action):
        if self.done:
            raise RuntimeError(f"{self.name}: the episode is over; call reset(seed) to start another")
        action = action.strip().split("\n", 1)[0].strip()[:MAX_ACTION_CHARS]
        obs, reward, terminated, truncated, self.info = self.env.step(action)
        self.steps += 1
        out_of_steps = not (terminated or truncated) and self.steps >= self.max_steps
        self.done = terminated or truncated or out_of_steps
        self.success = bool(self.info.get("success", terminated and reward > 0))
        self.obs = one_line(obs) + (" Out of steps." if out_of_steps else "")
        return self.obs, float(reward), self.done, {"success": self.success, "kind": self.info.get("kind", "obs"),
                                                    "truncated": bool(truncated or out_of_steps), "steps": self.steps}

    def teacher_action(self):
        """The environment's info["teacher_action"], or '' where it has no teacher (imitation is refused then)."""
        return self.info.get("teacher_action", "")

    def random_action(self, rng):
        listed = self.info.get("admissible_commands")
        if listed:
            return rng.choice(listed)
        self.env.action_space.seed(rng.randrange(2 ** 31))  # from rng: noisy demonstrations replay exactly
        return self.env.action_space.sample()

    def state_key(self):
        """The observation stands for the state (act=choose's choose_untried): what a text environment shows."""
        return self.obs

    def prepare(self, held_out):
        """A µLM task that makes files first (TextWorld's games) makes them now."""
        task = getattr(self.env.unwrapped, "task", None)
        if hasattr(task, "prepare"):
            task.prepare(held_out)

    def close(self):
        self.env.close()


def one_line(text):
    """An observation on one transcript line: tasks.py's format has one observation per line."""
    return " ".join(str(text).split("\n")).strip()
