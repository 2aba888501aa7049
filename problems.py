"""
Problems with a difficulty knob and exact-match scoring, for thinking by iterating (issue 28): does a looped
model that runs more loops at test time solve harder problems than it was trained on?

    parity   running parity of a bit string: the target at every position is the XOR of the bits up to it.
             Difficulty: the string's length (a local operator needs one more step per position).
    chains   variable chains at a fixed length: statements `a b` (a takes b's value) and `c 7` (c is 7),
             shuffled, then `? a` and the value of a; with separators each statement ends with `;`.
             Difficulty: the hops from the asked variable to its number. Every problem of a task has the same
             length however many hops it asks, so "harder" never means "longer"; the other statements are
             distractor chains.
    addition reversed multi-digit addition, `a + b =` then the sum, digits least significant first.
             Difficulty: the digits of the operands (the carry travels one digit per step).

Each `*_batch` returns (x, y) long tensors (B, T): y is -1 where nothing is scored, so GPT.forward's loss
counts the answer tokens only. `exact_match(logits, y)` scores a row right only if every scored token is.
The problem's end token (END) is the prefix-LM delimiter: looped.py's `prefix_token` reads every position up
to it bidirectionally.
"""
import torch

# ----------------------------------------------------------------------------- running parity

PARITY_VOCAB = 3  # bits 0 and 1 (the targets are tokens too), and BOS
PARITY_BOS = 2


def parity_batch(batch_size, length, generator, device="cpu"):
    """BOS then bits: x (B, 1 + length), and the running parity y (B, 1 + length) of the bits (nothing is
    scored at BOS). Why BOS: attention averages the values it reads, so without a distinct token before the
    first bit, a string that opens with 1 1 gives both positions the same inputs, the same states, and the
    same answer, where parity wants 1 then 0 (a looped model trained without it failed exactly those strings)."""
    bits = torch.randint(0, 2, (batch_size, length), generator=generator)
    x = torch.cat((torch.full((batch_size, 1), PARITY_BOS), bits), 1)
    y = torch.cat((torch.full((batch_size, 1), -1), bits.cumsum(1) % 2), 1)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- variable chains

def chains_vocab(n_vars, separators=False):
    """Token ids: digits 0-9, then the variables, then '?' (the query) and END, then ';' with separators."""
    vocab = {"digits": 10, "vars": n_vars, "query": 10 + n_vars, "end": 11 + n_vars, "size": 12 + n_vars}
    return vocab | {"sep": 12 + n_vars, "size": 13 + n_vars} if separators else vocab


def chains_problem(hops, n_statements, n_vars, rng, max_distractor=6, separators=False, rhs_targets=False):
    """One problem as (tokens, answer, values): n_statements statements (two tokens each, three with separators)
    in random order, the query `? v` and END; values[i] is the value of the variable that the statement ending
    at token i defines (-1 at other tokens); with rhs_targets, at the statement's right-hand side token instead.
    v's chain has `hops` statements (hops - 1 pointers, then its number); the rest are distractor chains of
    1..max_distractor statements. hops <= n_statements <= n_vars.
    Why separators: read both ways, `a b c d` does not say whether `b c` is a statement; rotary attention sees
    relative positions only, so without a mark a position cannot tell a statement's name from its value, and a
    lookup of b matches every b. `a b ; c d ;` puts the role one position away, where attention sees it."""
    vocab = chains_vocab(n_vars, separators)
    names = [10 + i for i in rng.sample(range(n_vars), n_statements)]  # every statement defines its own variable
    lengths, left = [hops], n_statements - hops
    while left:
        lengths.append(min(left, rng.randint(1, max_distractor)))
        left -= lengths[-1]
    statements, start, answer, value_of = [], 0, None, {}
    for length in lengths:
        chain = names[start:start + length]  # chain[0] is asked about (for the first chain); chain[-1] holds a number
        start += length
        value = rng.randrange(10)
        answer = value if answer is None else answer
        statements += [(a, b) for a, b in zip(chain, chain[1:])] + [(chain[-1], value)]
        value_of.update((name, value) for name in chain)
    rng.shuffle(statements)
    tokens, values = [], []
    for name, rhs in statements:
        said = [name, rhs] + ([vocab["sep"]] if separators else [])
        tokens += said
        at = 1 if rhs_targets else len(said) - 1
        values += [value_of[name] if i == at else -1 for i in range(len(said))]
    tokens += [vocab["query"], names[0], vocab["end"]]
    return tokens, answer, values + [-1] * 3


def chains_batch(batch_size, hops, n_statements, n_vars, rng, device="cpu", separators=False, every_statement=False,
                 rhs_targets=False):
    """x (B, 2 n + 4; 3 n + 4 with separators): the problem, END, then the answer; y scores the answer
    (predicted at END, or at the asked name with rhs_targets) and, with every_statement, each statement's
    variable's value at the statement's last token (its right-hand side with rhs_targets). hops: an int, or a
    (low, high) range drawn per problem.
    Why every_statement: the query alone gives one scored token per problem, and the models sat on the guess
    plateau for thousands of steps; scoring every variable is the running-parity shape (a target at every
    position, some one step away, some many), the dense signal the looped models of Bansal et al. learn from.
    The problem positions never see the answer token (it follows END, which the prefix-LM reads causally).
    Why rhs_targets (each value scored at its statement's right-hand side, the answer at the asked name, not at
    END): a hop is then one induction step (Olsson et al. 2022): the current token is the name to look up, and the
    key is "my previous token is that name". Scored on `;` (or END), the name to look up is the previous token,
    and the scored position matches its own key: an earlier probe (EXPERIMENTS.md, "Why did no model learn the
    chains?") found only this induction layout learned the lookup."""
    rows, targets = [], []
    for _ in range(batch_size):
        h = hops if isinstance(hops, int) else rng.randint(*hops)
        tokens, answer, values = chains_problem(h, n_statements, n_vars, rng, separators=separators,
                                                rhs_targets=rhs_targets)
        rows.append(tokens + [answer])
        targets.append(values + [-1] if every_statement else [-1] * (len(tokens) + 1))
    x = torch.tensor(rows)
    y = torch.tensor(targets)
    y[:, -3 if rhs_targets else -2] = x[:, -1]  # at END (or the asked name) the model says the value
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- reversed addition

def addition_vocab():
    """Digits 0-9, '+', '=' (END) and a pad that ends the answer."""
    return {"plus": 10, "end": 11, "pad": 12, "size": 13}


def addition_batch(batch_size, digits, generator, device="cpu"):
    """`a + b =` then a + b, every number written least significant digit first, a and b of `digits`
    digits; the answer has digits + 1 digits. y scores the answer digits."""
    vocab = addition_vocab()
    a = torch.randint(0, 10, (batch_size, digits), generator=generator)
    b = torch.randint(0, 10, (batch_size, digits), generator=generator)
    total, carry = [], torch.zeros(batch_size, dtype=torch.long)
    for i in range(digits):  # schoolbook addition, a column at a time
        s = a[:, i] + b[:, i] + carry
        total.append(s % 10)
        carry = s // 10
    total.append(carry)
    total = torch.stack(total, 1)  # (B, digits + 1)
    column = torch.full((batch_size, 1), 0)
    x = torch.cat((a, column + vocab["plus"], b, column + vocab["end"], total), 1)
    y = torch.full_like(x, -1)
    y[:, 2 * digits + 1:-1] = x[:, 2 * digits + 2:]  # from END on, each position predicts the next answer digit
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- scoring

def exact_match(logits, y):
    """(B,) bool: every scored position's argmax equals its target."""
    scored = y != -1
    right = (logits.argmax(-1) == y) | ~scored
    return right.all(dim=1)
