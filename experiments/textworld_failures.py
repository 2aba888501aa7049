"""
Why does an easy-game TextWorld policy fail the games it fails, and does choose_untried fix it?

    python experiments/textworld_failures.py --games=200 --held_out=100 --out=out/tw_failures \
        --world_args="['--imitation_iters=150','--clone_iters=300']"

For each seed: world.py with config/world_textworld_easy.py imitates the walkthroughs of N training games
(reused when <out>/policy_seed<seed> holds it; a finished seed's play is read back too), then plays the
held-out games with act=choose, as it is and with choose_untried (never the same command twice in the same
game state). Each failed game is sorted by what went wrong, in this order:
  lost            the game ended early without a win (e.g. the quest's object eaten)
  out_of_context  at the first command that left the walkthrough, the transcript no longer fit the block
                  (the objective, written at the start, was cut off)
  loop            the policy took the same command in the same game state twice: the game is deterministic,
                  so a greedy policy goes round the same cycle until it runs out of steps
  wandered        out of steps, no state-command pair repeated
and at that first wrong command: was it shorter than the walkthrough's (what a summed log-likelihood
favours; against how often a wrong command picked at random would be), did the walkthrough's command score
second best, and had the transcript outgrown the block by the last command (the objective cut off for the
late choices)? Writes textworld_failures.json and textworld_failures.png.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import read_json, write_json_atomic  # noqa: E402
from configurator import configure, print_config, read_config_file  # noqa: E402
from metrics import save_figure  # noqa: E402
from policy import load_policy  # noqa: E402
from scripts import run_script  # noqa: E402
from tasks import ACTION_PREFIX, EVAL_SEED_BASE, make_env, play_episode  # noqa: E402

DEFAULTS = dict(
    out="out/textworld_failures",
    config="config/world_textworld_easy.py",
    games=200,               # training games imitated (N)
    imitation_per_game=2,    # walkthrough episodes per training game
    held_out=100,            # unseen games played by each way of choosing
    seeds=[1337],            # one imitation policy per seed
    device="cpu",
    world_args=[],           # more world.py settings, e.g. ["--imitation_iters=150", "--clone_iters=300"] (not tasks)
)
KINDS = ("lost", "out_of_context", "loop", "wandered")
WAYS = {"choose": False, "choose_untried": True}  # name -> untried


def imitation_policy(cfg, seed):
    """The imitation policy of one seed (made by world.py, or the one already in its folder)."""
    textworld = read_config_file(cfg["config"])["tasks"]["textworld"] | {"games": cfg["games"]}
    out_dir = os.path.join(cfg["out"], f"policy_seed{seed}")
    run = {"tasks": {"textworld": textworld}, "imitation_episodes": cfg["imitation_per_game"] * cfg["games"],
           "seed": seed, "device": cfg["device"], "out_dir": out_dir, "mode": "evaluate", "act": "choose",
           "eval_episodes": 1}
    path = os.path.join(out_dir, "imitation", "cloned.pt")
    if not os.path.exists(path):
        run_script("world.py", run, args=[cfg["config"], *cfg["world_args"]])
    return load_policy(path, cfg["device"]), textworld


def diagnose(policy, env, episode):
    """What went wrong in a failed episode: its kind (KINDS) and facts about its first wrong command."""
    actions, teacher = episode["actions"], episode["teacher_actions"]
    first = next((i for i, (a, t) in enumerate(zip(actions, teacher)) if a != t), len(actions) - 1)
    env.reset(episode["seed"])  # replayed (the game is deterministic) for its states and listed commands
    seen, loop, rank = set(), False, None
    for i, action in enumerate(actions):
        key = (env.state_key(), action)
        loop, seen = loop or key in seen, seen | {key}
        if i == first:
            prompt = episode["transcript"][:episode["action_spans"][i][0] - len(ACTION_PREFIX)]
            commands = env.admissible_actions()
            others = [c for c in commands if c != teacher[i]] or [teacher[i]]
            shorter_by_chance = sum(len(c) < len(teacher[i]) for c in others) / len(others)  # a random wrong pick
            if teacher[i] in commands:
                with torch.no_grad():
                    scores = policy.command_scores(prompt, commands)
                rank = int((scores > scores[commands.index(teacher[i])]).sum())
            context = len(policy.tokenizer.encode(prompt + ACTION_PREFIX))
        env.step(action)
    last = episode["transcript"][:episode["action_spans"][-1][0]]
    past_block = len(policy.tokenizer.encode(last)) > policy.model.config.block_size  # the objective cut off by the end
    kind = ("lost" if len(actions) < env.max_steps else
            "out_of_context" if context > policy.model.config.block_size else
            "loop" if loop else "wandered")
    return {"seed": episode["seed"] - EVAL_SEED_BASE, "kind": kind, "first_wrong_step": first,
            "chosen": actions[first], "walkthrough": teacher[first], "walkthrough_rank": rank, "context_tokens": context,
            "past_block_by_the_end": past_block, "shorter": len(actions[first]) < len(teacher[first]),
            "shorter_by_chance": shorter_by_chance}


def play(policy, options, n, untried):
    """Held-out play; returns the success rate and the failures, diagnosed."""
    env = make_env("textworld", **options)
    wins, failures = 0, []
    for i in range(n):
        episode = play_episode(env, policy.actor(0.0, 0, env, "choose", untried), EVAL_SEED_BASE + i)
        wins += episode["success"]
        if not episode["success"]:
            failures.append(diagnose(policy, env, episode))
    env.close()
    return {"success": wins / n, "kinds": {k: sum(f["kind"] == k for f in failures) for k in KINDS},
            "shorter": sum(f["shorter"] for f in failures),
            "shorter_by_chance": round(sum(f["shorter_by_chance"] for f in failures), 1),
            "walkthrough_second": sum(f["walkthrough_rank"] == 1 for f in failures),
            "past_block_by_the_end": sum(f["past_block_by_the_end"] for f in failures), "failures": failures}


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    bars = [(seed, way, r) for seed, ways in results.items() for way, r in ways.items()]
    labels = [f"{way}\nseed {seed}" for seed, way, _ in bars]
    left.bar(range(len(bars)), [r["success"] for _, _, r in bars], color=[f"C{list(WAYS).index(w)}" for _, w, _ in bars])
    left.set(xticks=range(len(bars)), ylim=(0, 1), ylabel="held-out success", title="easy games, act=choose")
    left.set_xticklabels(labels, fontsize=7)
    bottom = [0.0] * len(bars)
    for k, kind in enumerate(KINDS):
        share = [r["kinds"][kind] / max(1, sum(r["kinds"].values())) * (1 - r["success"]) for _, _, r in bars]
        right.bar(range(len(bars)), share, bottom=bottom, color=f"C{k + 2}", label=kind)
        bottom = [b + s for b, s in zip(bottom, share)]
    right.set(xticks=range(len(bars)), ylabel="share of held-out games failed", title="why the failures fail")
    right.set_xticklabels(labels, fontsize=7)
    right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    if cfg["games"] < 1 or cfg["held_out"] < 1 or cfg["imitation_per_game"] < 1 or not cfg["seeds"]:
        raise SystemExit("need games, held_out and imitation_per_game >= 1 and at least one seed")
    print_config(cfg)
    os.makedirs(cfg["out"], exist_ok=True)
    results = {}
    for seed in cfg["seeds"]:
        policy, options = imitation_policy(cfg, seed)
        results[seed] = {}
        for way, untried in WAYS.items():
            done = os.path.join(cfg["out"], f"seed{seed}_{way}_{cfg['held_out']}.json")  # read back, not replayed
            r = results[seed][way] = read_json(done, "delete it to play again") if os.path.exists(done) else \
                play(policy, options, cfg["held_out"], untried)
            write_json_atomic(done, r)
            print(f"seed {seed}, {way}: held-out success {r['success']:.1%}; failures {r['kinds']}; first wrong command "
                  f"shorter than the walkthrough's in {r['shorter']} (by chance {r['shorter_by_chance']}); walkthrough's "
                  f"second best in {r['walkthrough_second']}; past the block by the last command in "
                  f"{r['past_block_by_the_end']}")
            write_json_atomic(os.path.join(cfg["out"], "textworld_failures.json"), {"config": cfg, "results": results})
    plot(results, os.path.join(cfg["out"], "textworld_failures.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
