"""
A µLM GPT for Hugging Face transformers: the forward of µLM's model.py, nothing more (no training options).

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

RMSNorm without a gain, rotary positions rotating channel pairs (i, i + hs/2), QK-norm, a squared-ReLU MLP,
grouped-query attention, a head tied to the embedding or not; each layer's head counts, MLP width and sliding
window as the µLM model had them. generate() keeps keys and values in transformers' DynamicCache; an
attention_mask (left padding for batches of prompts of different lengths) is honoured. With labels, the loss is
transformers' shifted cross-entropy over the real vocabulary (µLM's training loss also spans its padding ids).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_ulm import ULMConfig

# transformers 5.25 renamed the output's past_key_values to cache: fill whichever this version has
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def norm(x):
    """RMSNorm without a gain, as µLM's model.norm."""
    return F.rms_norm(x, (x.size(-1),))


def rotate(x, cos, sin):
    """Rotary embedding of x (B, nh, T, hs): channel pairs (i, i + hs/2) turned by each position's angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class ULMAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.head_size = layer_idx, config.head_size
        self.n_head, self.n_kv_head = config.layer_n_head[layer_idx], config.layer_n_kv_head[layer_idx]
        self.window = config.layer_window[layer_idx]
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_size, bias=False)
        self.kv_proj = nn.Linear(config.n_embd, 2 * self.n_kv_head * self.head_size, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_head, self.head_size).permute(2, 0, 3, 1, 4)  # (B, nkv, T, hs)
        q, k = rotate(norm(q), cos, sin), rotate(norm(k), cos, sin)  # QK-norm, then positions
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, cached + T, hs)
        # no mask: a fresh causal sequence (is_causal), or one new token that sees every cached one
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and k.size(2) == T > 1,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size))


class ULMMLP(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.layer_mlp_hidden[layer_idx], bias=False)
        self.c_proj = nn.Linear(config.layer_mlp_hidden[layer_idx], config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class ULMBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = ULMAttention(config, layer_idx)
        self.ffn = ULMMLP(config, layer_idx)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(norm(x), cos, sin, mask, cache)
        return x + self.ffn(norm(x))


def attention_masks(windows, attention_mask, past, T, device):
    """{window: boolean mask (T, keys) or (B, 1, T, keys), or None where plain causal attention is exact}.

    Queries are the positions past..past+T-1 of the keys 0..past+T-1. attention_mask (B, past+T), 0 at
    padding, hides padded keys; a padded query still sees itself, so its (unused) output stays finite."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    keys = torch.arange(past + T, device=device)
    queries = keys[past:, None]  # (T, 1)
    masks = {}
    for window in set(windows):
        if not padded and not window and (past == 0 or T == 1):
            masks[window] = None
            continue
        mask = keys <= queries  # (T, keys)
        if window:  # a band: the last `window` positions, its own included (µLM's sliding window)
            mask = mask & (keys > queries - window)
        if padded:
            mask = mask & (attention_mask[:, None, None, :].bool() | (keys == queries))  # (B, 1, T, keys)
        masks[window] = mask
    return masks


class ULMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ULMConfig
    base_model_prefix = "ulm"
    _no_split_modules = ["ULMBlock"]
    _auto_class = "AutoModelForCausalLM"  # save_pretrained writes this file and the auto_map beside the weights

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(ULMBlock(config, i) for i in range(config.n_layer))
        # a tied head reads the embedding matrix itself: no second tensor, nothing for transformers to tie
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def rotary(self, position_ids, dtype):
        """cos, sin (B, 1, T, hs/2) of each position: µLM's float32 angles, cast to the activations' dtype."""
        hs = self.config.head_size
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, hs, 2, device=position_ids.device).float() / hs))
        angles = position_ids.float()[..., None] * inv_freq  # (B, T, hs/2)
        return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values  # the name before transformers 5.25
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"{past + T} tokens are more than this µLM model's block_size={self.config.block_size}: "
                             f"keep the prompt plus max_new_tokens within it")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        cos, sin = self.rotary(position_ids, x.dtype)
        masks = attention_masks(self.config.layer_window, attention_mask, past, T, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, masks[block.attn.window], cache)
        h = norm(x)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = F.linear(h, self.wte.weight) if self.lm_head is None else self.lm_head(h)  # (B, T, V)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs; position t predicts t + 1
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
