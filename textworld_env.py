"""
TextWorld games (Côté et al. 2018, github.com/microsoft/TextWorld) as a task of world.py.

    env = TextWorld(challenge="custom", world_size=3, nb_objects=4, quest_length=2)
    obs = env.reset(seed=7)                # generates (once, cached on disk) and starts game 7
    obs, reward, done, info = env.step("take teapot from refrigerator")
    env.teacher_action(), env.admissible_actions()

Options are tw-make's own flags (`world_size=3` is `--world-size 3`, `level=5` is `--level 5`, True is
a bare flag), so every challenge tw-make knows works and a bad option gets tw-make's own message.
Games live in data/textworld/<hash of the options>/<seed>.z8 (+ .json, which TextWorld needs to track
the quest and list commands); `generate_games` builds many in parallel worker processes.
The game engine is jericho's Z-machine in this process: one per environment, reused from game to game
(each new engine loads another copy of the interpreter library that is never unloaded) and freed by close().
"""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor

from runtime import progress
from tasks import EVAL_SEED_BASE as HELD_OUT_BASE  # held-out games: never reduced to the training pool

INSTALL = "pip install textworld==1.7.0"
GAMES_DIR = os.path.join("data", "textworld")
Z8_VERSION = 8
SHOW = ("objective", "description", "look", "inventory", "commands")  # what an observation may carry
AT_LEAST_ONE = ("world_size", "nb_objects", "quest_length", "quest_breadth", "nb_parallel_quests")  # tw-make's sizes


def import_textworld():
    try:
        import textworld
    except ImportError:
        raise SystemExit(f"the textworld task needs the TextWorld package: {INSTALL}") from None
    return textworld


def tw_make_path():
    """The tw-make script that comes with the textworld package: in the same bin folder as python, in the
    bin folder beside the package (`pip install --target DIR` puts it in DIR/bin), or on PATH."""
    textworld = import_textworld()
    beside = os.path.join(os.path.dirname(os.path.dirname(textworld.__file__)), "bin", "tw-make")
    path = next((p for p in (os.path.join(os.path.dirname(sys.executable), "tw-make"), beside) if os.path.exists(p)),
                None) or shutil.which("tw-make")
    if not path:
        raise SystemExit(f"textworld is installed but its tw-make script is not on PATH: {INSTALL}")
    return path


def tw_make_args(challenge, options):
    """tw-make's command line (without seed and output) for a challenge and its options."""
    args = [challenge]
    for key, value in sorted(options.items()):
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def reuse_default_knowledge_base():
    """Every GameOptions loads a fresh copy of TextWorld's default knowledge base (logic and grammar),
    about half of tw-make's time per game (profiled); textworld loaded the same one at import, so a
    process that makes many games reuses it. Games come out byte for byte the same (tested)."""
    from textworld.generator import data, game
    if game.KnowledgeBase is not data.KnowledgeBase:
        return

    class DefaultOnce(data.KnowledgeBase):
        @classmethod
        def load(cls, *args, **kwargs):
            return data.KB if not args and not kwargs else data.KnowledgeBase.load(*args, **kwargs)
    game.KnowledgeBase = DefaultOnce


def run_tw_make(argv):
    """tw-make's own code, run in this process (textworld is imported once per process, not per game).
    Returns (exit code, what it printed): argparse and tw-make end with SystemExit on bad options."""
    import runpy
    reuse_default_knowledge_base()
    printed, old_argv = io.StringIO(), sys.argv
    sys.argv = ["tw-make"] + argv
    code = 0
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            runpy.run_path(tw_make_path(), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # tw-make's generator gives up on options its parser let through (world_size=-3)
        code = 1
        printed.write(f"tw-make failed: {type(e).__name__}: {e}")
    finally:
        sys.argv = old_argv
    return code, printed.getvalue()


def check_options(challenge, options):
    """Parse the options with tw-make's parser; a bad challenge or option stops with tw-make's message."""
    import runpy
    textworld = import_textworld()
    import textworld.challenges
    known = ["custom"] + sorted(textworld.challenges.CHALLENGES)
    if challenge not in known:
        raise SystemExit(f"unknown TextWorld challenge {challenge!r}; challenges are {', '.join(known)}")
    build_parser, old_argv = runpy.run_path(tw_make_path(), run_name="tw_make")["build_parser"], sys.argv
    sys.argv = ["tw-make"]  # argparse names the program after argv[0]
    try:
        parser = build_parser()
    finally:
        sys.argv = old_argv
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            parser.parse_args(tw_make_args(challenge, options) + ["--seed", "0"])
    except SystemExit:
        raise SystemExit(f"TextWorld options {options} for {challenge}: tw-make says\n{printed.getvalue().strip()}") from None
    negative = {k: v for k, v in options.items() if type(v) in (int, float) and v < (1 if k in AT_LEAST_ONE else 0)}
    if negative:  # tw-make's parser takes them, then its generator fails deep inside (NaN sizes)
        raise SystemExit(f"TextWorld options {negative} for {challenge}: sizes must be at least 1 "
                         f"({', '.join(AT_LEAST_ONE)}) and no option negative")


def game_dir(challenge, options, root=GAMES_DIR):
    """The cache folder of one game distribution: a hash of tw-make's arguments and textworld's version."""
    textworld = import_textworld()
    key = json.dumps({"args": tw_make_args(challenge, options), "textworld": textworld.__version__})
    return os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:16])


def game_is_whole(z8_path):
    """A game file and its .json that were written completely: the Z-machine header's version byte and
    file length (bytes 26-27, in units of 8 for version 8) agree with the file, and the json parses."""
    json_path = z8_path[:-3] + ".json"
    try:
        with open(z8_path, "rb") as f:
            data = f.read()
        with open(json_path) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return len(data) >= 64 and data[0] == Z8_VERSION and 0 < int.from_bytes(data[26:28], "big") * 8 <= len(data)


def build_game(challenge, options, seed, folder):
    """Generate one game into folder/<seed>.z8 (+ .json): written in a temporary folder, moved into place
    json first, z8 last, so a game is whole once its z8 is there. Returns (seed, error message or None)."""
    tmp = tempfile.mkdtemp(prefix=f".{seed}-", dir=folder)
    try:
        code, printed = run_tw_make(tw_make_args(challenge, options) +
                                    ["--seed", str(seed), "--output", os.path.join(tmp, "game.z8"), "--silent", "-f"])
        made = os.path.join(tmp, "game.z8")
        if code != 0 or not game_is_whole(made):
            return seed, printed.strip() or f"tw-make exited with {code} and wrote no game"
        os.replace(os.path.join(tmp, "game.json"), os.path.join(folder, f"{seed}.json"))
        os.replace(made, os.path.join(folder, f"{seed}.z8"))
        return seed, None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_games(challenge, options, seeds, root=GAMES_DIR, workers=None):
    """Make sure every seed's game is in the cache, generating the missing or broken ones in parallel
    worker processes (tw-make takes a second or two per game). Returns the cache folder."""
    check_options(challenge, options)
    folder = game_dir(challenge, options, root)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "options.json.tmp"), "w") as f:  # for a person looking at the cache
        json.dump({"challenge": challenge, "options": options}, f)
    os.replace(os.path.join(folder, "options.json.tmp"), os.path.join(folder, "options.json"))
    missing = sorted({s for s in seeds if not game_is_whole(os.path.join(folder, f"{s}.z8"))})
    if not missing:
        return folder
    workers = max(1, min(workers or os.cpu_count() or 1, len(missing)))
    errors = []
    with ProcessPoolExecutor(workers) as pool, \
            progress(len(missing), f"TextWorld {challenge} games", "game") as bar:
        for seed, error in pool.map(build_game, [challenge] * len(missing), [options] * len(missing), missing,
                                    [folder] * len(missing)):
            if error:
                errors.append((seed, error))
            bar.update()
    if errors:
        seed, error = errors[0]
        raise SystemExit(f"tw-make could not make {len(errors)} of {len(missing)} {challenge} games with "
                         f"{options} (seed {seed}):\n{error}")
    return folder


def clean_text(text):
    """Game text on one line: the prompt and status bar after the last '>' go, whitespace collapses."""
    text = text or ""
    if "\n>" in text:
        text = text[:text.rindex("\n>")]
    text = text.split("Would you like to RESTART", 1)[0].replace("*** The End ***", "")
    return re.sub(r"\s+", " ", text).strip()


class TextWorld:
    """One TextWorld game per seed, behind world.py's task contract.

    reset(seed) -> observation; step(action) -> (observation, reward, done, info). The reward is the
    game's score gained, as a fraction of its maximum (a whole quest sums to 1); success is winning.
    `games=N` makes a training pool: seeds below HELD_OUT_BASE play game seed % N, so N games are
    generated however many episodes are played; held-out seeds are their own games.
    `show` lists what observations carry besides the game's reply: 'objective' and 'description' (the
    room) on the first turn, 'look' (the room every turn, unless the reply already describes it),
    'inventory' and 'commands' (the admissible commands) every turn.
    """
    name = "textworld"

    def __init__(self, challenge="custom", games=None, max_steps=20, show=("objective", "description"),
                 root=GAMES_DIR, **options):
        self.game = None  # the TextWorld environment: one engine, loaded with each episode's game
        self.show = tuple(show)
        unknown = set(self.show) - set(SHOW)
        if unknown:
            raise ValueError(f"show can hold {', '.join(SHOW)}; not {', '.join(sorted(unknown))}")
        check_options(challenge, options)
        self.challenge, self.options, self.games, self.max_steps, self.root = challenge, options, games, max_steps, root
        self.folder = game_dir(challenge, options, root)
        self.state, self.done = None, True

    def prepare(self, held_out):
        """Generate the training pool and the first `held_out` held-out games, in parallel, before play."""
        pool = range(self.games) if self.games else []
        generate_games(self.challenge, self.options, [*pool, *(HELD_OUT_BASE + i for i in range(held_out))],
                       self.root)

    def game_seed(self, seed):
        return seed % self.games if self.games and seed < HELD_OUT_BASE else seed

    def game_path(self, seed):
        """The game file for an episode seed, generated first if it is not in the cache (or is broken)."""
        path = os.path.join(self.folder, f"{self.game_seed(seed)}.z8")
        if not game_is_whole(path):
            generate_games(self.challenge, self.options, [self.game_seed(seed)], self.root, workers=1)
        return path

    def reset(self, seed):
        textworld = import_textworld()
        path = self.game_path(seed)
        # jericho warns that it does not know each generated game; TextWorld tracks score and quest itself
        warnings.filterwarnings("ignore", message=".*is not fully supported", module="jericho")
        if self.game is None:
            infos = textworld.EnvInfos(admissible_commands=True, policy_commands=True, description=True,
                                       inventory=True, objective=True, max_score=True, won=True, lost=True,
                                       score=True, facts=True)
            self.game = textworld.start(path, request_infos=infos)
        else:
            self.game.load(path)
        self.state = self.game.reset()
        self.seed, self.steps, self.done, self.success = seed, 0, False, False
        self.score = self.state.score or 0
        return self.observe(None, first=True)

    def observe(self, feedback, first=False):
        parts = [clean_text(self.state.objective) if first and "objective" in self.show else ""]
        if feedback is not None:
            parts.append(clean_text(feedback))
        room = clean_text(self.state.description)
        if (first and "description" in self.show) or ("look" in self.show and not self.done and room not in parts[-1]):
            parts.append(room)
        if "inventory" in self.show and not self.done:
            parts.append(clean_text(self.state.inventory))
        if "commands" in self.show and not self.done:
            parts.append("Commands: " + ", ".join(self.admissible_actions()) + ".")
        return " ".join(p for p in parts if p)

    def step(self, action):
        if self.state is None:
            raise RuntimeError("textworld: call reset(seed) before step()")
        if self.done:
            raise RuntimeError("textworld: the episode is over; call reset(seed) to start another")
        # the first line, in printable ASCII without backslashes: dumb-frotz reads a backslash as the start of one of its
        # own commands, and a policy's random text with one (backslash, q, ...) corrupted jericho's memory and killed
        # the whole process
        action = re.sub(r"[^ -\[\]-~]", "", action.strip().split("\n", 1)[0]).strip()
        admissible = action in self.state.admissible_commands
        self.state, score, game_over = self.game.step(action)
        reward = (score - self.score) / max(1, self.state.max_score or 1)
        self.score, self.steps = score, self.steps + 1
        success = bool(self.state.won)
        truncated = not game_over and self.steps >= self.max_steps
        self.done, self.success = game_over or truncated, success
        obs = self.observe(self.state.feedback)
        if truncated:
            obs = f"{obs} Out of steps."
        return obs, reward, self.done, {"success": success, "kind": "obs" if admissible else "error",
                                        "truncated": truncated, "steps": self.steps}

    def admissible_actions(self):
        return list(self.state.admissible_commands or [])

    def teacher_action(self):
        """The next command of the walkthrough from the current state (TextWorld replans after any detour)."""
        return (self.state.policy_commands or ["look"])[0]

    def state_key(self):
        """The game's state as TextWorld tracks it (its true facts: where the player and each object are, what
        is open): equal after close cabinet then open cabinet, or take shirt then drop shirt, where the room's
        text is not (the dropped shirt is listed in another place)."""
        return frozenset(map(str, self.state.facts))

    def random_action(self, rng):
        return rng.choice(self.admissible_actions() or ["look"])

    def close(self):
        if self.game is not None:
            self.game.close()
            self.game = None

    def __del__(self):
        self.close()
