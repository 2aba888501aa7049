import random

import pytest
import torch

import policy as policies
import reward_model as rm
import tasks
import world
from configurator import ConfigError
from runtime import read_jsonl
from test_policy import ListedArith, tiny_policy
from test_world import save_tiny_policy, tiny_run_config

STATE = "task arith\nobs Compute 2*3. Tools: calc.\n"


def tiny_reward_model(policy, n_embd=32):
    torch.manual_seed(1)
    config = policy.model.config
    return rm.RewardModel(config.vocab_size, config.block_size, 1, 2, n_embd)


class DetachedInput(torch.nn.Module):
    """The same reward model, cut from its input: what the policy would learn with no path through it."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.body = inner, inner.body

    def forward(self, tokens, lengths):
        return self.inner(tokens.detach(), lengths)


def policy_grads(policy, reward_model):
    policy.model.zero_grad(set_to_none=True)
    rm.policy_loss(policy, reward_model, [STATE, STATE], 1.0, torch.Generator().manual_seed(0)).backward()
    return [p.grad for p in policy.model.parameters()]


def test_the_policy_gets_gradient_only_through_the_reward_model():
    policy = tiny_policy()
    reward_model = tiny_reward_model(policy)
    through = policy_grads(policy, reward_model)
    assert sum(g.abs().sum().item() for g in through if g is not None) > 0
    cut = policy_grads(policy, DetachedInput(reward_model))  # the same loss, the path through the model cut
    assert all(g is None or g.abs().sum().item() == 0 for g in cut)


def test_relaxed_action_is_the_sampled_text_forward():
    policy = tiny_policy()
    prompt = policy.tokenizer.encode(STATE + tasks.ACTION_PREFIX)
    newline = {policy.tokenizer.encode("\n")[0]}
    ids, noise = rm.sample_action(policy.model, prompt, newline, policy.tokenizer.eot, 1.0,
                                  torch.Generator().manual_seed(3))
    soft = rm.relaxed_action(policy.model, prompt, ids, noise, 1.0)  # (n, V)
    assert soft.shape == (len(ids), policy.model.config.vocab_size)
    assert soft.argmax(-1).tolist() == ids and torch.allclose(soft.sum(-1), torch.ones(len(ids)))
    assert soft.requires_grad


def test_reward_model_fits_a_toy_reward():
    """Reward 1 for an action that starts with ANSWER, 0 for CALL: the model reads the action's text."""
    policy = tiny_policy()
    reward_model = tiny_reward_model(policy)
    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=3e-3)
    rng = random.Random(0)
    items = [{"text": f"{STATE}act {verb} {rng.randint(1, 99)}\n", "return": float(verb == "ANSWER")}
             for verb in ("ANSWER", "CALL") for _ in range(20)]
    for _ in range(60):
        loss = rm.fit_reward_model(reward_model, optimizer, rng.sample(items, 16), policy.tokenizer, 192)
    assert loss < 0.05


def test_transitions_carry_the_return_from_each_action_on():
    env = tasks.make_env("arith")
    episode = tasks.play_episode(env, tasks.teacher_act(env), 5)  # CALL then ANSWER: +1 at the end
    assert [t["return"] for t in rm.transitions(episode)] == [1.0, 1.0]
    assert all(t["text"].endswith("\n") and t["text"].split("\n")[-2].startswith("act ") for t in rm.transitions(episode))
    bad = tasks.play_actions(env, ["WHAT", "ANSWER 0"], 5)  # a malformed action (-0.1), then a wrong answer
    assert [round(t["return"], 3) for t in rm.transitions(bad)] == [-0.1, 0.0]


@pytest.mark.parametrize("overrides, message", [
    ({"mode": "reward_model", "teacher_help": True}, "teacher_help=False"),
    ({"mode": "reward_model", "teacher_help": False, "act": "choose"}, "set choice_loss=True"),
    ({"mode": "reinforce", "reward_model": {"n_layer": 1}}, "for mode=reward_model"),
    ({"mode": "reward_model", "teacher_help": False, "reward_model": {"n_layers": 1}}, "did you mean 'n_layer'"),
    ({"mode": "reward_model", "teacher_help": False, "reward_model": {"fit_steps": 0}}, "positive number"),
    ({"mode": "reward_model", "teacher_help": False, "reward_model": {"anchor": -0.5}}, "anchor must be a number >= 0"),
    ({"mode": "reward_model", "teacher_help": False, "reward_model": {"anchor": "high"}}, "anchor must be a number"),
    ({"mode": "reward_model", "teacher_help": False, "reward_model": {"anchor": float("inf")}}, "anchor must be"),
])
def test_impossible_reward_model_combinations_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        world.check_config(tiny_run_config(tmp_path, **overrides))


def test_a_reward_model_run_learns_saves_and_resumes_exactly(tmp_path):
    start = save_tiny_policy(tmp_path / "start.pt")
    options = dict(mode="reward_model", teacher_help=False, init_from=start, tasks={"arith": {"max_steps": 1}},
                   eval_episodes=1,
                   reward_model={"n_layer": 1, "n_head": 2, "n_embd": 16, "fit_steps": 2, "fit_batch_size": 4,
                                 "policy_batch_size": 2, "warmup_episodes": 4})
    whole = tiny_run_config(tmp_path, out_dir=str(tmp_path / "whole"), **options)
    world.run(whole)
    rows = read_jsonl(f"{whole['out_dir']}/metrics.jsonl")
    trained = [r for r in rows if "train" in r]
    assert all(r["reward_model_loss"] >= 0 for r in trained) and trained[-1]["loss"] == trained[-1]["loss"]  # not NaN
    assert (tmp_path / "whole" / "reward_model.pt").exists()
    split = tiny_run_config(tmp_path, out_dir=str(tmp_path / "split"), **options | {"episodes": 4})
    world.run(split)
    world.run(split | {"episodes": 8, "init_from": "resume"})

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(rows) == strip(read_jsonl(f"{split['out_dir']}/metrics.jsonl"))


def test_anchor_zero_is_allowed_and_off_by_default():
    assert rm.RewardLearning().anchor == 0
    assert rm.learning_options({"anchor": 0}).anchor == 0


def anchored_step(anchor, replay, updates=1, lr=0.05):
    """`updates` policy steps of a fresh tiny learner (no warm-up, plain SGD, no clipping) after two teacher episodes;
    returns the policy, the step's losses and the replay items' action log-likelihood before and after."""
    policy = tiny_policy()
    env = tasks.make_env("arith")
    episodes = [tasks.play_episode(env, tasks.teacher_act(env), seed) for seed in (5, 6)]
    learning = rm.learning_options({"n_layer": 1, "n_head": 2, "n_embd": 16, "fit_steps": 1, "fit_batch_size": 2,
                                    "policy_batch_size": 2, "warmup_episodes": 0, "anchor": anchor})
    learner = rm.RewardLearner(policy, learning, seed=0)
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=lr)
    items = [policies.episode_item(e, 0) for e in episodes]

    def likelihood():
        with torch.no_grad():
            return policy.action_log_likelihood(items)[0].sum().item()
    before = likelihood()
    losses = learner.learn(policy, optimizer, episodes, replay, updates, 4, grad_clip=0.0)
    return policy, losses, before, likelihood()


def successes():
    """A replay buffer holding two teacher episodes: what world.py keeps of a batch's successes."""
    replay = policies.ReplayBuffer(16, 8, 0.5)
    env = tasks.make_env("arith")
    for seed in (5, 6):
        replay.add(policies.episode_item(tasks.play_episode(env, tasks.teacher_act(env), seed), 0), random.Random(0))
    return replay


def test_anchor_zero_leaves_the_policy_step_unchanged():
    """anchor=0 neither reads the replay buffer nor draws from the learner's random state: the step is the same
    with successes to replay or none, and its loss is the reward model's alone."""
    empty, _, _, _ = anchored_step(0.0, policies.ReplayBuffer(16, 8, 0.5), updates=2)
    full, losses, _, _ = anchored_step(0.0, successes(), updates=2)  # a draw in step 1 would change step 2's states
    assert all(torch.equal(a, b) for a, b in zip(empty.model.parameters(), full.model.parameters()))
    assert set(losses) == {"loss", "reward_model_loss"}


def test_anchor_pulls_the_policy_toward_replayed_successes():
    _, plain, before, without = anchored_step(0.0, successes())
    _, anchored, same_start, with_anchor = anchored_step(20.0, successes())
    assert same_start == before
    assert with_anchor > before and with_anchor > without  # the successes' action tokens got likelier
    # the step's loss is the reward model's term plus anchor x the imitation loss (the same states, the same term)
    assert anchored["loss"] == pytest.approx(plain["loss"] + 20.0 * anchored["anchor_loss"], rel=1e-4)
    assert anchored["anchor_loss"] > 0


def test_anchor_waits_for_a_first_success():
    policy, losses, before, after = anchored_step(1.0, policies.ReplayBuffer(16, 8, 0.5))
    assert losses["loss"] == losses["loss"] and losses["anchor_loss"] != losses["anchor_loss"]  # a step; no anchor


def test_a_reward_model_saved_before_the_anchor_resumes_without_one():
    policy = tiny_policy()
    state = rm.RewardLearner(policy, rm.learning_options({"n_embd": 16, "n_head": 2}), seed=0).state_dict()
    del state["learning"]["anchor"]  # as reward_model.pt was written before the option existed
    rm.RewardLearner(policy, rm.learning_options({"n_embd": 16, "n_head": 2}), seed=0).load_state_dict(state, "old.pt")
    with pytest.raises(SystemExit, match="same reward_model options"):
        rm.RewardLearner(policy, rm.learning_options({"n_embd": 16, "n_head": 2, "anchor": 1.0}),
                         seed=0).load_state_dict(state, "old.pt")


# ----------------------------------------------------------------------------- act=choose: the relaxed choice

class ConstantScore(torch.nn.Module):
    """A reward model that scores every text the same: the choice it is shown cannot matter."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.body = inner, inner.body

    def forward(self, tokens, lengths):
        return torch.full((tokens.size(0),), 0.5) + 0 * self.inner(tokens, lengths)


def listed_state():
    env = ListedArith()
    transcript = tasks.play_episode(env, tasks.teacher_act(env), 0)["transcript"]
    return transcript[:transcript.index("act ")], env.admissible_actions(), env


def test_act_choose_moves_the_policy_toward_the_command_the_reward_model_scores_best():
    state, listed, env = listed_state()
    policy = tiny_policy()
    reward_model = tiny_reward_model(policy)  # taught: the answer is worth 1, the calls 0
    fit = torch.optim.AdamW(reward_model.parameters(), lr=3e-3)
    items = [{"text": f"{state}act {c}\n", "return": float(c.startswith("ANSWER"))} for c in listed]
    for _ in range(80):
        rm.fit_reward_model(reward_model, fit, items, policy.tokenizer, 192)
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(0)

    def answer_probability():
        with torch.no_grad():
            return torch.softmax(policy.command_scores(state, listed) / 0.3, 0)[listed.index(f"ANSWER {env.answer}")]
    before = answer_probability()
    for _ in range(10):
        optimizer.zero_grad(set_to_none=True)
        rm.choice_policy_backward(policy, reward_model, [(state, listed)] * 4, 0.3, generator)
        optimizer.step()
    assert answer_probability() > before + 0.1


def test_act_choose_gets_no_gradient_from_a_reward_model_that_scores_all_commands_alike():
    state, listed, _ = listed_state()
    policy = tiny_policy()
    policy.model.zero_grad(set_to_none=True)
    loss = rm.choice_policy_backward(policy, ConstantScore(tiny_reward_model(policy)), [(state, listed)] * 2, 1.0,
                                     torch.Generator().manual_seed(0))
    assert loss == pytest.approx(-0.5)  # forward: the chosen command's score
    assert all(p.grad is None or p.grad.abs().max().item() < 1e-6 for p in policy.model.parameters())


def test_act_choose_learner_anchors_with_the_choice_loss():
    """With act=choose the stored transitions keep their listed commands, and a step's loss is the relaxed
    choice's term plus anchor x choice_loss's cross-entropy on replayed successes."""
    env = ListedArith()
    episodes = [tasks.play_episode(env, tasks.teacher_act(env), seed) for seed in (5, 6)]
    replay = policies.ReplayBuffer(16, 8, 0.5)
    for e in episodes:
        replay.add(policies.episode_item(e, 0), random.Random(0))
    assert [t["choices"] for t in rm.transitions(episodes[0])] == episodes[0]["choices"]
    results = {}
    for anchor in (0.0, 20.0):
        policy = tiny_policy()
        learning = rm.learning_options({"n_layer": 1, "n_head": 2, "n_embd": 16, "fit_steps": 1, "fit_batch_size": 2,
                                        "policy_batch_size": 2, "warmup_episodes": 0, "anchor": anchor})
        learner = rm.RewardLearner(policy, learning, seed=0, choose=True)
        optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.05)
        results[anchor] = learner.learn(policy, optimizer, episodes, replay, 1, 4, grad_clip=0.0)
    assert results[20.0]["anchor_loss"] > 0
    assert results[20.0]["loss"] == pytest.approx(results[0.0]["loss"] + 20.0 * results[20.0]["anchor_loss"], rel=1e-4)
