import os

import pytest

import sample
from checkpoint import load_checkpoint, save_checkpoint
import train


@pytest.fixture
def trained(tiny_cfg):
    train.train(tiny_cfg | {"max_iters": 5})
    return tiny_cfg["out_dir"]


def test_sample_streams_text_from_a_fresh_checkpoint(trained, capsys):
    sample.main([f"--out_dir={trained}", "--start=line", "--max_new_tokens=30", "--num_samples=2", "--device=cpu"])
    out = capsys.readouterr()
    assert out.out.count("line") >= 2 and "tokens/s" in out.err


def test_sample_reads_the_prompt_from_a_file_and_uses_best(trained, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick")
    sample.main([f"--out_dir={trained}", f"--start=FILE:{prompt}", "--ckpt=best", "--max_new_tokens=5",
                 "--temperature=0", "--device=cpu"])
    assert capsys.readouterr().out.startswith("the quick")


def test_missing_prompt_file_is_a_clear_error(trained, tmp_path):
    with pytest.raises(SystemExit, match="prompt file .* does not exist"):
        sample.main([f"--out_dir={trained}", f"--start=FILE:{tmp_path / 'nope.txt'}", "--device=cpu"])


@pytest.mark.parametrize("arg", ["--top_k=0", "--top_p=0.0", "--temperature=-0.5"])
def test_out_of_range_sampling_arguments_are_clear_errors(trained, arg):
    with pytest.raises(SystemExit, match="must be"):
        sample.main([f"--out_dir={trained}", arg, "--device=cpu"])


def test_missing_checkpoint_and_unknown_characters_are_clear_errors(trained, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        sample.main([f"--out_dir={tmp_path / 'empty'}", "--device=cpu"])
    with pytest.raises(SystemExit, match="not in this character vocabulary"):
        sample.main([f"--out_dir={trained}", "--start=ZZZ~~", "--device=cpu"])


def test_an_empty_prompt_prints_no_end_of_text_token(trained, capsys):
    sample.main([f"--out_dir={trained}", "--start=", "--max_new_tokens=20", "--device=cpu"])
    assert "<|endoftext|>" not in capsys.readouterr().out


def test_a_folder_as_prompt_file_is_a_clear_error(trained, tmp_path):
    with pytest.raises(SystemExit, match="is a folder, not a file"):
        sample.main([f"--out_dir={trained}", f"--start=FILE:{tmp_path}", "--device=cpu"])


def test_top_k_none_disables_the_cut_as_documented(trained, capsys):
    sample.main([f"--out_dir={trained}", "--top_k=None", "--max_new_tokens=5", "--device=cpu"])
    assert "tokens/s" in capsys.readouterr().err


def test_samples_from_any_checkpoint_kind_without_step_or_val_loss(trained, tmp_path, capsys):
    state = load_checkpoint(os.path.join(trained, "ckpt.pt"))
    policy = {k: v for k, v in state.items() if k not in ("format", "kind", "step", "optimizer", "rng")}
    save_checkpoint(str(tmp_path / "policy.pt"), policy | {"val_loss": None, "episode": 7}, kind="world")
    sample.main([f"--ckpt={tmp_path / 'policy.pt'}", "--start=line", "--max_new_tokens=5", "--device=cpu"])
    out = capsys.readouterr()
    assert out.out.startswith("line") and "world checkpoint" in out.err and "val loss" not in out.err


def test_sample_thinks_longer_and_halts_on_a_step_trained_looped_checkpoint(tiny_cfg, capsys):
    thinking = dict(n_layer=3, n_prelude=1, n_core=1, n_coda=1, loops=2, loop_loss="every", halt=True)
    train.train(tiny_cfg | thinking | {"max_iters": 4})
    run = [f"--out_dir={tiny_cfg['out_dir']}", "--start=line", "--max_new_tokens=6", "--device=cpu"]
    sample.main(run + ["--loops=5"])
    assert "tokens/s" in capsys.readouterr().err
    sample.main(run + ["--halt=True", "--use_cache=False", "--loops=6"])
    err = capsys.readouterr().err
    assert "loops per token (at most 6)" in err
    with pytest.raises(SystemExit, match="use_cache=False"):
        sample.main(run + ["--halt=True"])


def test_halting_a_model_without_a_probe_is_a_clear_error(trained):
    with pytest.raises(SystemExit, match="halting probe"):
        sample.main([f"--out_dir={trained}", "--halt=True", "--use_cache=False", "--device=cpu"])
