"""
Tokenizers behind one small interface: encode, decode, decode_bytes, eot, n_vocab.

`gpt2` is tiktoken's GPT-2 BPE, read offline from the vendored files in assets/gpt2 (unless you set
TIKTOKEN_CACHE_DIR yourself); `char` maps each character of the corpus to an id, plus one EOT id.
"""
import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
EOT_TEXT = "<|endoftext|>"


def gpt2_encoding():
    """tiktoken's GPT-2 encoding, from the vendored files unless TIKTOKEN_CACHE_DIR is already set."""
    vendored = os.path.join(ASSETS, "gpt2")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", vendored)
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # a user-set cache without the files, and no network to fill it
        if os.environ["TIKTOKEN_CACHE_DIR"] == vendored:
            raise
        print(f"tiktoken could not load gpt2 from TIKTOKEN_CACHE_DIR={os.environ['TIKTOKEN_CACHE_DIR']} "
              f"({type(e).__name__}); using the vendored files in {vendored}")
        os.environ["TIKTOKEN_CACHE_DIR"] = vendored
        return tiktoken.get_encoding("gpt2")


class GPT2Tokenizer:
    name = "gpt2"

    def __init__(self):
        self.enc = gpt2_encoding()
        self.eot, self.n_vocab = self.enc.eot_token, self.enc.n_vocab

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=8):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode_bytes(self, ids):
        return self.enc.decode_bytes([i for i in ids if i < self.n_vocab])

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def meta(self):
        return {"tokenizer": "gpt2"}


class CharTokenizer:
    name = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot = len(self.chars)  # one id past the characters separates documents
        self.n_vocab = len(self.chars) + 1

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this character vocabulary") from None

    def encode_batch(self, texts, num_threads=1):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(self.chars[i] if i < len(self.chars) else EOT_TEXT for i in ids)

    def decode_bytes(self, ids):
        return self.decode(ids).encode("utf-8")

    def meta(self):
        return {"tokenizer": "char", "chars": self.chars}


def tokenizer_from_meta(meta):
    """The tokenizer a prepared dataset (its meta.json dict) was written with."""
    if meta["tokenizer"] == "gpt2":
        return GPT2Tokenizer()
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"])
    raise ValueError(f"unknown tokenizer {meta['tokenizer']!r} in meta.json")
