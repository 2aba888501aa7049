import json
import math
import os

import pytest
import torch

import train
from conftest import tiny_train_config
from instruments import EvalInstruments, position_losses, unigram
from model import GPT, GPTConfig


def tiny_model_and_batch(vocab=11, T=12, B=5):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=T, n_layer=1, n_head=2, n_embd=16)).eval()
    x = torch.randint(vocab, (B, T))
    y = torch.randint(vocab, (B, T))
    return model, x, y


def test_loss_by_position_averages_to_the_mean_loss():
    model, x, y = tiny_model_and_batch()
    inst = EvalInstruments(block_size=12, buckets=12, position_loss=True, token_watch=False)
    with torch.no_grad():
        mean_loss = model(x, y)[1].item()
        for i in range(0, 5, 2):  # batches of unequal size
            logits, token_losses = model(x[i:i + 2], y[i:i + 2], reduction="none")
            inst.update(logits, y[i:i + 2], token_losses)
    row = inst.summary()
    assert len(row["position_loss"]) == 12
    assert sum(row["position_loss"]) / 12 == pytest.approx(mean_loss, rel=1e-5)


def test_position_buckets_average_their_positions():
    token_losses = torch.arange(8.0).repeat(3, 1)
    inst = EvalInstruments(block_size=8, buckets=4, position_loss=True, token_watch=False)
    inst.update(None, torch.zeros(3, 8, dtype=torch.long), token_losses)
    assert inst.summary()["position_loss"] == [0.5, 2.5, 4.5, 6.5]


def test_loss_by_position_needs_targets():
    with pytest.raises(ValueError, match="needs targets"):
        position_losses(torch.zeros(2, 3), None)


def test_token_watch_equals_brute_force():
    vocab = 11
    model, x, y = tiny_model_and_batch(vocab)
    uni = torch.rand(vocab)
    uni[3] = 0  # a token the corpus never holds
    uni /= uni.sum()
    inst = EvalInstruments(block_size=12, buckets=4, position_loss=False, token_watch=True, unigram_probs=uni)
    with torch.no_grad():
        logits, token_losses = model(x, y, reduction="none")
        inst.update(logits, y, token_losses)
    row = inst.summary()
    # brute force: one token at a time, plain Python sums
    probs = [torch.softmax(logits[b, t].double(), -1) for b in range(x.size(0)) for t in range(x.size(1))]
    n = len(probs)
    mean = [sum(p[v].item() for p in probs) / n for v in range(vocab)]
    p_correct = sum(probs[b * x.size(1) + t][y[b, t]].item() for b in range(x.size(0)) for t in range(x.size(1))) / n
    ent_token = sum(-sum(p[v].item() * math.log(p[v].item()) for v in range(vocab)) for p in probs) / n
    u = uni.tolist()
    assert row["p_correct"] == pytest.approx(p_correct, rel=1e-5)
    assert row["entropy_per_token"] == pytest.approx(ent_token, rel=1e-5)
    assert row["entropy_mean_prediction"] == pytest.approx(-sum(m * math.log(m) for m in mean), rel=1e-5)
    assert row["entropy_unigram"] == pytest.approx(-sum(q * math.log(q) for q in u if q > 0), rel=1e-5)
    assert row["kl_unigram_model"] == pytest.approx(sum(q * math.log(q / m) for q, m in zip(u, mean) if q > 0), rel=1e-5)
    assert row["kl_model_unigram"] == pytest.approx(sum(m * (math.log(m) - math.log(max(q, 1e-12))) for q, m in zip(u, mean)),
                                                    rel=1e-5)


def test_unigram_counts_the_val_tokens(tiny_data):
    meta = json.loads((tiny_data / "data" / "tiny" / "meta.json").read_text()) | {"folder": str(tiny_data / "data" / "tiny")}
    probs = unigram(meta)
    assert probs.shape == (meta["vocab_size"],) and probs.sum().item() == pytest.approx(1.0)
    assert probs[meta["chars"].index(" ")] > probs[meta["chars"].index("z")] > 0


def test_training_with_instruments_logs_them_and_draws_the_plot(tiny_data, capsys):
    cfg = tiny_train_config(tiny_data, eval_position_loss=True, position_buckets=4, eval_token_watch=True, tensorboard=True)
    train.train(cfg)
    with open(os.path.join(cfg["out_dir"], "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    assert len(evals) == 3 and all(len(r["position_loss"]) == 4 and 0 < r["p_correct"] < 1 for r in evals)
    assert sum(evals[-1]["position_loss"]) / 4 == pytest.approx(evals[-1]["val_loss"], rel=1e-4)
    assert evals[-1]["kl_unigram_model"] < evals[0]["kl_unigram_model"]  # it learned the letter frequencies
    assert os.path.exists(os.path.join(cfg["out_dir"], "instruments.png"))
    try:
        import torch.utils.tensorboard  # noqa: F401
        assert os.path.isdir(os.path.join(cfg["out_dir"], "tensorboard"))
    except ImportError:
        assert "TensorBoard is not installed" in capsys.readouterr().out


def test_analyze_plots_prompts_and_rejects_bad_input(tiny_data, tmp_path):
    import analyze
    cfg = tiny_train_config(tiny_data, max_iters=2)
    train.train(cfg)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("line 1: the\nthe quick\\nbrown\n")
    out = tmp_path / "analyze"
    analyze.main([f"--out_dir={cfg['out_dir']}", f"--prompts={prompts}", "--continuation= fox", f"--out={out}",
                  "--device=cpu"])
    rows = json.loads((out / "analyze.json").read_text())["results"]
    assert [r["prompt"] for r in rows] == ["line 1: the", "the quick\nbrown"]
    assert all(len(r["continuation_loss"]) == 4 and 0 < r["entropy_bits"] for r in rows)
    assert (out / "analyze.png").exists()
    with pytest.raises(SystemExit, match="does not exist"):
        analyze.main([f"--out_dir={cfg['out_dir']}", f"--prompts={tmp_path / 'nope.txt'}", "--continuation=x"])
    with pytest.raises(SystemExit, match="needs targets"):
        analyze.main([f"--out_dir={cfg['out_dir']}", f"--prompts={prompts}", "--device=cpu"])
