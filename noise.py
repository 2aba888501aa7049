"""
Input noise for training batches: the model reads a corrupted context and still predicts the clean text.

    python train.py config/shakespeare_char.py --noise="{'delete': 0.02, 'keyboard': 0.02}"

`noise` maps a family to its probability per input character (per token for `mask`):
- mask: forgetful causal masking (Liu et al. 2022, "Towards Better Few-Shot and Finetuning Performance
  with Forgetful Causal Language Models"): the token is replaced by a mask id the model never predicts.
  Works with any tokenizer.
- delete, insert (a random character of the vocabulary), transpose (with the next character),
  keyboard (a QWERTY neighbour, case kept), whitespace (a space inserted, four times likelier next to
  whitespace), repeat (in a run of equal characters, one more or one fewer), unicode (a compatibility
  variant: a character of the vocabulary whose NFKC form is this one). These need the char tokenizer.

Targets stay the clean text: after a noisy token the target is the clean character that follows the
furthest clean character read so far, so a deletion asks for the deleted character and an insertion
asks for what really comes next. Edits that shorten a window leave its tail ignored (target -1).
The noise of a batch is a function of the seed and the data sampler's state before the batch (which a
checkpoint keeps), so a run is deterministic and a resumed run re-draws exactly the same noise.
Evaluation batches are never noised.
"""
import hashlib
import unicodedata

import numpy as np
import torch

FAMILIES = ("mask", "delete", "insert", "transpose", "keyboard", "whitespace", "repeat", "unicode")
CHAR_FAMILIES = FAMILIES[1:]
QWERTY = ("1234567890-=", "qwertyuiop[]", "asdfghjkl;'", "zxcvbnm,./")


def keyboard_neighbours(char):
    """Characters next to char on a QWERTY keyboard (same row and the rows above and below), case kept."""
    lower = char.lower()
    for r, row in enumerate(QWERTY):
        c = row.find(lower)
        if c >= 0:
            near = [QWERTY[rr][cc] for rr in (r - 1, r, r + 1) if 0 <= rr < len(QWERTY)
                    for cc in (c - 1, c, c + 1) if 0 <= cc < len(QWERTY[rr]) and (rr, cc) != (r, c)]
            return [n.upper() if char.isupper() else n for n in near]
    return []


def check_noise(probs, meta):
    """SystemExit unless probs maps known families to probabilities the dataset's tokenizer supports."""
    if not isinstance(probs, dict):
        raise SystemExit(f"noise must be a dict of family -> probability, e.g. {{'delete': 0.02}}; got {probs!r}")
    for family, p in probs.items():
        if family not in FAMILIES:
            raise SystemExit(f"unknown noise family {family!r}; the families are {', '.join(FAMILIES)}")
        if not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise SystemExit(f"noise probability of {family!r} must be a number in [0, 1], got {p!r}")
        if family in CHAR_FAMILIES and p > 0 and meta.get("tokenizer") != "char":
            raise SystemExit(f"noise family {family!r} edits characters and needs a char-tokenized dataset "
                             f"(this one is {meta.get('tokenizer')}); only 'mask' works with any tokenizer")


class InputNoise:
    """Corrupts training inputs (B, T) with the families in probs; call with (x, y, key) -> (x, y)."""

    def __init__(self, probs, meta, seed, embedding_rows):
        check_noise(probs, meta)
        self.p = {f: float(probs.get(f, 0.0)) for f in FAMILIES}
        # the mask is the first padding row of the embedding: a token of its own that is never a target
        self.seed, self.mask_id, self.eot = seed, meta["vocab_size"], meta.get("eot", 0)
        if self.p["mask"] > 0 and embedding_rows <= self.mask_id:
            raise SystemExit(f"noise family 'mask' needs a spare embedding row, but the vocabulary "
                             f"({meta['vocab_size']}) fills all {embedding_rows}")
        chars = meta.get("chars", [])
        ids = {c: i for i, c in enumerate(chars)}
        self.vocab = len(chars)
        self.space = ids.get(" ", -1)
        self.keyboard = [[ids[n] for n in keyboard_neighbours(c) if n in ids] for c in chars]
        self.variants = [[ids[v] for v in chars if v != c and unicodedata.normalize("NFKC", v) == c] for c in chars]
        if self.p["unicode"] > 0 and not any(self.variants):
            raise SystemExit("noise family 'unicode' has nothing to swap: no character of this vocabulary is a "
                             "compatibility variant (NFKC) of another; it needs text that holds such variants")
        if self.p["whitespace"] > 0 and self.space < 0:
            raise SystemExit("noise family 'whitespace' needs ' ' in the character vocabulary")
        self.edits = any(self.p[f] > 0 for f in CHAR_FAMILIES)

    def rng(self, key):
        """A numpy generator seeded by the run's seed and key (bytes, a tensor or an int)."""
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy().tobytes()
        elif isinstance(key, int):
            key = str(key).encode()
        digest = hashlib.blake2b(repr(self.seed).encode() + key, digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(digest, "little"))

    def __call__(self, x, y, key):
        device = x.device
        rng = self.rng(key)
        x, y = x.cpu().numpy(), y.cpu().numpy()
        if self.edits:
            rows = [self.edit_row(np.append(xr, yr[-1]), rng) for xr, yr in zip(x, y)]
            x, y = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
        else:
            x = x.copy()
        if self.p["mask"] > 0:
            x[(rng.random(x.shape) < self.p["mask"]) & (y >= 0)] = self.mask_id
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def edit_row(self, clean, rng):
        """Noisy inputs and clean targets (T,) from one clean window clean (T + 1,)."""
        T, p = len(clean) - 1, self.p
        u = rng.random((7, T)).tolist()  # one uniform per family and position, so the draws never depend on the text
        choice = rng.integers(0, 1 << 30, size=(3, T)).tolist()
        ids = clean
        clean = clean.tolist()  # Python ints: the loop below reads them one at a time, numpy scalars are slower
        out, src = [], []  # noisy tokens and the clean index each one covers

        def put(token, j):
            out.append(token)
            src.append(j)
        j = 0
        while j < T:
            c = clean[j]
            in_run = c < self.vocab and ((j > 0 and clean[j - 1] == c) or clean[j + 1] == c)
            if u[0][j] < p["delete"] or (in_run and u[1][j] < p["repeat"] and choice[0][j] % 2):
                j += 1
                continue
            if u[2][j] < p["transpose"] and j + 1 < T:
                put(clean[j + 1], j + 1)
                put(c, j + 1)
                j += 2
                continue
            if c < self.vocab and self.keyboard[c] and u[3][j] < p["keyboard"]:
                put(self.keyboard[c][choice[1][j] % len(self.keyboard[c])], j)
            elif c < self.vocab and self.variants[c] and u[4][j] < p["unicode"]:
                put(self.variants[c][choice[1][j] % len(self.variants[c])], j)
            else:
                put(c, j)
            if in_run and u[1][j] < p["repeat"]:  # the other half of the coin: one more of the run
                put(c, j)
            if u[5][j] < p["insert"]:
                put(choice[2][j] % self.vocab, j)
            near_space = c == self.space or clean[j + 1] == self.space
            if u[6][j] < p["whitespace"] * (1 if near_space else 0.25):
                put(self.space, j)
            j += 1
        x = np.full(T, self.eot, dtype=ids.dtype)
        y = np.full(T, -1, dtype=np.int64)
        n = min(T, len(out))
        x[:n] = out[:n]
        y[:n] = ids[np.maximum.accumulate(src[:n]) + 1]  # the clean character after the furthest one read
        return x, y
