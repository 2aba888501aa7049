"""The configuration of a µLM model exported for Hugging Face transformers (see modeling_ulm.py)."""
try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig


class ULMConfig(PreTrainedConfig):
    """µLM's core options, with every layer's shape spelled out: a pruned or reshaped µLM's layers differ.

    layer_n_head, layer_n_kv_head, layer_mlp_hidden, layer_window: one entry per layer (query heads, key/value
    heads, MLP width, sliding attention window in tokens with 0 for the full context); None means every layer
    has the model's n_head, n_kv_head, 4 * n_embd and 0.
    """
    model_type = "ulm"
    _auto_class = "AutoConfig"  # save_pretrained copies this file beside the weights and names it in config.json
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "block_size"}

    def __init__(self, vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_kv_head=None, n_embd=768,
                 rope_base=10000.0, layer_n_head=None, layer_n_kv_head=None, layer_mlp_hidden=None, layer_window=None,
                 tie_word_embeddings=True, use_cache=True, **kwargs):
        self.vocab_size, self.block_size, self.n_layer, self.n_embd = vocab_size, block_size, n_layer, n_embd
        self.n_head, self.n_kv_head, self.rope_base = n_head, n_kv_head or n_head, rope_base
        self.layer_n_head = list(layer_n_head or [n_head] * n_layer)
        self.layer_n_kv_head = list(layer_n_kv_head or [self.n_kv_head] * n_layer)
        self.layer_mlp_hidden = list(layer_mlp_hidden or [4 * n_embd] * n_layer)
        self.layer_window = list(layer_window or [0] * n_layer)
        self.use_cache = use_cache  # generate keeps keys and values (transformers' DynamicCache)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_size(self):
        return self.n_embd // self.n_head  # every layer's, whatever its head count (as in µLM)
