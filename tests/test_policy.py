"""The policy module: acting, the updates, teacher help and the replay buffer (world.py and swarm.py share them)."""
import dataclasses
import random

import pytest
import torch

import policy as policies
import tasks
from model import GPT, GPTConfig
from tokenizer import CharTokenizer


def tiny_learning(**overrides):
    return policies.Learning(**{"mode": "expert_iteration", "learning_rate": 3e-3, "updates_per_batch": 2,
                                "update_batch_size": 4, "grad_clip": 1.0, "replay_size": 100, "replay_recent_window": 10,
                                "replay_recent_fraction": 0.5, "seed": 0} | overrides)


def tiny_policy(block_size=192):
    torch.manual_seed(0)
    tokenizer = CharTokenizer(sorted(set(tasks.ALPHABET)))
    model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=block_size, n_layer=1, n_head=2, n_embd=32))
    return policies.Policy(model, tokenizer)


def test_policy_writes_one_action_line():
    action = tiny_policy().act("task arith\nobs Compute 2*3. Tools: calc.\n", temperature=1.0, seed=0)
    assert isinstance(action, str) and "\n" not in action and len(action) <= tasks.MAX_ACTION_CHARS


def test_policy_acts_on_transcripts_longer_than_its_context():
    policy = tiny_policy(block_size=64)
    assert isinstance(policy.act("task rooms\n" + "obs You are in the hall.\n" * 20, seed=1), str)


def test_a_few_learning_steps_change_the_weights_and_lower_the_loss():
    policy = tiny_policy()
    env = tasks.make_env("arith")
    items = [policies.episode_item(tasks.play_episode(env, tasks.teacher_act(env), s), 0) for s in range(8)]
    before = [p.detach().clone() for p in policy.model.parameters()]
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=3e-3)
    losses = [policies.update(policy, optimizer, items, [1.0] * len(items)) for _ in range(10)]
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))


def test_reinforce_weight_sign_pushes_probability_up_or_down():
    env = tasks.make_env("arith")
    item = policies.episode_item(tasks.play_episode(env, tasks.teacher_act(env), 0), 0)
    results = {}
    for sign in (1.0, -1.0):
        policy = tiny_policy()
        optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.5)
        first = policies.update(policy, optimizer, [item], [sign])
        results[sign] = policies.update(policy, optimizer, [item], [1.0]) - abs(first)
    assert results[1.0] < 0 < results[-1.0]  # the loss of the actions fell after +1 and rose after -1


def test_action_batch_trains_only_on_action_tokens():
    policy = tiny_policy()
    env = tasks.make_env("arith")
    episode = tasks.play_episode(env, tasks.teacher_act(env), 0)
    x, y = policies.action_batch(policy, [policies.episode_item(episode, 0)])
    trained = policy.tokenizer.decode([t for t in y[0].tolist() if t != -1])
    assert trained == "".join(a + "\n" for a in episode["actions"])


def test_teacher_help_labels_the_states_where_the_policy_went_wrong():
    env = tasks.make_env("arith")
    episode = tasks.play_episode(env, lambda transcript: "ANSWER 7", 0)
    items = policies.teacher_items(episode, 3)
    assert len(items) == 1 and items[0]["text"].endswith(f"act CALL calc {env.expression}\n")
    start, end = items[0]["spans"][0]
    assert items[0]["text"][start:end] == f"CALL calc {env.expression}\n"


class ListedArith(tasks.Arith):
    """Arith as a task that lists its commands, as textworld does: the right call, a wrong one, an answer."""
    def admissible_actions(self):
        return [f"CALL calc {self.expression}", "CALL calc 1+1", f"ANSWER {self.answer}"]


def test_episodes_and_teacher_labels_keep_the_commands_listed_in_each_state():
    env = ListedArith()
    episode = tasks.play_episode(env, lambda transcript: "CALL calc 1+1", 0)
    assert len(episode["choices"]) == len(episode["actions"]) and episode["choices"][0][0] == episode["teacher_actions"][0]
    item = policies.teacher_items(episode, 0)[0]
    assert item["choices"] == [episode["choices"][0]] and policies.episode_item(episode, 0)["choices"] == episode["choices"]
    assert "choices" not in tasks.play_episode(tasks.make_env("arith"), lambda transcript: "ANSWER 1", 0)


def test_choice_loss_lifts_the_label_to_the_top_of_the_listed_commands():
    env = ListedArith()
    transcript = tasks.play_episode(env, tasks.teacher_act(env), 0)["transcript"]
    context = transcript[:transcript.index("act ")]
    policy = tiny_policy()
    listed = ["CALL calc 1+1", f"CALL calc {env.expression}", "ANSWER 7", "look"]
    with torch.no_grad():
        scores = policy.command_scores(context, listed)
    label = listed[int(scores.argmin())]  # the policy ranks it last
    start = len(context) + len(tasks.ACTION_PREFIX)
    item = {"text": f"{context}act {label}\n", "spans": [[start, start + len(label) + 1]], "choices": [listed]}
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=3e-3)
    losses = [policies.choice_update(policy, optimizer, [item], [1.0]) for _ in range(15)]
    assert losses[-1] < losses[0] and policy.choose(context, listed) == label


def test_choice_loss_refuses_replay_items_without_their_listed_commands():
    item = {"text": "task t\nobs o\nact look\n", "spans": [[14, 19]]}  # kept by a run before choice_loss
    policy = tiny_policy()
    with pytest.raises(SystemExit, match="1 replay items have none"):
        policies.choice_update(policy, torch.optim.AdamW(policy.model.parameters()), [item], [1.0])
    # a run resumed with choice_loss is refused when its replay is read back, before any episode is played
    optimizer = torch.optim.AdamW(policy.model.parameters())
    state = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "rng": random.Random(0).getstate(),
             "replay": [item], "step": 0, "baselines": {}}
    learning = tiny_learning(choice_loss=True)
    with pytest.raises(SystemExit, match="1 replay items have none"):
        policies.resume_progress(state, optimizer, learning, "policy.pt")
    resumed = policies.resume_progress(state, optimizer, dataclasses.replace(learning, choice_loss=False), "policy.pt")
    assert resumed.replay.items == [item]


def test_replay_keeps_recent_items_and_mixes_them_with_old_ones():
    rng = random.Random(0)
    replay = policies.ReplayBuffer(size=50, recent_window=10, recent_fraction=0.5)
    for i in range(200):
        replay.add({"episode": i}, rng)
    assert len(replay.items) == 50 and [it["episode"] for it in replay.items[-10:]] == list(range(190, 200))
    batch = [it["episode"] for it in replay.sample(20, rng)]
    assert sum(e >= 190 for e in batch) >= 10 and any(e < 190 for e in batch)
