"""
A swarm that learns (issue 13): does sharing verified outcomes make the swarm and its workers better,
do text messages beat the adopt rule, does a guide's hint help, and what does learning cost in speed?

    OMP_NUM_THREADS=1 python experiments/swarm_learning.py --out=out/swarm_learning      # small: a few minutes, 2 cores
    python experiments/swarm_learning.py config/swarm_learning_full.py --out=out/swarm_learning_full   # 500 goals, 16 cores
    python experiments/swarm_learning.py config/swarm_messages_cpu.py   # messages and hints, a worker trained to read them
    python experiments/swarm_learning.py config/swarm_throughput_full.py --out=/tmp/swarm_tp   # throughput only
    python experiments/swarm_learning.py --replot=experiments/results/swarm_learning_gpu.json  # its PNG again

One command makes everything: the policies (world.py's imitation, stopped early so a worker is
half-trained; PEERS and HINT lines in half the arith transcripts so workers can read them), guides 2x
and 8x the workers' parameters, then swarm.py runs on the same goals and seeds:
  learning   frozen vs learning="each" (teacher help on) on arith and rooms: success over goals, and one
             worker alone (greedy and sampled, on held-out seeds the swarm never saw) before and after
  equal      one world.py learner from the same policy on as many episodes as the learning swarm played
             (workers x goals, a batch of workers x learn_every episodes, as the swarm's): which learns
             more per episode and per wall-second
  messages   one debate round: the adopt rule vs text messages (PEERS line)
  guide      the guide's plan as a HINT line, guide 2x and 8x; 8x with early stop (guide_stop)
  throughput episodes/min from 1 to N workers, frozen and learning every learn_every and 4x that many goals
The arith worker may be a learnt one (worker_ckpt) instead of the imitation, and the messages and guide
runs may use it further trained on transcripts with PEERS and HINT lines (notes_training), so that the
comparison is made with a worker that has learnt to read them; "reading" says whether it has: the worker
alone with the right plan as a HINT or PEERS line.
Writes swarm_learning.json (every number, with its config) and swarm_learning.png (success over goals, the
headline numbers, episodes/min over workers).
"""
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import read_json, write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from metrics import save_figure  # noqa: E402
from policy import Cloning, clone_actions, json_roundtrip, load_policy, reusable_policy  # noqa: E402
from runtime import StopRequest, named_call, read_jsonl, run_in_processes  # noqa: E402
from scripts import run_script  # noqa: E402
from tasks import EVAL_SEED_BASE, make_env, note_line, plan_text, play_episode, teacher_act, teacher_episodes  # noqa: E402

HELD_OUT = EVAL_SEED_BASE + 10 ** 6  # one worker alone is measured here: seeds no swarm goal uses
PARTS = ("learning", "equal", "messages", "guide", "throughput")

DEFAULTS = dict(
    out="out/swarm_learning",
    parts=list(PARTS),
    goals=40,                 # goals per learning / frozen swarm run (the issue: 500)
    compare_goals=0,          # goals per messages / guide run (0: as goals); fewer keeps the full run short
    rooms_goals=0,            # goals per rooms run (0: as goals): a rooms episode costs ~8x an arith one
    deadline=0,               # seconds: past this no new run starts and the report holds what finished (0: none)
    workers=4,                # workers per swarm run
    eval_goals=60,            # held-out seeds for one worker alone
    throughput_workers=[1, 2, 4],
    throughput_goals=12,
    jobs=1,                   # runs at once (each swarm starts its own workers): 1 on 2 cores, 3 on 16
    policy_device="cpu",      # where the policies imitate (cuda on a GPU machine); the swarms run on the CPU
    seed=0,                   # the swarms' sampling seed (worker i samples with seed + i); goals are fixed
    temperature=0.5,          # the workers' sampling temperature: this half-trained arith policy solves ~25% of
                              # goals per sample at 0.5, ~1% at 1.0 (greedy: ~55%)
    teacher_help=True,
    learning_rate=3e-4,       # the workers' expert iteration (swarm.py's keys, world.py's code)
    learn_every=1,            # goals per batch of shared experience (measured on arith, 4 workers, 40 goals, lr
                              # 3e-4, worker 0 on 100 held-out seeds: every goal, greedy 62% -> 62%, sampled at
                              # 0.5 17% -> 27%; every 4 goals, 62% -> 51%, 17% -> 14%; lr 1e-3 every goal: 70% -> 25%)
    updates_per_batch=2,
    update_batch_size=16,
    # the policies: world.py imitation settings per role; `steps` scales the imitation of every one
    arith_worker=dict(n_layer=2, n_head=4, n_embd=64, block_size=192, imitation_episodes=500, imitation_iters=200,
                      clone_iters=500, imitation_notes=0.5),
    arith_guide2=dict(n_layer=2, n_head=4, n_embd=96, block_size=192, imitation_episodes=500, imitation_iters=300,
                      clone_iters=700, imitation_notes=0.5),
    arith_guide8=dict(n_layer=4, n_head=4, n_embd=128, block_size=192, imitation_episodes=500, imitation_iters=300,
                      clone_iters=700, imitation_notes=0.5),
    rooms_worker=dict(n_layer=2, n_head=4, n_embd=64, block_size=256, imitation_episodes=200, teacher_noise=0.3,
                      imitation_iters=200, clone_iters=300),
    replot="",                # a swarm_learning JSON: redraw its PNG beside it from its numbers, run nothing
    worker_ckpt="",           # every arith run starts from this policy (a learnt worker: a learning run's
                              # checkpoints/worker_0.pt, a world.py policy.pt) instead of imitating arith_worker
    notes_training={},        # the messages / guide runs' worker trained further (behaviour cloning) on teacher
                              # transcripts with PEERS / HINT lines, right and wrong plans; keys of NOTES_TRAINING
)
NOTES_TRAINING = dict(
    iters=0,                  # behaviour-cloning steps (0: the messages / guide runs use the arith worker as it is)
    episodes=1000,            # teacher transcripts
    share=0.5,                # each shows a PEERS line with this chance, and (independently) a HINT line
    learning_rate=5e-4,       # a fine-tune of a learnt worker: lower than imitation_lr from scratch
    seed=1338,                # other transcripts than the imitation's (world.py's seed 1337)
)


# ----------------------------------------------------------------------------- pieces, each runnable in a process

def make_policy(out, name, task, options, device):
    """A policy by world.py's imitation (python world.py --mode=evaluate ...; reused while the run in its folder
    was made with the same settings); returns its checkpoint."""
    out_dir = os.path.join(out, "policies", name)
    run = {"out_dir": out_dir, "tasks": {task: {}}, "device": device, "mode": "evaluate", "eval_episodes": 1,
           "overwrite": True} | options
    made, config = os.path.join(out_dir, "imitation", "recipe.json"), os.path.join(out_dir, "config.json")
    same = os.path.exists(made) and os.path.exists(config) and \
        all(read_json(config, "delete it").get(k) == v for k, v in json_roundtrip(run).items())
    if not same:
        with StopRequest(print) as stop:
            run_script("world.py", run, stop)
        if stop.requested:
            raise SystemExit(f"stopped while making the {name} policy; the same command goes on from its imitation")
    return read_json(made, "delete it to imitate again")["checkpoint"]


def alone(path, task, n, temperature, note="", copies=1):
    """One worker alone: success on n held-out seeds no swarm goal uses (greedy at temperature 0); with note
    "HINT" or "PEERS", the right plan (the teacher's) is in its context as that line, `copies` times."""
    policy, env = load_policy(path), make_env(task)
    wins = 0
    for i in range(n):
        right = [plan_text(play_episode(env, teacher_act(env), HELD_OUT + i)["actions"])] if note else []
        notes = [note_line(note, right * copies)] if note else []
        wins += play_episode(env, policy.actor(temperature, i), HELD_OUT + i, notes)["success"]
    return wins / n


def alone_both(path, task, n, temperature):
    """One worker alone, greedy and sampled at the workers' temperature."""
    return {"greedy": alone(path, task, n, 0.0), "sampled": alone(path, task, n, temperature)}


def reading(path, n, temperature, peers):
    """Has the arith worker learnt to read messages? Alone, greedy and sampled, with nothing in its context,
    with the right plan as a HINT line, as a PEERS line, and as a PEERS line of `peers` plans (the length a
    text round shows when every peer is right): a worker that reads them gains from the right plan."""
    return {f"{how}{suffix}": alone(path, "arith", n, t, note, copies) for how, t in (("greedy", 0.0), ("sampled", temperature))
            for note, copies, suffix in (("", 1, ""), ("HINT", 1, "_right_hint"), ("PEERS", 1, "_right_peers"),
                                         ("PEERS", peers, "_right_peers_all"))}


def train_on_notes(out, path, notes, device):
    """The worker at `path` after behaviour cloning (world.py's) on teacher transcripts that show the peers'
    and a guide's plans, right and wrong (tasks.sample_notes), as the issue asks; returns its checkpoint
    (reused, like an imitation, while the recipe is the same)."""
    notes = NOTES_TRAINING | notes
    clone = Cloning(iters=notes["iters"], batch_size=16, learning_rate=notes["learning_rate"],  # world.py's batch
                    seed=notes["seed"], device=device, path=os.path.join(out, "policies", "arith_worker_notes", "cloned.pt"))
    recipe = json_roundtrip({"start": path, "notes": notes, "clone": dataclasses.asdict(clone)})
    recipe_path = os.path.join(out, "policies", "arith_worker_notes", "recipe.json")
    reused = reusable_policy(recipe_path, recipe)
    if reused:
        return reused
    episodes = teacher_episodes({"arith": {}}, notes["episodes"], 0.0, notes["seed"], notes["share"])
    with StopRequest(print) as stop:
        trained = clone_actions(path, episodes, clone, stop)
    write_json_atomic(recipe_path, {"recipe": recipe, "checkpoint": trained})
    return trained


def swarm_run(out_dir, settings):
    """One swarm.py run; its summary and, per goal, the decision's success and one worker's (mean first proposal)."""
    settings = dict(settings)
    eval_goals = settings.pop("eval_goals", 0)  # one worker alone after a learning run, on this many held-out seeds
    run_script("swarm.py", {"out_dir": out_dir, "overwrite": True, "reply_timeout": 600.0} | settings)
    summary = read_json(os.path.join(out_dir, "summary.json"), fix="run the experiment again")
    records = [e["record"] for e in read_jsonl(os.path.join(out_dir, "swarm.jsonl")) if e["event"] == "result"]
    curve = {"decision": [int(r["decision"]["success"]) for r in records],
             "worker": [round(sum(p["success"] for p in r["first"]) / max(1, r["asked"]), 4) for r in records],
             "final": [round(sum(p["success"] for p in r["proposals"]) / max(1, len(r["proposals"])), 4) for r in records]}
    result = {"summary": summary, "curve": curve}
    if eval_goals:
        result["after"] = alone_both(os.path.join(out_dir, "checkpoints", "worker_0.pt"), settings["task"], eval_goals,
                                     settings["temperatures"][0])
    return result


def single_learner(out_dir, path, task, episodes, batch, cfg):
    """world.py's expert iteration from the same policy on `episodes` episodes, `batch` per update; its
    wall seconds and one worker alone afterwards."""
    run = {
        "out_dir": out_dir, "overwrite": True, "tasks": {task: {}}, "init_from": path, "mode": "expert_iteration",
        "teacher_help": cfg["teacher_help"], "episodes": episodes, "episodes_per_update": batch,
        "updates_per_batch": cfg["updates_per_batch"], "update_batch_size": cfg["update_batch_size"],
        "learning_rate": cfg["learning_rate"], "temperature_start": cfg["temperature"],  # as the workers
        "temperature_end": cfg["temperature"],
        "eval_interval": episodes + 1, "eval_episodes": 1, "seed": cfg["seed"]}
    t0 = time.perf_counter()
    run_script("world.py", run)
    seconds = time.perf_counter() - t0
    return {"episodes": episodes, "seconds": round(seconds, 2),
            "after": alone_both(os.path.join(out_dir, "policy.pt"), task, cfg["eval_goals"], cfg["temperature"])}


def in_parallel(jobs, calls, done=lambda results: None, deadline=None):
    """{name: fn(*args)} for calls {name: (fn, *args)}, `jobs` at a time in fresh processes; done(results so
    far) after each one finishes. Past `deadline` (time.monotonic) no new call starts: their names are missing."""
    results = {}
    for name, result in run_in_processes(named_call, [(name, *call) for name, call in calls.items()], jobs, deadline):
        results[name] = result
        done(results)
    return results


# ----------------------------------------------------------------------------- the experiment

def swarm_settings(cfg, task, checkpoint, **overrides):
    return {"task": task, "checkpoints": [checkpoint], "num_goals": cfg["goals"], "workers": cfg["workers"],
            "temperatures": [cfg["temperature"]], "seed": cfg["seed"], "aggregators": ["majority", "verifier"],
            "teacher_help": cfg["teacher_help"], "learning_rate": cfg["learning_rate"], "learn_every": cfg["learn_every"],
            "updates_per_batch": cfg["updates_per_batch"], "update_batch_size": cfg["update_batch_size"],
            "save_every": cfg["goals"]} | overrides


def experiment(cfg):
    out, parts, jobs = cfg["out"], cfg["parts"], cfg["jobs"]
    t0 = time.perf_counter()
    deadline = time.monotonic() + cfg["deadline"] if cfg["deadline"] else None
    roles = {"arith_worker": "arith", "rooms_worker": "rooms", "arith_guide2": "arith", "arith_guide8": "arith"}
    if "learning" not in parts:
        roles.pop("rooms_worker")
    if "guide" not in parts:
        roles.pop("arith_guide2"), roles.pop("arith_guide8")
    if cfg["worker_ckpt"]:
        roles.pop("arith_worker")
    policies = in_parallel(max(jobs, len(roles)) if jobs > 1 else 1,
                           {name: (make_policy, out, name, task, cfg[name], cfg["policy_device"]) for name, task in roles.items()})
    arith, runs_dir = cfg["worker_ckpt"] or policies["arith_worker"], os.path.join(out, "runs")
    calls = {"before_arith": (alone_both, arith, "arith", cfg["eval_goals"], cfg["temperature"])}
    talker = arith  # the worker of the messages and guide runs
    if "messages" in parts or "guide" in parts:
        if cfg["notes_training"].get("iters"):
            talker = policies["arith_worker_notes"] = train_on_notes(out, arith, cfg["notes_training"],
                                                                     cfg["policy_device"])
            calls["reading_before"] = (reading, arith, cfg["eval_goals"], cfg["temperature"], cfg["workers"] - 1)
        calls["reading"] = (reading, talker, cfg["eval_goals"], cfg["temperature"], cfg["workers"] - 1)
    print(f"policies ready after {time.perf_counter() - t0:.0f} s: {policies}")
    if "learning" in parts:  # the frozen swarms are the baselines: same goals, seeds and policies
        rooms = policies["rooms_worker"]
        calls["before_rooms"] = (alone_both, rooms, "rooms", cfg["eval_goals"], cfg["temperature"])
        for task, path in (("rooms", rooms), ("arith", arith)):  # the longest runs first: they set the wall time
            goals = {"num_goals": cfg["rooms_goals"] or cfg["goals"]} if task == "rooms" else {}
            calls[f"{task}_learning"] = (swarm_run, os.path.join(runs_dir, f"{task}_learning"),
                                         swarm_settings(cfg, task, path, learning="each", eval_goals=cfg["eval_goals"],
                                                        **goals))
            calls[f"{task}_frozen"] = (swarm_run, os.path.join(runs_dir, f"{task}_frozen"),
                                       swarm_settings(cfg, task, path, **goals))
    if "equal" in parts:
        calls["arith_single_learner"] = (single_learner, os.path.join(runs_dir, "arith_single_learner"), arith, "arith",
                                         cfg["workers"] * cfg["goals"], cfg["workers"] * cfg["learn_every"], cfg)
    compare = {"num_goals": cfg["compare_goals"] or cfg["goals"]}
    if "messages" in parts or "guide" in parts:  # the baseline of both, on their goals
        calls["compare_frozen"] = (swarm_run, os.path.join(runs_dir, "compare_frozen"),
                                   swarm_settings(cfg, "arith", talker, **compare))
    if "messages" in parts:
        for debate in ("adopt", "text"):
            calls[f"debate_{debate}"] = (swarm_run, os.path.join(runs_dir, f"debate_{debate}"),
                                         swarm_settings(cfg, "arith", talker, debate_rounds=1, debate=debate, **compare))
    if "guide" in parts:
        for size in (2, 8):
            guide = policies[f"arith_guide{size}"]
            calls[f"guide{size}_alone"] = (alone_both, guide, "arith", cfg["eval_goals"], cfg["temperature"])
            calls[f"hint_guide{size}"] = (swarm_run, os.path.join(runs_dir, f"hint_guide{size}"),
                                          swarm_settings(cfg, "arith", talker, guide=guide, hint=True, **compare))
        calls["hint_guide8_stop"] = (swarm_run, os.path.join(runs_dir, "hint_guide8_stop"),
                                     swarm_settings(cfg, "arith", talker, guide=policies["arith_guide8"], hint=True,
                                                    guide_stop=0.9, **compare))

    def progress(results):  # what finished so far: a run cut short by a time limit still leaves its numbers
        write_json_atomic(os.path.join(out, "progress.json"), {"config": cfg, "seconds": round(time.perf_counter() - t0, 1),
                                                               "results": results})
    results = in_parallel(jobs, calls, progress, deadline)
    print(f"comparisons done after {time.perf_counter() - t0:.0f} s")
    if "throughput" in parts:  # alone on the machine: speeds from runs that share it would mean nothing
        for n in cfg["throughput_workers"]:
            for learning, every in (("none", 1), ("each", cfg["learn_every"]), ("each", 4 * cfg["learn_every"])):
                name = f"throughput_{learning}_{n}" + (f"_every{every}" if every != cfg["learn_every"] else "")
                if deadline is not None and time.monotonic() > deadline:
                    break
                results[name] = swarm_run(os.path.join(runs_dir, name), swarm_settings(
                    cfg, "arith", arith, workers=n, num_goals=cfg["throughput_goals"], learning=learning,
                    learn_every=every, aggregators=["majority"]))
                progress(results)
    return {"config": cfg, "policies": policies, "seconds": round(time.perf_counter() - t0, 1), "results": results,
            "table": table(cfg, results)}


def last(curve, n):
    """The mean of the last n values (the end of a run)."""
    tail = curve[-n:]
    return round(sum(tail) / len(tail), 4) if tail else None


def table(cfg, results):
    """The headline numbers, one flat dict per question."""
    rows = {}
    have = lambda *names: all(n in results for n in names)  # noqa: E731  (a deadline may leave some out)
    for task in ("arith", "rooms"):
        if not have(f"{task}_learning", f"{task}_frozen", f"before_{task}"):
            continue
        frozen, learning = results[f"{task}_frozen"], results[f"{task}_learning"]
        quarter = max(1, len(frozen["curve"]["decision"]) // 4)
        rows[f"{task}_learning_vs_frozen"] = {
            "decision_frozen": frozen["summary"]["decision_success"], "decision_learning": learning["summary"]["decision_success"],
            "decision_last_quarter_frozen": last(frozen["curve"]["decision"], quarter),
            "decision_last_quarter_learning": last(learning["curve"]["decision"], quarter),
            "worker_last_quarter_frozen": last(frozen["curve"]["worker"], quarter),
            "worker_last_quarter_learning": last(learning["curve"]["worker"], quarter),
            "alone_before": results[f"before_{task}"], "alone_after": learning["after"],
            "seconds_frozen": frozen["summary"]["seconds"], "seconds_learning": learning["summary"]["seconds"]}
    if have("arith_single_learner", "before_arith"):
        single, learning = results["arith_single_learner"], results.get("arith_learning")
        rows["swarm_vs_single_learner"] = {
            "episodes": single["episodes"], "single_after": single["after"], "single_seconds": single["seconds"],
            "swarm_worker0_after": learning and learning["after"],
            "swarm_episodes": learning and learning["summary"]["episodes"],
            "swarm_seconds": learning and learning["summary"]["seconds"], "before": results["before_arith"]}
    if have("compare_frozen", "debate_adopt", "debate_text"):
        rows["messages"] = {name: {k: results[run]["summary"][k]
                                   for k in ("majority_success", "verifier_success", "single_worker_success")}
                            | {"worker_after_debate": round(sum(results[run]["curve"]["final"]) /
                                                            max(1, len(results[run]["curve"]["final"])), 4)}
                            for name, run in (("none", "compare_frozen"), ("adopt", "debate_adopt"), ("text", "debate_text"))}
    if have("compare_frozen", "hint_guide2", "hint_guide8", "hint_guide8_stop", "guide2_alone", "guide8_alone"):
        rows["guide"] = {name: {"majority_success": results[run]["summary"]["majority_success"],
                                "single_worker_success": results[run]["summary"]["single_worker_success"],
                                "early_stops": results[run]["summary"]["early_stops"],
                                "episodes": results[run]["summary"]["episodes"]}
                         for name, run in (("no_guide", "compare_frozen"), ("hint_2x", "hint_guide2"),
                                           ("hint_8x", "hint_guide8"), ("hint_8x_stop0.9", "hint_guide8_stop"))}
        rows["guide"]["guide_alone"] = {"2x": results["guide2_alone"], "8x": results["guide8_alone"]}
    if "reading" in results:
        rows["reading"] = {"worker": results["reading"]} | ({"before_notes_training": results["reading_before"]}
                                                            if "reading_before" in results else {})
    speeds = {k: v["summary"]["episodes_per_minute"] for k, v in results.items() if k.startswith("throughput_")}
    if speeds:
        rows["throughput_episodes_per_minute"] = speeds
        rows["throughput_learning_over_frozen"] = {  # the target: >= 0.5 on the 16-core machine
            k.removeprefix("throughput_each_"): round(v / speeds[f"throughput_none_{k.split('_')[2]}"], 3)
            for k, v in speeds.items() if k.startswith("throughput_each_") and f"throughput_none_{k.split('_')[2]}" in speeds}
    return rows


def rolling(values, window):
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot(report, path):
    """Success over goals (arith, rooms), the headline numbers as bars, and episodes/min over workers: the
    panels the report has numbers for. Returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results, rows, cfg = report["results"], report["table"], report["config"]
    window = max(1, cfg["goals"] // 10)
    curves = [task for task in ("arith", "rooms") if f"{task}_frozen" in results or f"{task}_learning" in results]
    bars = {}
    for task in ("arith", "rooms"):
        row = rows.get(f"{task}_learning_vs_frozen")
        if row:
            bars[f"{task}\nalone before"] = row["alone_before"]["greedy"]
            bars[f"{task}\nalone after"] = row["alone_after"]["greedy"]
    if "swarm_vs_single_learner" in rows:
        bars["arith\nsingle learner"] = rows["swarm_vs_single_learner"]["single_after"]["greedy"]
    for name, row in rows.get("messages", {}).items():
        bars[f"debate\n{name}"] = row["majority_success"]
    for name, row in rows.get("guide", {}).items():
        if name == "guide_alone":
            bars.update({f"guide {size}\nalone greedy": alone["greedy"] for size, alone in row.items()})
        elif name != "no_guide":  # the same run as debate none
            bars[name.replace("_", "\n")] = row["majority_success"]
    speeds = rows.get("throughput_episodes_per_minute", {})
    panels = curves + ["reading"] * ("reading" in rows) + ["bars"] * bool(bars) + ["throughput"] * bool(speeds)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "bars":
            names = [name.replace("\n", " ") for name in bars]  # horizontal: a dozen names stay readable
            ax.barh(range(len(bars)), list(bars.values()), color=[f"C{i % 10}" for i in range(len(bars))])
            ax.set_yticks(range(len(bars)), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.set_title("success: alone (greedy, held-out seeds) / swarm majority", fontsize=9)
            ax.set_xlabel("success rate")
            ax.set_ylabel("run")
            ax.grid(alpha=0.3, axis="x")
        elif panel == "reading":
            names = [f"{how}{note}" for how in ("greedy", "sampled")
                     for note in ("", "_right_hint", "_right_peers", "_right_peers_all")]
            trained = "before_notes_training" in rows["reading"]
            series = [("before_notes_training", "before notes training")] * trained + \
                [("worker", "after notes training" if trained else "the worker")]
            for i, (key, label) in enumerate(series):
                ax.bar([j + 0.4 * i for j in range(len(names))], [rows["reading"][key][n] for n in names], 0.4,
                       label=label)
            ax.set_xticks([j + 0.2 * (len(series) - 1) for j in range(len(names))],
                          [n.replace("_", " ") for n in names], fontsize=7, rotation=30, ha="right")
            ax.set_ylim(0, 1)
            ax.set_title(f"the messages' worker alone: does it read the right plan? (sampled at {cfg['temperature']})",
                         fontsize=8)
            ax.set_xlabel("decoding, and the plan in the worker's context")
            ax.set_ylabel("success rate")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
        elif panel == "throughput":
            every = cfg["learn_every"]
            for suffix, label in (("none_{}", "frozen"), ("each_{}", f"learning every {every} goal(s)"),
                                  (f"each_{{}}_every{4 * every}", f"learning every {4 * every} goals")):
                points = [(n, speeds[f"throughput_{suffix.format(n)}"]) for n in cfg["throughput_workers"]
                          if f"throughput_{suffix.format(n)}" in speeds]
                if points:
                    ax.plot(*zip(*points), marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(cfg["throughput_workers"], [str(n) for n in cfg["throughput_workers"]])
            ax.set_xlabel("workers")
            ax.set_ylabel("episodes / min")
            ax.set_title("throughput (the swarms on the CPU)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        else:
            for i, (run, label) in enumerate(((f"{panel}_frozen", "frozen"), (f"{panel}_learning", "learning"))):
                if run not in results:
                    continue
                curve = results[run]["curve"]
                ax.plot(rolling(curve["decision"], window), color=f"C{i}", lw=2, label=f"{label}: swarm decision")
                ax.plot(rolling(curve["worker"], window), color=f"C{i}", lw=1, ls="--", label=f"{label}: one worker")
            ax.set_title(f"{panel}: success over goals (rolling mean of {window})")
            ax.set_xlabel("goal")
            ax.set_ylabel(f"success rate (rolling mean of {window} goals)")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    return fig


def main(argv):
    cfg = configure(DEFAULTS, argv)
    if cfg["replot"]:
        png = os.path.splitext(cfg["replot"])[0] + ".png"
        plot(read_json(cfg["replot"], "give the JSON a swarm_learning.py run wrote"), png)
        print(f"wrote {png}")
        return
    unknown = set(cfg["parts"]) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; parts are {', '.join(PARTS)}")
    unknown = set(cfg["notes_training"]) - set(NOTES_TRAINING)
    if unknown:
        raise SystemExit(f"unknown notes_training keys {sorted(unknown)}; its keys are {', '.join(NOTES_TRAINING)}")
    if cfg["worker_ckpt"] and not os.path.exists(cfg["worker_ckpt"]):
        raise SystemExit(f"no worker checkpoint at {cfg['worker_ckpt']}: give a learnt worker's checkpoint (a "
                         f"learning run's checkpoints/worker_0.pt) or leave worker_ckpt empty to imitate one")
    print_config(cfg)
    report = experiment(cfg)
    os.makedirs(cfg["out"], exist_ok=True)
    write_json_atomic(os.path.join(cfg["out"], "swarm_learning.json"), report)
    plot(report, os.path.join(cfg["out"], "swarm_learning.png"))
    for name, row in report["table"].items():
        print(f"{name}: {row}")
    print(f"wrote {cfg['out']}/swarm_learning.json and .png in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
