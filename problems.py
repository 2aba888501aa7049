"""
Problems with a difficulty knob and exact-match scoring, for thinking by iterating (issue 28): does a looped
model that runs more loops at test time solve harder problems than it was trained on?

    parity   running parity of a bit string: the target at every position is the XOR of the bits up to it.
             Difficulty: the string's length (a local operator needs one more step per position).
    chains   variable chains at a fixed length: statements `a b` (a takes b's value) and `c 7` (c is 7),
             shuffled, then `? a` and the value of a. Difficulty: the hops from the asked variable to its
             number. Every problem of a task has the same length however many hops it asks, so "harder" never
             means "longer"; the other statements are distractor chains.
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

def chains_vocab(n_vars):
    """Token ids: digits 0-9, then the variables, then '?' (the query) and END."""
    return {"digits": 10, "vars": n_vars, "query": 10 + n_vars, "end": 11 + n_vars, "size": 12 + n_vars}


def chains_problem(hops, n_statements, n_vars, rng, max_distractor=6):
    """One problem as (tokens, answer): n_statements statements (two tokens each) in random order, the
    query `? v` and END. v's chain has `hops` statements (hops - 1 pointers, then its number); the rest are
    distractor chains of 1..max_distractor statements. hops <= n_statements <= n_vars."""
    vocab = chains_vocab(n_vars)
    names = [10 + i for i in rng.sample(range(n_vars), n_statements)]  # every statement defines its own variable
    lengths, left = [hops], n_statements - hops
    while left:
        lengths.append(min(left, rng.randint(1, max_distractor)))
        left -= lengths[-1]
    statements, start, answer = [], 0, None
    for length in lengths:
        chain = names[start:start + length]  # chain[0] is asked about (for the first chain); chain[-1] holds a number
        start += length
        value = rng.randrange(10)
        answer = value if answer is None else answer
        statements += [(a, b) for a, b in zip(chain, chain[1:])] + [(chain[-1], value)]
    rng.shuffle(statements)
    tokens = [t for pair in statements for t in pair] + [vocab["query"], names[0], vocab["end"]]
    return tokens, answer


def chains_batch(batch_size, hops, n_statements, n_vars, rng, device="cpu"):
    """x (B, 2 n + 4): the problem, END, then the answer; y scores only the answer (predicted at END).
    hops: an int, or a (low, high) range drawn per problem."""
    rows, answers = [], []
    for _ in range(batch_size):
        h = hops if isinstance(hops, int) else rng.randint(*hops)
        tokens, answer = chains_problem(h, n_statements, n_vars, rng)
        rows.append(tokens + [answer])
        answers.append(answer)
    x = torch.tensor(rows)
    y = torch.full_like(x, -1)
    y[:, -2] = x[:, -1]  # at END the model says the value
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
