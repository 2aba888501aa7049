"""The character tokenizer of a µLM character model, for Hugging Face transformers.

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)

Each character of the training corpus is one id (chars.json lists them in id order) and <|endoftext|> is the
id after them, as in µLM's tokenizer.py. A character outside the vocabulary is an error, as it is in µLM: a
tokenizers-library BPE of single characters would drop it without a word.
"""
import json
import os

try:
    from transformers import PreTrainedTokenizer
except ImportError:  # older releases keep it here
    from transformers.tokenization_utils import PreTrainedTokenizer

EOT_TEXT = "<|endoftext|>"


class ULMCharTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "chars.json"}
    _auto_class = "AutoTokenizer"  # save_pretrained copies this file and names it in tokenizer_config.json
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, eos_token=EOT_TEXT, **kwargs):
        with open(vocab_file, encoding="utf-8") as f:
            self.chars = json.load(f)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        # the end-of-text id (len(chars), as in µLM) also begins and pads: µLM has no other special token;
        # a batch of prompts is padded on the left, where generation does not write
        defaults = dict(bos_token=eos_token, pad_token=eos_token, padding_side="left", clean_up_tokenization_spaces=False)
        super().__init__(eos_token=eos_token, **(defaults | kwargs))

    @property
    def vocab_size(self):
        return len(self.chars)

    def get_vocab(self):
        return {**self.stoi, **self.added_tokens_encoder}

    def _tokenize(self, text, **kwargs):
        return list(text)

    def _convert_token_to_id(self, token):
        if token not in self.stoi:
            raise ValueError(f"character {token!r} is not in this µLM model's character vocabulary")
        return self.stoi[token]

    def _convert_id_to_token(self, index):
        return self.chars[index]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + "chars.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.chars, f, ensure_ascii=False)
        return (path,)
