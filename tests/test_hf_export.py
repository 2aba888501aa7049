"""compress.py --format=hf: a folder transformers loads and runs as µLM does (hf_export.py, hf_model/)."""
import os
import sys

import pytest
import torch

import compress
import hf_export
import train
from architecture import MODEL_KEYS, build_model, model_args
from checkpoint import load_checkpoint, load_model, save_checkpoint
from configurator import configure
from conftest import tiny_train_config

GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256}


@pytest.fixture(scope="module")
def transformers():
    for name in ("safetensors", "tokenizers"):
        pytest.importorskip(name)
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny character model trained briefly (grouped-query attention), and its checkpoint's path."""
    import prepare
    root = tmp_path_factory.mktemp("hf")
    (root / "tiny.txt").write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n"
                                           for i in range(200)))
    prepare.prepare(configure(prepare.DEFAULTS, [f"--dataset={root / 'tiny.txt'}", "--name=tiny",
                                                 "--tokenizer=char", f"--data_dir={root / 'data'}"]))
    cfg = tiny_train_config(root, n_embd=32, n_head=4, n_kv_head=2, block_size=32, max_iters=30, eval_interval=30,
                            dropout=0.0)
    train.train(cfg)
    return os.path.join(cfg["out_dir"], "ckpt.pt")


def char_meta(chars="\n :abcdefghijklmnopqrstuvwxyz.0123456789"):
    return {"tokenizer": "char", "chars": list(chars), "vocab_size": len(chars) + 1, "eot": len(chars)}


def random_checkpoint(path, tokenizer=None, prepare_model=None, **options):
    """A checkpoint of an untrained model with these options (prepare_model(model) may change it first)."""
    tokenizer = tokenizer or char_meta()
    torch.manual_seed(0)
    model = build_model(dict(vocab_size=tokenizer["vocab_size"], n_layer=2, n_head=4, n_embd=32, block_size=32)
                        | options)
    if prepare_model:
        prepare_model(model)
    save_checkpoint(str(path), {"model_args": model_args(model), "model": model.state_dict(), "tokenizer": tokenizer,
                                "config": {"dataset": "test"}, "step": 0, "val_loss": None})
    return str(path)


def export(ckpt, *args):
    return compress.export(configure(compress.DEFAULTS, [f"--ckpt={ckpt}", "--format=hf", "--measure=False", *args]))


def load_hf(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).float().eval()


def assert_same_logits(folder, ckpt, dtype=torch.float32, tolerance=1e-5):
    """transformers' logits on random tokens equal µLM's (weights rounded to the file's dtype) within tolerance."""
    ours = hf_export.round_weights(load_model(load_checkpoint(ckpt)), dtype)
    idx = torch.randint(ours.config.vocab_size, (2, ours.config.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, reference = load_hf(folder)(idx).logits, ours(idx)[0]
    assert theirs.shape == reference.shape
    assert (theirs - reference).abs().max() <= tolerance * reference.abs().max()


def greedy_pair(folder, ckpt, prompt, n):
    """(transformers' greedy generate, µLM's generate at temperature 0 as sample.py runs it) from the prompt ids."""
    ours = load_model(load_checkpoint(ckpt))
    idx = torch.tensor([prompt])
    eot = load_checkpoint(ckpt)["tokenizer"]["eot"]
    with torch.no_grad():
        theirs = load_hf(folder).generate(idx, max_new_tokens=n, do_sample=False)
        reference = ours.generate(idx, n, temperature=0.0, stop_token=eot)
    return theirs[0].tolist(), reference[0].tolist()


def test_every_model_option_exports_or_is_refused():
    kinds = (hf_export.CARRIED, hf_export.FOLDED, hf_export.TRAINING_ONLY, tuple(hf_export.REFUSED),
             hf_export.PART_OF_REFUSED)
    named = [k for kind in kinds for k in kind]
    assert len(named) == len(set(named)), "an option classified twice"
    assert not set(MODEL_KEYS) - set(named), f"options hf_export.py does not classify: {set(MODEL_KEYS) - set(named)}"


def test_char_model_loads_in_transformers_with_the_same_logits_tokens_and_greedy_text(transformers, trained, tmp_path):
    from transformers import AutoTokenizer
    folder = export(trained, f"--out={tmp_path / 'hf'}")
    for name in ("model.safetensors", "config.json", "modeling_ulm.py", "configuration_ulm.py", "tokenization_ulm.py",
                 "chars.json", "tokenizer_config.json", "README.md"):
        assert os.path.exists(os.path.join(folder, name)), name
    assert_same_logits(folder, trained)
    state = load_checkpoint(trained)
    x = torch.randint(state["model_args"]["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # labels are the inputs (the model shifts them); the loss is over the real vocabulary
        logits = load_model(state)(x[:, :-1])[0]
        reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        torch.testing.assert_close(load_hf(folder)(x, labels=x).loss, reference)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    from tokenizer import tokenizer_from_meta
    prompt = tokenizer("line 1")["input_ids"]
    assert prompt == tokenizer_from_meta(state["tokenizer"]).encode("line 1")
    theirs, reference = greedy_pair(folder, trained, prompt, 20)
    assert theirs == reference and len(theirs) > len(prompt)
    assert tokenizer.decode(theirs) == tokenizer_from_meta(state["tokenizer"]).decode(reference)
    with pytest.raises(ValueError, match="'Z' is not in this µLM model's character vocabulary"):
        tokenizer("Zebra")
    card = open(os.path.join(folder, "README.md")).read()
    assert f"| steps | {state['step']} |" in card and f"{state['val_loss']:.4f}" in card and "--format=hf" in card
    assert transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True).vocab_size == state["model_args"]["vocab_size"]


def test_gpt2_model_exports_the_gpt2_tokenizer_and_generates_as_ulm_does(transformers, tmp_path):
    from transformers import AutoTokenizer

    from tokenizer import GPT2Tokenizer
    ckpt = random_checkpoint(tmp_path / "gpt2.pt", GPT2_META, n_layer=1, n_embd=16, n_head=2)
    folder = export(ckpt)
    assert folder.endswith("gpt2_hf") and os.path.exists(os.path.join(folder, "tokenizer.json"))
    assert_same_logits(folder, ckpt)  # padded vocabulary (50304 rows) sliced to 50257 logits
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    text = "ROMEO: What's this?\n  Hello, world! é漢字 1234"
    assert tokenizer(text)["input_ids"] == GPT2Tokenizer().encode(text)
    theirs, reference = greedy_pair(folder, ckpt, tokenizer(text)["input_ids"], 8)
    assert theirs == reference


def gate(model):
    for block in model.blocks:
        block.attn.head_gate.data = torch.randn_like(block.attn.head_gate) * 0.2


def prune_heads(model):
    compress.structured_prune(model, 0.5)


@pytest.mark.parametrize("options", [
    dict(n_kv_head=2, tie_embeddings=False, rope_base=500.0),
    dict(attn_windows=[4, 0], mlp_ratios=[2, 3.5]),
    dict(layer_heads=[2, 4], head_gates=True, prepare_model=gate),
    dict(n_kv_head=2, prepare_model=prune_heads),
    dict(dropout=0.1, checkpoint_activations=True, ce_chunks=2),
], ids=["gqa-untied-rope", "windows-widths", "gated-heads", "pruned", "training-options"])
def test_model_shapes_export_with_the_same_logits_and_cached_greedy_tokens(transformers, tmp_path, options):
    ckpt = random_checkpoint(tmp_path / "ckpt.pt", **options)
    folder = export(ckpt)
    assert_same_logits(folder, ckpt)
    theirs, reference = greedy_pair(folder, ckpt, [1, 2, 3], 24)  # past the 4-token window, through the KV cache
    assert theirs == reference


def test_a_bfloat16_export_matches_ulm_with_its_weights_rounded(transformers, trained, tmp_path):
    folder = export(trained, f"--out={tmp_path / 'bf16'}", "--dtype=bfloat16")
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).wte.weight.dtype == torch.bfloat16
    assert_same_logits(folder, trained, torch.bfloat16)


def test_a_float_inference_export_exports_as_its_source_does(transformers, tmp_path):
    ckpt = random_checkpoint(tmp_path / "ckpt.pt", n_kv_head=2)
    exported = compress.export(configure(compress.DEFAULTS, [f"--ckpt={ckpt}", "--format=float32", "--measure=False"]))
    assert_same_logits(export(exported, f"--out={tmp_path / 'hf'}/"), ckpt)


def test_a_left_padded_batch_generates_what_each_prompt_does_alone(transformers, trained, tmp_path):
    from transformers import AutoTokenizer
    folder = export(trained, f"--out={tmp_path / 'hf'}")
    model, tokenizer = load_hf(folder), AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    prompts = ["line 12: the", "li"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # padded on the left
    together = model.generate(**batch, max_new_tokens=10, do_sample=False)
    for row, prompt in zip(together, prompts):
        alone = model.generate(tokenizer(prompt, return_tensors="pt").input_ids, max_new_tokens=10, do_sample=False)
        assert tokenizer.decode(row, skip_special_tokens=True) == tokenizer.decode(alone[0], skip_special_tokens=True)


def test_generating_past_block_size_is_a_clear_error(transformers, trained, tmp_path):
    model = load_hf(export(trained, f"--out={tmp_path / 'hf'}"))
    with pytest.raises(ValueError, match="block_size=32"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=5, do_sample=False)


def quantize(ckpt):
    compress.export(configure(compress.DEFAULTS, [f"--ckpt={ckpt}", "--format=int8", "--measure=False"]))
    return ckpt.replace(".pt", "_int8.pt")


@pytest.mark.parametrize("options, message", [
    (dict(n_prelude=1, n_core=1, n_coda=0), "n_core=1: looped depth"),
    (dict(memory_layers=[1], memory_slots=16, memory_key_dim=8, memory_heads=1, memory_topk=2), "memory_layers=\\[1\\]"),
    (dict(feedback=1), "feedback=1"),
    ("int8", "int8 inference export"),
], ids=["looped", "memory", "feedback", "int8"])
def test_what_transformers_cannot_run_is_refused_and_nothing_is_written(tmp_path, options, message):
    ckpt = random_checkpoint(tmp_path / "ckpt.pt")
    ckpt = quantize(ckpt) if options == "int8" else random_checkpoint(tmp_path / "ckpt.pt", **options)
    before = set(os.listdir(tmp_path))
    with pytest.raises(SystemExit, match=message):
        export(ckpt, f"--out={tmp_path / 'hf'}")
    assert set(os.listdir(tmp_path)) == before


def test_a_failed_check_or_an_existing_folder_leaves_nothing_behind(transformers, tmp_path, monkeypatch):
    ckpt = random_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(hf_export, "compare_logits", lambda *args: 0.5)
    with pytest.raises(SystemExit, match="differ from µLM's by 5.00e-01"):
        export(ckpt)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no ckpt_hf, no temporary folder
    (tmp_path / "ckpt_hf").mkdir()
    with pytest.raises(SystemExit, match="already exists"):
        export(ckpt)


def test_without_transformers_the_export_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # an import of it now fails, as when it is not installed
    with pytest.raises(SystemExit, match="pip install -r requirements-extras.txt"):
        export(random_checkpoint(tmp_path / "ckpt.pt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
