"""problems.py: the thinking experiments' tasks give the answers their rules say, at the lengths they promise."""
import random

import pytest
import torch

import problems


def resolve(tokens, n_vars, separators=False):
    """The value of the asked variable, by following the statements (the reference solver)."""
    vocab = problems.chains_vocab(n_vars, separators)
    query, width = tokens.index(vocab["query"]), 3 if separators else 2
    table = dict(zip(tokens[:query:width], tokens[1:query:width]))
    v, hops = tokens[query + 1], 0
    while v >= 10:
        v, hops = table[v], hops + 1
    return v, hops


def test_chain_problems_ask_the_hops_they_say_at_one_fixed_length():
    rng = random.Random(0)
    for hops in (1, 3, 8, 12):
        x, y = problems.chains_batch(20, hops, 12, 20, rng)
        assert x.shape == (20, 2 * 12 + 4)  # the same length however many hops
        for row, target in zip(x.tolist(), y.tolist()):
            value, seen = resolve(row[:-1], 20)
            assert (value, seen) == (row[-1], hops) and target[-2] == value
            assert all(t == -1 for i, t in enumerate(target) if i != len(row) - 2)


def test_separators_end_every_statement_and_keep_the_answer():
    rng = random.Random(1)
    vocab = problems.chains_vocab(20, separators=True)
    x, y = problems.chains_batch(20, 5, 12, 20, rng, separators=True)
    assert x.shape == (20, 3 * 12 + 4) and vocab["size"] == problems.chains_vocab(20)["size"] + 1
    for row, target in zip(x.tolist(), y.tolist()):
        assert row[2:36:3] == [vocab["sep"]] * 12 and vocab["sep"] not in row[36:]
        assert resolve(row[:-1], 20, separators=True) == (row[-1], 5) and target[-2] == row[-1]


def statement_values(row, n_statements):
    """Each statement's variable's value, resolved by hand (statements `name rhs ;`)."""
    table = dict(zip(row[:3 * n_statements:3], row[1:3 * n_statements:3]))
    values = []
    for i in range(n_statements):
        value = row[3 * i]
        while value >= 10:
            value = table[value]
        values.append(value)
    return values


def test_every_statement_scores_each_variable_at_its_statement_end_and_the_answer_at_end():
    rng = random.Random(2)
    x, y = problems.chains_batch(10, 4, 12, 20, rng, separators=True, every_statement=True)
    for row, target in zip(x.tolist(), y.tolist()):
        for i, value in enumerate(statement_values(row, 12)):
            assert target[3 * i:3 * i + 3] == [-1, -1, value]  # scored on `;`, the statement's last token
        assert target[36:] == [-1, -1, row[-1], -1]  # `?`, the asked name, END says the answer


def test_rhs_targets_score_each_value_on_its_right_hand_side_and_the_answer_on_the_asked_name():
    rng = random.Random(3)
    x, y = problems.chains_batch(10, 4, 12, 20, rng, separators=True, every_statement=True, rhs_targets=True)
    for row, target in zip(x.tolist(), y.tolist()):
        for i, value in enumerate(statement_values(row, 12)):
            assert target[3 * i:3 * i + 3] == [-1, value, -1]  # on the right-hand side: one induction step a hop
        assert target[36:] == [-1, row[-1], -1, -1]  # the asked name says the answer
    x, y = problems.chains_batch(10, 4, 12, 20, rng, separators=True, rhs_targets=True)  # the query alone
    assert (y[:, -3] == x[:, -1]).all() and ((y != -1).sum(1) == 1).all()


def test_running_parity_is_the_xor_of_the_bits_so_far_after_a_bos():
    x, y = problems.parity_batch(8, 10, torch.Generator().manual_seed(0))
    for row, parity in zip(x.tolist(), y.tolist()):
        bits = row[1:]
        assert row[0] == problems.PARITY_BOS and parity[0] == -1
        assert parity[1:] == [sum(bits[:i + 1]) % 2 for i in range(10)]


def test_reversed_addition_writes_the_sum_least_significant_digit_first():
    x, y = problems.addition_batch(16, 5, torch.Generator().manual_seed(0))
    for row, target in zip(x.tolist(), y.tolist()):
        a = int("".join(map(str, row[:5]))[::-1])
        b = int("".join(map(str, row[6:11]))[::-1])
        assert row[5] == 10 and row[11] == 11  # '+' and END
        assert int("".join(map(str, row[12:]))[::-1]) == a + b
        assert [t for t in target if t != -1] == row[12:]  # the answer digits, each predicted a position early


def test_exact_match_needs_every_scored_position():
    y = torch.tensor([[-1, 1, 0], [-1, 1, 1]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 1, 0], [0, 1, 0]]), 2).float()
    assert problems.exact_match(logits, y).tolist() == [True, False]


def load_thinking():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "thinking.py")
    spec = importlib.util.spec_from_file_location("thinking", path)
    thinking = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(thinking)
    return thinking


def test_thinking_trains_chains_on_a_mix_of_sizes_and_tests_at_the_full_size():
    thinking = load_thinking()
    cfg = thinking.DEFAULTS | dict(task="chains", n_statements=8, n_vars=12, separators=True, train_hops=[1, 6],
                                   train_statements=[2, 8], batch_size=4, device_obj=torch.device("cpu"))
    vocab_size, block, end, _, train_batch, test_batch = thinking.task_spec(cfg)
    assert block == 3 * 8 + 4
    rng = random.Random(0)
    lengths = {train_batch(rng, None)[0].size(1) for _ in range(20)}
    assert lengths == {3 * 2 + 4, 3 * 8 + 4}  # two sizes in training (a 2-statement problem holds <= 2 hops)
    assert test_batch(6, 4, rng, None)[0].size(1) == block
    with pytest.raises(SystemExit, match="train_statements"):
        thinking.task_spec(cfg | dict(train_statements=[9]))


def test_the_curriculum_climbs_the_sizes_one_at_a_time_and_keeps_the_earlier_ones():
    thinking = load_thinking()
    cfg = thinking.DEFAULTS | dict(task="chains", n_statements=8, n_vars=12, separators=True, train_hops=[1, 6],
                                   every_statement=True, train_statements=[8, 2, 4], batch_size=4,
                                   device_obj=torch.device("cpu"))
    spec = thinking.task_spec(cfg)
    model = thinking.build_model(thinking.model_options(cfg, "params", spec[0], spec[1], spec[2])).eval()
    never = thinking.Curriculum(cfg["train_statements"], 1.01, spec[4], seed=0)  # an unreachable bar: it stays put
    never.check(model, 10)
    assert never.stage == 0 and never.allowed(random.Random(0)) == [2]
    ladder = thinking.Curriculum(cfg["train_statements"], 0.0, spec[4], seed=0)  # any score passes: a size per check
    ladder.check(model, 10)
    ladder.check(model, 20)
    ladder.check(model, 30)  # already at the top
    assert ladder.stage == 2 and ladder.climbed == {"2": 0, "4": 10, "8": 20}
    rng = random.Random(0)
    draws = [tuple(ladder.allowed(rng)) for _ in range(200)]
    assert set(draws) == {(8,), (2, 4)} and 60 < draws.count((8,)) < 140  # the top half the time
    for bad in (dict(curriculum=1.5), dict(curriculum=0.9, train_statements=[8]), dict(task="parity", curriculum=0.9),
                dict(task="parity", rhs_targets=True)):
        with pytest.raises(SystemExit, match="curriculum"):
            thinking.task_spec(cfg | bad)
    x, y = spec[4](rng, None, [4])
    assert x.size(1) == 3 * 4 + 4
    assert 0.0 <= thinking.scored_token_accuracy(model, x, y) <= 1.0
