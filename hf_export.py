"""
A µLM checkpoint as a Hugging Face folder: what compress.py --format=hf writes.

    python compress.py --ckpt=out/shakespeare_char/ckpt.pt --format=hf      # -> out/shakespeare_char/ckpt_hf/

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/shakespeare_char/ckpt_hf", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("out/shakespeare_char/ckpt_hf", trust_remote_code=True)

The folder: model.safetensors and config.json, the model's code (hf_model/'s configuration_ulm.py and
modeling_ulm.py, which need transformers but not µLM), the tokenizer (a GPT-2 model's tokenizer.json, built
from the vendored GPT-2 files; a character model's chars.json and tokenization_ulm.py), generation_config.json
and a model card (README.md). It is written into a temporary folder, loaded back with transformers and its
logits compared with µLM's before it is renamed into place: a refused or failed export leaves nothing.

transformers, safetensors and tokenizers are optional (requirements-extras.txt): imported only here, in
functions, so the core install never needs them.
"""
import json
import os
import shutil

import torch

from architecture import DEFAULTS as MODEL_DEFAULTS
from checkpoint import load_model
from heads import GatedAttention
from model import GPTConfig
from runtime import code_version, progress
from tokenizer import ASSETS, EOT_TEXT

HERE = os.path.dirname(os.path.abspath(__file__))
# every model option, by what the export does with it (tests/test_hf_export.py checks none is left out)
CARRIED = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "tie_embeddings", "rope_base",
           "mlp_ratios", "attn_windows", "layer_heads")  # into config.json, layer by layer where they vary
FOLDED = ("head_gates",)  # each head's gate multiplies its columns of the output projection: same function
TRAINING_ONLY = ("dropout", "checkpoint_activations", "bf16_residual", "ce_chunks", "liger_ce", "attention",
                 "grow_heads", "grow_above", "prune_below", "grow_patience", "max_heads")  # training and speed: the same function
REFUSED = {  # a mechanism modeling_ulm.py does not implement, and the options that only shape it
    "n_core": "looped depth (looped.py)",
    "memory_layers": "memory layers (memory.py)",
    "feedback": "feedback from later layers (feedback.py)",
    "shim": "tokenizer shims (shim.py)",
    "residual_root": "a learned residual root (widths.py)",
    "residual_widths": "per-layer residual widths (widths.py)",
    "attn_scale": "an attention logit scale other than 1/sqrt(head size) (model.py's attn_scale)",
}
PART_OF_REFUSED = ("n_prelude", "n_coda", "loops", "loops_sampling", "loops_min", "loops_max", "backprop_loops",
                   "inject", "exit_tol", "loop_loss", "progressive_alpha", "init_state", "state_noise", "halt",
                   "halt_threshold", "halt_rule", "prefix_token",  # (looped.py's thinking options: they need n_core too)
                   "memory", "memory_slots", "memory_heads", "memory_key_dim", "memory_topk", "memory_gate",
                   "memory_sparse", "knn_capacity", "knn_key_dim", "knn_threshold", "shim_hidden")
# transformers' logits vs µLM's, relative to the largest: float32 agrees to rounding; bfloat16 head gates, folded
# into bfloat16 weights, round once more (2^-8), while a wrong layout would be off by O(1)
MAX_RELATIVE_ERROR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
GPT2_FILES = {"vocab": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",   # encoder.json (tokenizer.py's assets)
              "merges": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"}  # vocab.bpe


def require_extras():
    """transformers, safetensors and tokenizers, or SystemExit saying how to install them."""
    try:
        import safetensors  # noqa: F401
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"--format=hf needs {e.name}: pip install -r requirements-extras.txt") from None


def check_exportable(state, path):
    """SystemExit naming the first thing in the checkpoint that a Hugging Face export cannot carry."""
    quantized = state.get("quantization", {}).get("format")
    if state.get("kind") == "export" and quantized in ("int8", "int4"):
        raise SystemExit(f"{path} is an {quantized} inference export: transformers would need µLM's quantized "
                         f"layers. Export the training checkpoint it came from (or a float32 export)")
    args = state["model_args"]
    for name, mechanism in REFUSED.items():
        if args.get(name, MODEL_DEFAULTS[name]) != MODEL_DEFAULTS[name]:
            raise SystemExit(f"{name}={args[name]!r}: {mechanism} has no Hugging Face export (the exported code "
                             f"runs µLM's plain GPT stack only); export a model without it")
    tokenizer = state.get("tokenizer") or {}
    if tokenizer.get("tokenizer") not in ("char", "gpt2"):
        raise SystemExit(f"{path} records no tokenizer a Hugging Face export can carry (found "
                         f"{tokenizer.get('tokenizer')!r}; char or gpt2 expected)")


def hf_config(model, tokenizer_meta):
    """ULMConfig's arguments: the core options, and each layer's shape as the loaded µLM model has it (a pruned
    layer has fewer heads or neurons than its options say)."""
    cfg, blocks = model.config, model.blocks
    return dict(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_kv_head=cfg.kv_heads, n_embd=cfg.n_embd, rope_base=cfg.rope_base,
                tie_word_embeddings=cfg.tie_embeddings,
                layer_n_head=[b.attn.n_head for b in blocks], layer_n_kv_head=[b.attn.n_kv_head for b in blocks],
                layer_mlp_hidden=[b.ffn.c_fc.out_features for b in blocks], layer_window=[b.attn.window for b in blocks],
                bos_token_id=tokenizer_meta["eot"], eos_token_id=tokenizer_meta["eot"], pad_token_id=tokenizer_meta["eot"])


@torch.no_grad()
def hf_weights(model, names):
    """The tensors named `names` (the exported model's) from the µLM model: the vocabulary's padding rows cut
    off, head gates folded into the output projections."""
    ours = model.state_dict()
    vocab = model.config.vocab_size
    weights = {}
    for name in names:
        w = ours[name]
        if name in ("wte.weight", "lm_head.weight"):
            w = w[:vocab]  # rows past the real vocabulary are padding for tensor-core tiles: never read or predicted
        weights[name] = w.clone().contiguous()
    for i, block in enumerate(model.blocks):
        if isinstance(block.attn, GatedAttention):  # y_h * gate_h @ W_h == y_h @ (gate_h * W_h)
            name = f"blocks.{i}.attn.c_proj.weight"
            C, hs = weights[name].size(0), block.attn.head_size
            weights[name] = (weights[name].view(C, -1, hs) * block.attn.gates()[None, :, None]).view(C, -1)
    return weights


def save_tokenizer(tokenizer_meta, block_size, folder):
    """The tokenizer files: GPT-2's tokenizer.json (the vendored BPE, as tiktoken encodes it), or a character
    model's chars.json with its tokenizer class. <|endoftext|> is also the padding (left: prompts for generate)."""
    if tokenizer_meta["tokenizer"] == "gpt2":
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        gpt2 = os.path.join(ASSETS, "gpt2")
        bpe = Tokenizer(models.BPE.from_file(os.path.join(gpt2, GPT2_FILES["vocab"]),
                                             os.path.join(gpt2, GPT2_FILES["merges"])))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT_TEXT, eos_token=EOT_TEXT,
                                            unk_token=EOT_TEXT, pad_token=EOT_TEXT, padding_side="left",
                                            clean_up_tokenization_spaces=False, model_max_length=block_size)
    else:
        from hf_model.tokenization_ulm import ULMCharTokenizer
        chars = os.path.join(folder, "chars.json")
        with open(chars, "w", encoding="utf-8") as f:
            json.dump(tokenizer_meta["chars"], f, ensure_ascii=False)
        tokenizer = ULMCharTokenizer(chars, model_max_length=block_size)
    tokenizer.save_pretrained(folder)


def model_card(state, command, n_params, max_error, dtype):
    """README.md: what the model is, how to load it, what it was trained on, and how this folder was made."""
    args, config, tok = state["model_args"], state.get("config", {}), state["tokenizer"]
    tokenizer = "GPT-2 BPE" if tok["tokenizer"] == "gpt2" else f"character ({tok['vocab_size']} ids)"
    val = f"{state['val_loss']:.4f}" if state.get("val_loss") is not None else "not recorded"
    shape = {k: v for k, v in args.items() if k in CARRIED + FOLDED and v != MODEL_DEFAULTS[k]}
    version = code_version(os.path.join(HERE, "hf_model", "modeling_ulm.py"))
    padded = GPTConfig(vocab_size=args["vocab_size"]).padded_vocab_size
    if state.get("val_loss") is not None and padded > args["vocab_size"]:
        val += (f" (µLM's loss normalises over {padded} ids, the vocabulary padded for tensor cores; over the "
                f"{args['vocab_size']} real ones, as this model's loss does, it is a little lower)")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [ulm, causal-lm]
---
# µLM GPT, {args['n_layer']} layers × {args['n_embd']}, {n_params / 1e6:.2f}M parameters

A small GPT trained with µLM (plain PyTorch) and exported for transformers. Its code (`modeling_ulm.py`) is
µLM's forward: RMSNorm without gains, rotary positions, QK-norm, squared-ReLU MLP.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)
ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=100, do_sample=False)[0]))
```
The prompt and the new tokens together must fit the context of {args['block_size']} tokens.

## Training
| | |
|---|---|
| data | `{config.get('dataset', 'not recorded')}` (under `{config.get('data_dir', 'data')}`) |
| tokenizer | {tokenizer} |
| steps | {state.get('step', 'not recorded')} |
| val loss | {val} |
| model options (besides the defaults) | `{json.dumps(shape)}` |
| fine-tuned from | {config.get('init_from') if config.get('init_from') not in (None, 'scratch', 'resume') else '-'} |

## How this folder was made
`{command}`, with µLM at commit {version['commit'] or 'unknown'}{' (with local changes)' if version['dirty'] else ''}.
transformers' logits (float32 compute, {str(dtype).removeprefix('torch.')} weights) matched µLM's to {max_error:.1e}
(the largest difference over the largest logit).

<details><summary>the training run's config</summary>

```json
{json.dumps(config, indent=1, default=str)}
```
</details>
"""


@torch.no_grad()
def round_weights(model, dtype):
    """The model, its weights rounded to dtype and back to float32 in place: what a file of that dtype holds.
    (Not model.to(dtype): that would round the rotary tables too, which the exported code computes in float32.)"""
    for p in model.parameters():
        p.copy_(p.to(dtype).float())
    return model


@torch.no_grad()
def compare_logits(folder, model, dtype):
    """Load the folder with transformers, in float32, and return max |its logits - µLM's| / max |µLM's| on a
    fixed random sequence of up to 256 tokens. µLM's weights are first rounded to the file's dtype, as the
    folder's are (the model is changed: call this last)."""
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).float().eval()
    reference = round_weights(model, dtype)
    T = min(model.config.block_size, 256)
    idx = torch.randint(model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    theirs, ours = loaded(idx, use_cache=False).logits, reference(idx)[0]
    return ((theirs - ours).abs().max() / ours.abs().max()).item()


def check_tokenizer(folder, tokenizer_meta):
    """The saved tokenizer, loaded by transformers, encodes a sample as µLM's tokenizer does."""
    from transformers import AutoTokenizer

    from tokenizer import tokenizer_from_meta
    ours = tokenizer_from_meta(tokenizer_meta)
    theirs = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    sample = "".join(tokenizer_meta["chars"]) if tokenizer_meta["tokenizer"] == "char" else \
        "Hello, world!\n  ROMEO: What's this?\té 漢字 1234 "
    if theirs(sample, verbose=False)["input_ids"] != ours.encode(sample):  # (no warning when longer than block_size)
        raise SystemExit("the exported tokenizer encodes text differently from µLM's: nothing written (a bug in "
                         "hf_export.py: please report it)")


def write_folder(model, state, folder, dtype, command):
    """Everything into `folder` (which exists and is empty), with a progress bar (a 124M model takes half a
    minute on a CPU). Returns the logits' relative difference."""
    from hf_model.configuration_ulm import ULMConfig
    from hf_model.modeling_ulm import ULMForCausalLM
    with progress(3, "export hf", "stage") as bar:
        hf = ULMForCausalLM(ULMConfig(**hf_config(model, state["tokenizer"])))
        hf.load_state_dict(hf_weights(model, hf.state_dict().keys()))
        hf.generation_config.pad_token_id = state["tokenizer"]["eot"]
        hf.to(dtype).save_pretrained(folder)
        bar.update(1)
        save_tokenizer(state["tokenizer"], model.config.block_size, folder)
        check_tokenizer(folder, state["tokenizer"])
        bar.update(1)
        error = compare_logits(folder, model, dtype)
        bar.update(1)
    if not error <= MAX_RELATIVE_ERROR[dtype]:
        raise SystemExit(f"transformers' logits differ from µLM's by {error:.2e} (relative): nothing written "
                         f"(a bug in hf_model/modeling_ulm.py: please report it)")
    n_params = sum(p.numel() for p in hf.parameters())
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(state, command, n_params, error, dtype))
    return error


def export_hf(state, source, out, dtype, command):
    """Write the Hugging Face folder `out` for the checkpoint dict `state` (read from `source`): into a temporary
    folder beside it, renamed into place only once transformers has loaded it back and matched µLM's logits.
    Returns that relative difference. A model option the export cannot carry is refused before anything is written."""
    check_exportable(state, source)
    require_extras()
    out = os.path.normpath(out)  # "folder/" and "folder" name one folder
    if os.path.exists(out):
        raise SystemExit(f"{out} already exists; pick another --out, or remove it first")
    model = load_model(state)
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        error = write_folder(model, state, tmp, dtype, command)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return error
