"""
Generated corpora for questions about knowledge, offline and seeded, one word per token.

- facts (reason vs knowledge, research notes 002 "train with a preloaded context"): a document states
  facts about a few people (who lives where, who works for whom), then asks questions answerable only
  from them, 1-hop ("where does ka lo live ?") and 2-hop ("where does the boss of ka lo live ?").
  People are two-syllable names drawn fresh per document; held-out documents use only names that no
  training document holds. With fixed_world the same people always have the same facts instead.
- bios (knowledge capacity, Allen-Zhu & Li 2024, "Physics of Language Models 3.3"): N people, each with
  fixed attributes (birth city, month, year, university, major, employer), every exposure rendered with
  random templates in a random order. Bits of knowledge follow from how well the model recalls them.

    python prepare.py --dataset=synthetic:facts      # text documents, char tokens (for train.py)
    python experiments/reason_vs_knowledge.py         # word tokens, trained in-process
    python experiments/knowledge_capacity.py

training.fit trains a GPT on batches from these generators.
"""
import contextlib
import math
import time

import numpy as np
import torch

SYLLABLES = ("ka", "lo", "mi", "ra", "te", "su", "no", "vi", "da", "pe", "ri", "zo", "ba", "ku", "fe", "li",
             "mo", "ta", "ne", "go", "si", "ju", "we", "ha")
CITIES = ("paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "accra", "hanoi", "perth", "dakar",
          "riga", "sofia", "baku", "doha")
FACT_WORDS = ("<bos>", "<eot>", "lives", "in", "works", "for", ".", "?", "where", "does", "live", "the", "boss", "of")
ANSWER_MARK = "?"  # the answer follows the question's closing "?"
STYLES = ("where", "cloze", "induction")  # how facts and questions are worded (facts_questions)


class WordVocab:
    """Words <-> ids for generated text; id 0 is <bos>."""

    def __init__(self, words):
        self.words = list(dict.fromkeys(words))
        self.ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self):
        return len(self.words)

    def encode(self, words):
        return [self.ids[w] for w in words]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


# ----------------------------------------------------------------------------- facts: reason vs knowledge

def all_names():
    return [f"{a} {b}" for a in SYLLABLES for b in SYLLABLES if a != b]


def split_names(seed, held_out_fraction=0.2):
    """(training names, held-out names): disjoint, fixed by the seed."""
    names = all_names()
    order = np.random.default_rng(seed).permutation(len(names))
    n_held = int(len(names) * held_out_fraction)
    return [names[i] for i in order[n_held:]], [names[i] for i in order[:n_held]]


def facts_vocab():
    return WordVocab([*FACT_WORDS, *SYLLABLES, *CITIES])


def check_facts_settings(n_people, n_bosses, n_questions, n_cities):
    if n_people < 1:
        raise SystemExit(f"a facts document needs at least one person (n_people={n_people})")
    if not 1 <= n_cities <= len(CITIES):
        raise SystemExit(f"n_cities must be between 1 and {len(CITIES)}, got {n_cities}")
    if not 0 <= n_bosses < n_people:
        raise SystemExit(f"n_bosses={n_bosses} must be below n_people={n_people} (a boss is another person)")
    if not 1 <= n_questions <= n_people + n_bosses:
        raise SystemExit(f"n_questions={n_questions} must be between 1 and the number of facts ({n_people} homes + "
                         f"{n_bosses} bosses = {n_people + n_bosses}): a question is asked about a fact")


def facts_world(rng, names, n_people, n_bosses, n_cities):
    """People with a home each and n_bosses of them with a boss among the others: {home: {p: c}, boss: {p: q}}."""
    people = [names[i] for i in rng.choice(len(names), n_people, replace=False)]
    home = {p: CITIES[int(rng.integers(n_cities))] for p in people}
    workers = [people[i] for i in rng.choice(n_people, n_bosses, replace=False)]
    boss = {w: people[(people.index(w) + 1 + int(rng.integers(n_people - 1))) % n_people] for w in workers}
    return {"home": home, "boss": boss}


def fixed_world_document(rng, world, n_people, n_questions, with_facts=True, move_people=0, style="where"):
    """A document about n_people of a fixed world (their homes, and bosses inside the group); move_people > 0
    gives them fresh homes among the first move_people cities instead (the facts changed)."""
    people = [list(world["home"])[i] for i in rng.choice(len(world["home"]), n_people, replace=False)]
    home = {p: CITIES[int(rng.integers(move_people))] if move_people else world["home"][p] for p in people}
    sub = {"home": home, "boss": {w: b for w, b in world["boss"].items() if w in home and b in home}}
    return facts_document(rng, sub, min(n_questions, len(home) + len(sub["boss"])), with_facts, style)


def facts_questions(rng, world, n_questions, style="where"):
    """(question words, answer city, hops): 1-hop about homes, 2-hop through a boss.

    style "where" asks "where does X live ?"; "cloze" asks "? X lives in", the words that stand before the
    city in X's own fact (but "in" ends every fact: the lookup must match the name three and four tokens
    back); "induction" writes the relation first and the value right after the name ("lives X C .",
    "boss X B .") and asks "? lives X", so the question's last token is the name's, and the answer is
    one induction step (Olsson et al. 2022: find the earlier place where these tokens stood, read the
    token after them), the format in which experiments/loops.py's chains became learnable. Its 2-hop
    question "? lives boss X" needs two lookups in a row."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    asks = [(p, 1) for p in world["home"]] + [(w, 2) for w in world["boss"]]
    picked = [asks[i] for i in rng.choice(len(asks), n_questions, replace=False)]
    out = []
    for person, hops in picked:
        if style == "induction":
            question = f"? lives {person}" if hops == 1 else f"? lives boss {person}"
        else:
            asked = person if hops == 1 else f"the boss of {person}"
            question = f"? {asked} lives in" if style == "cloze" else f"where does {asked} live ?"
        answer = world["home"][person] if hops == 1 else world["home"][world["boss"][person]]
        out.append((question.split(), answer, hops))
    return out


def facts_document(rng, world, n_questions, with_facts=True, style="where"):
    """Words of one document and the (answer index, answer, hops) of each question in it."""
    words = ["<bos>"]
    if with_facts:
        if style == "induction":  # the relation first, the value right after the name
            facts = [f"lives {p} {c} .".split() for p, c in world["home"].items()]
            facts += [f"boss {w} {b} .".split() for w, b in world["boss"].items()]
        else:
            facts = [f"{p} lives in {c} .".split() for p, c in world["home"].items()]
            facts += [f"{w} works for {b} .".split() for w, b in world["boss"].items()]
        for i in rng.permutation(len(facts)):
            words += facts[i]
    answers = []
    for question, answer, hops in facts_questions(rng, world, n_questions, style):
        words += question
        answers.append((len(words), answer, hops))
        words += [answer, "."]
    return words + ["<eot>"], answers


def solve(words):
    """Answers to a document's questions read off its own facts (the check that generation is right)."""
    home, boss, answers, i = {}, {}, [], 0
    while i < len(words):
        if words[i:i + 3] == ["?", "lives", "boss"]:  # induction: ? lives boss X C .
            answers.append(home[boss[" ".join(words[i + 3:i + 5])]])
            i += 7
        elif words[i:i + 2] == ["?", "lives"]:  # induction: ? lives X C .
            answers.append(home[" ".join(words[i + 2:i + 4])])
            i += 6
        elif words[i] == "lives" and words[i + 4:i + 5] == ["."]:  # induction fact: lives X C .
            home[" ".join(words[i + 1:i + 3])] = words[i + 3]
            i += 5
        elif words[i] == "boss" and words[i + 5:i + 6] == ["."]:  # induction fact: boss X B .
            boss[" ".join(words[i + 1:i + 3])] = " ".join(words[i + 3:i + 5])
            i += 6
        elif words[i + 2:i + 4] == ["lives", "in"]:
            home[" ".join(words[i:i + 2])] = words[i + 4]
            i += 6
        elif words[i + 2:i + 4] == ["works", "for"]:
            boss[" ".join(words[i:i + 2])] = " ".join(words[i + 4:i + 6])
            i += 7
        elif words[i:i + 4] == ["?", "the", "boss", "of"]:  # cloze: ? the boss of X lives in C .
            answers.append(home[boss[" ".join(words[i + 4:i + 6])]])
            i += 10
        elif words[i] == "?":  # cloze: ? X lives in C .
            answers.append(home[" ".join(words[i + 1:i + 3])])
            i += 7
        elif words[i:i + 5] == ["where", "does", "the", "boss", "of"]:
            answers.append(home[boss[" ".join(words[i + 5:i + 7])]])
            i += 11
        elif words[i:i + 2] == ["where", "does"]:
            answers.append(home[" ".join(words[i + 2:i + 4])])
            i += 8
        else:
            i += 1
    return answers


# ----------------------------------------------------------------------------- bios: knowledge capacity

FIRST = ("anna", "ben", "cara", "dan", "eva", "finn", "gia", "hugo", "ida", "jon", "kai", "lea", "max", "nia", "otto",
         "pia", "quin", "rosa", "sam", "tara", "uma", "vic", "wes", "xia", "yan", "zoe", "abe", "bea", "cy", "dot",
         "eli", "fay", "gus", "hal", "ivy", "jay", "kim", "lou", "mae", "ned")
LAST = tuple(f"{a}{b}" for a in ("br", "cl", "dr", "gr", "kr", "pl", "st", "tr") for b in ("and", "ek", "ill", "ost", "um"))
ATTRIBUTES = {  # attribute -> (values, templates: the words before the value; NAME stands for the full name)
    "birth_city": (tuple(f"city{i}" for i in range(40)), ("NAME was born in", "NAME came into the world in",
                                                          "the birthplace of NAME is")),
    "birth_month": (("january", "february", "march", "april", "may", "june", "july", "august", "september",
                     "october", "november", "december"), ("NAME was born in the month of", "the birth month of NAME is")),
    "birth_year": (tuple(str(1950 + i) for i in range(40)), ("NAME was born in the year", "the birth year of NAME is")),
    "university": (tuple(f"uni{i}" for i in range(30)), ("NAME studied at", "NAME graduated from", "the university of NAME is")),
    "major": (tuple(f"major{i}" for i in range(20)), ("NAME majored in", "the field of NAME is")),
    "employer": (tuple(f"firm{i}" for i in range(40)), ("NAME works for", "NAME is employed by", "the employer of NAME is")),
}


def bios_vocab():
    words = ["<bos>", "<eot>", ".", *FIRST, *LAST]
    for values, templates in ATTRIBUTES.values():
        words += list(values) + [w for t in templates for w in t.split() if w != "NAME"]
    return WordVocab(words)


def bios_people(n_people, seed):
    """n_people distinct (first, middle, last) names (the middle name from the first names, as in Allen-Zhu
    & Li's) with their attribute values (indices), uniform and fixed by the seed."""
    n_names = len(FIRST) * len(FIRST) * len(LAST)
    if n_people < 1:
        raise SystemExit(f"n_people must be at least 1, got {n_people}")
    if n_people > n_names:
        raise SystemExit(f"n_people={n_people} exceeds the {n_names} distinct names")
    rng = np.random.default_rng(seed)
    names = [(FIRST[i // (len(FIRST) * len(LAST))], FIRST[i // len(LAST) % len(FIRST)], LAST[i % len(LAST)])
             for i in rng.choice(n_names, n_people, replace=False)]
    values = {a: rng.integers(len(v), size=n_people) for a, (v, _) in ATTRIBUTES.items()}
    return names, values


def bios_words(rng, names, values, people):
    """One exposure of each person's biography (a list of words each): every attribute once, a random
    template, a random order. The draws are made for the whole batch at once: a GPU step of a small
    model is shorter than rendering its batch one draw at a time."""
    attributes = list(ATTRIBUTES)
    order = rng.permuted(np.tile(np.arange(len(attributes)), (len(people), 1)), axis=1)  # (n, attributes)
    pick = rng.random((len(people), len(attributes)))
    docs = []
    for i, person in enumerate(people):
        name, words = list(names[person]), ["<bos>"]
        for j in order[i]:
            options, templates = ATTRIBUTES[attributes[j]]
            before, _, after = templates[int(pick[i, j] * len(templates))].partition("NAME")
            words += before.split() + name + after.split() + [options[values[attributes[j]][person]], "."]
        docs.append(words + ["<eot>"])
    return docs


def bits_of_knowledge(n_people, accuracy, loss_bits):
    """Bits stored per attribute, two ways (Allen-Zhu & Li 2024, sec. 2): from the cross-entropy of the
    value (loss_bits, over the attribute's candidate values: at most log2 D for a model that knows
    nothing) and from accuracy (the mutual information of a D-ary symmetric channel with that accuracy)."""
    out = {}
    for a, (values, _) in ATTRIBUTES.items():
        D, p = len(values), min(max(accuracy[a], 1e-12), 1 - 1e-12)
        by_loss = n_people * max(0.0, math.log2(D) - loss_bits[a])
        by_acc = n_people * max(0.0, math.log2(D) + p * math.log2(p) + (1 - p) * math.log2((1 - p) / (D - 1)))
        out[a] = {"values": D, "accuracy": accuracy[a], "loss_bits": loss_bits[a], "bits_by_loss": by_loss,
                  "bits_by_accuracy": by_acc}
    return out


@torch.no_grad()
def recall(model, vocab, names, values, device, template=0, batch=256):
    """Per attribute: accuracy and mean cross-entropy (bits) of the value after its template, over the
    attribute's candidate values only, for every person."""
    accuracy, loss_bits = {}, {}
    for a, (options, templates) in ATTRIBUTES.items():
        candidates = torch.tensor(vocab.encode(options), device=device)
        hits, bits = 0, 0.0
        for start in range(0, len(names), batch):
            rows = [vocab.encode(["<bos>", *templates[template % len(templates)].replace("NAME", " ".join(n)).split()])
                    for n in names[start:start + batch]]
            width = max(map(len, rows))
            idx = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)  # left-padded with <bos>
            logits = model(idx)[0][:, -1, candidates].float()  # (b, D)
            truth = torch.tensor(values[a][start:start + batch], device=device)
            hits += (logits.argmax(-1) == truth).sum().item()
            bits += torch.nn.functional.cross_entropy(logits, truth, reduction="sum").item() / math.log(2)
        accuracy[a], loss_bits[a] = hits / len(names), bits / len(names)
    return accuracy, loss_bits


# ----------------------------------------------------------------------------- training on generated batches

def pad_batch(docs, block_size, pad_id):
    """Inputs and targets (B, block_size) from word-id documents; padding targets are -1 (ignored).
    Filled in numpy: one torch.tensor per row cost more than a small model's GPU step."""
    x = np.full((len(docs), block_size), pad_id, dtype=np.int64)
    y = np.full((len(docs), block_size), -1, dtype=np.int64)
    for i, d in enumerate(docs):
        d = d[:block_size + 1]
        x[i, :len(d) - 1] = d[:-1]
        y[i, :len(d) - 1] = d[1:]
    return torch.from_numpy(x), torch.from_numpy(y)


def bios_batches(vocab, names, values, batch_size, block_size, seed):
    """next_batch(step) -> (x, y): batch_size fresh biographies of random people, the same for a seed and step."""
    def next_batch(step):
        rng = np.random.default_rng([seed, step])
        people = rng.integers(len(names), size=batch_size)
        return pad_batch([vocab.encode(words) for words in bios_words(rng, names, values, people)], block_size,
                         vocab.ids["<eot>"])
    return next_batch


# ----------------------------------------------------------------------------- text for prepare.py

def text_documents(kind, n_docs, seed, val_fraction):
    """{"train": documents, "val": documents} as text for prepare.py (--dataset=synthetic:facts or
    synthetic:bios). Facts validation documents name held-out people only; bios validation documents
    are fresh renderings of the same people (knowledge is the point there)."""
    rng = np.random.default_rng(seed)
    n_val = max(1, round(n_docs * val_fraction))
    if kind == "facts":
        train_names, held_names = split_names(seed)
        make = lambda names: " ".join(facts_document(rng, facts_world(rng, names, 4, 2, 8), 4)[0][1:-1])  # noqa: E731
        # prepare adds the end-of-text token itself, so <bos> and <eot> are dropped
        return {"train": [make(train_names) for _ in range(n_docs - n_val)], "val": [make(held_names) for _ in range(n_val)]}
    if kind == "bios":
        names, values = bios_people(max(1, n_docs // 10), seed)
        docs = [" ".join(words[1:-1]) for words in bios_words(rng, names, values, [i % len(names) for i in range(n_docs)])]
        return {"train": docs[n_val:], "val": docs[:n_val]}
    raise SystemExit(f"unknown synthetic corpus {kind!r}: use synthetic:facts or synthetic:bios")
