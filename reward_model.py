"""
Reinforcement learning through backpropagation (issue 33, item 2; research note 002): "a second model
learns the reward that output receives ... then the original model's loss is calculated by setting the
final loss to 0 and backpropagating through the reward model."

    python world.py config/world_arith.py --mode=reward_model --episodes=320    # world.py's learner

Two models learn from the policy's own episodes. The reward model, a small GPT with a scalar head, reads
a transcript up to the end of an action and predicts the return that action got (the rewards from that
step to the end of its episode: a Monte-Carlo Q(s, a)); it is fitted by squared error on every action of
every episode played so far. The policy then writes an action for replayed states as a sequence of
straight-through Gumbel-softmax tokens (Jang et al. 2017): hard one-hot tokens forward, so the reward
model reads the text it was trained on, and the softmax's gradient backward. Its loss is minus the
reward model's score: no reward enters it except through the reward model, unlike REINFORCE's score
function (reward x grad log p) or expert iteration's imitation of successes (policy.py).

The option `anchor` adds REINFORCE's other half to each policy step: anchor x the imitation loss on
successes replayed from world.py's replay buffer (policy.action_loss). Without it, one measured run on arith
went from 94% to 0% held-out: the straight-through gradient moved the policy to malformed text and nothing
in its loss pulled it back to what had worked (EXPERIMENTS.md, RL through a learned reward model).

With act=choose (TextWorld: the policy picks one of the commands the game lists) there are no tokens to
relax; the choice itself is relaxed instead. The reward model scores every listed command after the state
(its text, as it was trained on), and the policy's loss is minus those scores weighted by a straight-through
Gumbel-softmax over the policy's command scores (Policy.command_scores): the chosen command's score forward,
the soft choice's gradient backward. The anchor is then choice_loss's cross-entropy (policy.choice_backward),
so world.py asks for choice_loss=True, as the other learners train the same ranking.

Not covered: teacher help (its labels are for imitation; this learner sees rewards only). world.py refuses it.
"""
import dataclasses
import difflib
import math
import os
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import atomic_write
from configurator import ConfigError
from model import GPT, GPTConfig, norm
from policy import action_loss, choice_backward
from tasks import ACTION_PREFIX, MAX_ACTION_CHARS


@dataclasses.dataclass
class RewardLearning:
    """world.py's `reward_model` option: the reward model's shape and how both models learn."""
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    learning_rate: float = 1e-3      # the reward model's AdamW
    fit_steps: int = 8               # reward-model steps after each batch of episodes
    fit_batch_size: int = 32         # transitions per reward-model step
    policy_batch_size: int = 16      # replayed states per policy step (world.py's updates_per_batch steps)
    gumbel_temperature: float = 1.0  # of the soft tokens whose gradient the policy gets
    warmup_episodes: int = 64        # the policy learns only once the reward model has seen this many episodes
    buffer_size: int = 20000         # transitions kept (a random old one is forgotten past this)
    anchor: float = 0.0              # weight of the imitation loss on replayed successes (world.py's replay buffer,
                                     # update_batch_size of them) added to each policy step; 0: no anchor


MAY_BE_ZERO = ("warmup_episodes", "anchor")  # 0: no warm-up, no anchor


def learning_options(options):
    """A RewardLearning from world.py's `reward_model` dict; an unknown key or a bad value is a ConfigError."""
    if not isinstance(options, dict):
        raise ConfigError(f"reward_model is a dict of options, e.g. {{'n_layer': 2, 'fit_steps': 8}}; got {options!r}")
    names = [f.name for f in dataclasses.fields(RewardLearning)]
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, names, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; options are {', '.join(names)}"
            raise ConfigError(f"reward_model has no option {key!r}{hint}")
    learning = RewardLearning(**options)
    for f in dataclasses.fields(learning):
        value = getattr(learning, f.name)
        zero_ok = f.name in MAY_BE_ZERO
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0 or \
                (value == 0 and not zero_ok):
            raise ConfigError(f"reward_model's {f.name} must be {'a number >= 0' if zero_ok else 'a positive number'}, "
                              f"got {value!r}")
    if learning.n_embd % learning.n_head:
        raise ConfigError(f"reward_model's n_embd={learning.n_embd} is not divisible by n_head={learning.n_head}")
    return learning


# ----------------------------------------------------------------------------- the reward model

class RewardModel(nn.Module):
    """A small GPT over token distributions with a scalar head at each row's last token: the predicted return.

    Its input is (B, T, V) rows of distributions over the policy's vocabulary, one-hot for text, so that
    a relaxed action (a soft token) passes gradient back to whoever wrote it."""

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.body = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                                  n_embd=n_embd))
        self.head = nn.Linear(n_embd, 1)

    def forward(self, tokens, lengths):
        """tokens (B, T, V), each row's real length (B,) (the rest padding): the predicted returns (B,)."""
        V = tokens.size(-1)
        x = tokens @ self.body.wte.weight[:V]  # (B, T, C): an embedding lookup when the rows are one-hot
        positions = torch.arange(tokens.size(1), device=tokens.device)
        h = norm(self.body.run_blocks(x, positions))  # (B, T, C), causal: padding after a row's end is unseen
        last = h[torch.arange(h.size(0), device=h.device), lengths - 1]  # (B, C)
        return self.head(last).squeeze(-1)


def one_hot_rows(rows, vocab_size, device):
    """Token id lists -> right-padded one-hot (B, T, V) and their lengths (B,)."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], dtype=torch.long, device=device)
    return F.one_hot(ids, vocab_size).float(), torch.tensor([len(r) for r in rows], device=device)


def transitions(episode):
    """Every action of an episode as {"text": the transcript to the end of the action line, "return": the
    rewards from that step to the episode's end}; the rewards are read from each step's `reward` line."""
    text, out = episode["transcript"], []
    spans = episode["action_spans"]
    step_rewards = []
    for i, (start, end) in enumerate(spans):
        after = text[end:spans[i + 1][0] if i + 1 < len(spans) else len(text)]
        step_rewards.append(sum(float(line[len("reward "):]) for line in after.split("\n")
                                if line.startswith("reward ")))
    for i, (start, end) in enumerate(spans):
        item = {"text": text[:end], "return": sum(step_rewards[i:]), "task": episode["task"]}
        out.append(item | ({"choices": episode["choices"][i]} if "choices" in episode else {}))
    return out


def fit_reward_model(reward_model, optimizer, items, tokenizer, block_size):
    """One squared-error step of the reward model on items ({"text", "return"}); returns the loss."""
    reward_model.train()
    rows = [tokenizer.encode(item["text"])[-block_size:] for item in items]
    tokens, lengths = one_hot_rows(rows, reward_model.body.config.vocab_size, next(reward_model.parameters()).device)
    target = torch.tensor([item["return"] for item in items], device=tokens.device)
    loss = F.mse_loss(reward_model(tokens, lengths), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


# ----------------------------------------------------------------------------- the policy's relaxed actions

@torch.no_grad()
def sample_action(model, prompt, newline_ids, eot, temperature, generator):
    """Gumbel-max sampling of one action line after prompt (token ids): the action's ids and the noise
    (n, V) added to each step's logits, so the gradient pass relaxes the very sample that was drawn."""
    ids, noise = [], []
    block = model.config.block_size
    for _ in range(MAX_ACTION_CHARS + 1):
        logits = model.next_logits(torch.tensor([(prompt + ids)[-block:]], device=model.lm_head.weight.device))[0]
        g = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator).clamp_min(1e-20)))
        token = int((logits / temperature + g.to(logits.device)).argmax())
        ids.append(token)
        noise.append(g)
        if token in newline_ids or token == eot:  # the line (and so the action) ends here
            break
    return ids, torch.stack(noise)


def relaxed_action(model, prompt, ids, noise, temperature):
    """The action's tokens as straight-through Gumbel-softmax rows (n, V): one-hot values, softmax gradients.

    One teacher-forced forward over prompt + action: each step's logits get the gradient of its own soft
    token; the hard tokens fed back as the next inputs carry none (one forward instead of one per token)."""
    block = model.config.block_size
    x = torch.tensor([(prompt + ids[:-1])[-block:]], device=model.lm_head.weight.device)
    logits, _ = model(x)  # (1, t, V)
    logits = logits[0, -len(ids):].float()  # (n, V): the logits that chose each action token
    soft = torch.softmax((logits / temperature + noise.to(logits.device)), -1)
    hard = F.one_hot(torch.tensor(ids, device=logits.device), soft.size(-1)).float()
    return hard + soft - soft.detach()


def policy_loss(policy, reward_model, states, temperature, generator):
    """Minus the reward model's mean score of the actions the policy writes (relaxed) in the given states
    (transcripts that end before an action). The only path from reward to policy is through reward_model."""
    tokenizer, model = policy.tokenizer, policy.model
    V = reward_model.body.config.vocab_size
    block = reward_model.body.config.block_size
    newline_ids = {t for t in range(tokenizer.n_vocab) if "\n" in tokenizer.decode([t])}
    rows, lengths = [], []
    was_training = model.training
    model.eval()  # as the actor plays (no dropout), so the forward's logits are those that drew the sample
    for state in states:
        prompt = tokenizer.encode(state + ACTION_PREFIX)
        ids, noise = sample_action(model, prompt, newline_ids, tokenizer.eot, temperature, generator)
        action = relaxed_action(model, prompt, ids, noise, temperature)  # (n, V') with V' = policy's vocabulary
        context = F.one_hot(torch.tensor(prompt, device=action.device), action.size(-1)).float()
        row = torch.cat([context, action])[-block:, :V]  # (t, V)
        rows.append(row)
        lengths.append(row.size(0))
    model.train(was_training)
    T = max(lengths)
    tokens = torch.stack([F.pad(r, (0, 0, 0, T - r.size(0))) for r in rows])  # (B, T, V)
    reward_model.eval()
    return -reward_model(tokens, torch.tensor(lengths, device=tokens.device)).mean()


def choice_policy_backward(policy, reward_model, states, temperature, generator):
    """act=choose's policy_loss, its gradient accumulated one state at a time (no step); returns the loss.
    states: [(transcript that ends before an action, the commands listed there)]. Per state: minus the reward
    model's scores of the listed commands (no gradient into it) weighted by a straight-through Gumbel-softmax
    over the policy's command scores. The only path from reward to policy is through reward_model's scores."""
    block = reward_model.body.config.block_size
    V, device = reward_model.body.config.vocab_size, next(reward_model.parameters()).device
    reward_model.eval()
    total = 0.0
    for state, commands in states:
        with torch.no_grad():
            rows = [policy.tokenizer.encode(f"{state}{ACTION_PREFIX}{c}\n")[-block:] for c in commands]
            q = reward_model(*one_hot_rows(rows, V, device))  # (n,): each listed command's predicted return
        scores = policy.command_scores(state, commands)  # (n,), with gradient
        g = -torch.log(-torch.log(torch.rand(scores.shape, generator=generator).clamp_min(1e-20)))
        soft = torch.softmax(scores.float() / temperature + g.to(scores.device), 0)
        hard = F.one_hot(soft.argmax(), soft.size(0)).float()
        choice = hard + soft - soft.detach()  # (n,): one-hot forward, the softmax's gradient backward
        loss = -(choice * q.to(choice.device)).sum() / len(states)
        loss.backward()
        total += loss.item()
    return total


def replayed_states(items, n, rng):
    """n transcripts that end before an action, each cut from a random stored transition."""
    picked = [rng.choice(items)["text"] for _ in range(n)]
    return [text[:text.rfind("\n" + ACTION_PREFIX) + 1] for text in picked]


def replayed_choices(items, n, rng):
    """n (transcript that ends before an action, the commands listed there), from random stored transitions."""
    picked = [rng.choice(items) for _ in range(n)]
    return [(item["text"][:item["text"].rfind("\n" + ACTION_PREFIX) + 1], item["choices"]) for item in picked]


# ----------------------------------------------------------------------------- the learner world.py calls

class RewardLearner:
    """The reward model, its optimizer, the transitions it learns from and its random state: what
    mode=reward_model adds to a world.py run (kept in reward_model.pt beside policy.pt)."""

    def __init__(self, policy, learning, seed, choose=False):
        self.learning, self.choose = learning, choose  # choose: act=choose, the relaxed choice of a listed command
        config = policy.model.config
        with torch.random.fork_rng(devices=[]):  # the reward model's first weights, the loop's RNG untouched
            torch.manual_seed(seed)
            self.model = RewardModel(config.vocab_size, config.block_size, learning.n_layer, learning.n_head,
                                     learning.n_embd).to(policy.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning.learning_rate, betas=(0.9, 0.99),
                                           weight_decay=0.0)
        self.items, self.episodes = [], 0
        self.rng, self.generator = random.Random(seed), torch.Generator().manual_seed(seed)

    def learn(self, policy, optimizer, episodes, replay, updates, replay_batch_size, grad_clip):
        """After a batch of episodes: store their transitions, fit the reward model, then `updates` policy steps
        through it, each anchored (if learning.anchor) by imitation of replay_batch_size successes drawn from
        replay (policy.ReplayBuffer; with act=choose, choice_loss's cross-entropy on them). Returns {"loss": the
        policy's last loss (NaN during warm-up), "reward_model_loss": ...} and, with an anchor, "anchor_loss": the
        last step's imitation loss, unweighted (NaN before the first success)."""
        learning = self.learning
        for episode in episodes:
            for item in transitions(episode):
                self.items.append(item)
                if len(self.items) > learning.buffer_size:
                    del self.items[self.rng.randrange(len(self.items) // 2)]  # forget an old one
        self.episodes += len(episodes)
        block = self.model.body.config.block_size
        fit = [fit_reward_model(self.model, self.optimizer, [self.rng.choice(self.items)
                                                             for _ in range(learning.fit_batch_size)],
                                policy.tokenizer, block) for _ in range(learning.fit_steps)]
        loss = anchor = float("nan")
        if self.episodes >= learning.warmup_episodes:
            for _ in range(updates):
                policy.model.train()
                optimizer.zero_grad(set_to_none=True)
                if self.choose:
                    states = replayed_choices(self.items, learning.policy_batch_size, self.rng)
                    step_loss = choice_policy_backward(policy, self.model, states, learning.gumbel_temperature,
                                                       self.generator)
                else:
                    states = replayed_states(self.items, learning.policy_batch_size, self.rng)
                    step_loss = policy_loss(policy, self.model, states, learning.gumbel_temperature, self.generator)
                successes = replay.sample(replay_batch_size, self.rng) if learning.anchor else []
                if successes and self.choose:  # choice_loss's cross-entropy, as the other learners train
                    weighted = choice_backward(policy, successes, [learning.anchor] * len(successes))
                    step_loss, anchor = step_loss + weighted, weighted / learning.anchor
                elif successes:  # the reward model's gradient alone collapsed the policy (module docstring)
                    imitation = action_loss(policy, successes, [1.0] * len(successes))
                    step_loss = step_loss + learning.anchor * imitation
                    anchor = imitation.item()
                if not self.choose:  # act=choose's terms did their backward one state at a time
                    step_loss.backward()
                    step_loss = step_loss.item()
                self.model.zero_grad(set_to_none=True)  # the reward model learns from returns only, never from here
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(policy.model.parameters(), grad_clip)
                optimizer.step()
                loss = step_loss
        losses = {"loss": loss, "reward_model_loss": sum(fit) / len(fit)}
        return losses | ({"anchor_loss": anchor} if learning.anchor else {})

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "items": self.items,
                "episodes": self.episodes, "rng": self.rng.getstate(), "generator": self.generator.get_state(),
                "learning": dataclasses.asdict(self.learning)}

    def load_state_dict(self, state, path):
        # an option added since the file was saved reads as its default, which is the behaviour of the code then
        saved = dataclasses.asdict(RewardLearning()) | state.get("learning", {})
        if saved != dataclasses.asdict(self.learning):
            raise SystemExit(f"{path} was made with reward_model={saved}, not "
                             f"{dataclasses.asdict(self.learning)}: resume with the same reward_model options, or "
                             f"start a fresh run")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.items, self.episodes = state["items"], state["episodes"]
        self.rng.setstate(state["rng"])
        self.generator.set_state(state["generator"])


def start_learner(policy, options, seed, path, resuming, choose=False):
    """world.py's learner for mode=reward_model (choose: act=choose): a fresh one, or on resume the one saved at
    path."""
    learner = RewardLearner(policy, learning_options(options), seed, choose)
    if resuming:
        if not os.path.exists(path):
            raise SystemExit(f"cannot resume mode=reward_model: {path} does not exist (the run was saved by another "
                             f"mode); start a fresh run from its policy with --init_from=<its policy.pt>")
        learner.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
    return learner


def save_learner(path, learner):
    """reward_model.pt, written whole or not at all (checkpoint.atomic_write)."""
    atomic_write(path, lambda f: torch.save(learner.state_dict(), f))


def check_mode(cfg):
    """world.py's impossible combinations with mode=reward_model, and reward_model options without it."""
    if cfg["mode"] != "reward_model":
        if cfg["reward_model"]:
            raise ConfigError(f"reward_model options are for mode=reward_model; this run's mode is {cfg['mode']}: "
                              f"set --mode=reward_model, or drop reward_model")
        return
    learning_options(cfg["reward_model"])
    if cfg["act"] == "choose" and not cfg["choice_loss"]:
        raise ConfigError("mode=reward_model with act=choose relaxes the choice among listed commands and anchors it "
                          "with choice_loss's cross-entropy: set choice_loss=True (or act=generate)")
    if cfg["teacher_help"]:
        raise ConfigError("mode=reward_model learns from rewards only, and teacher help's labels would go unused: "
                          "set teacher_help=False (or use mode=expert_iteration for teacher help)")
