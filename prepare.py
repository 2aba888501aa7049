"""
Text -> token bins: data/<name>/train.bin, val.bin (uint16, or uint32 for large vocabularies) and meta.json.

    python prepare.py                                   # shakespeare_char, offline (the default)
    python prepare.py --dataset=shakespeare             # GPT-2 BPE, offline
    python prepare.py --dataset=path/to/folder --name=mine   # local .txt / .jsonl files
    python prepare.py --dataset=tinystories             # Hugging Face, needs the internet

Documents are separated by the EOT token. A named hub dataset with a validation split of its own
(TinyStories, WikiText) uses it; otherwise validation is carved from the documents: a corpus that is
one document (Tiny Shakespeare) is split by position, the last val_fraction for validation, and
else every k-th document goes to validation, k = 1/val_fraction or the number of documents if that
is smaller, so a folder of 2 documents still has one for validation. WikiText's rows are lines:
they are grouped into articles (an article opens with a ` = Title = ` line).

Nothing half-written survives: bins are written in chunks to temp files and renamed at the end (memory
stays bounded), meta.json is removed before the renames and written atomically after them, so new bins
never pair with old meta. Local files are read directly, not through the `datasets` cache, which keys
files by name and modification time and could serve old text. An up-to-date output is not rebuilt.
"""
import datetime
import errno
import glob
import hashlib
import json
import os
import re
import sys

import numpy as np

from checkpoint import write_json_atomic
from configurator import configure, print_config
from runtime import claim_out_dir, progress
from tokenizer import ASSETS, CharTokenizer, GPT2Tokenizer

DEFAULTS = dict(
    dataset="shakespeare_char",  # a name below, or a path to a .txt/.jsonl file or a folder of them
    name="",                     # folder under data_dir; default: the dataset name (or the path's stem)
    tokenizer="",                # gpt2 | char; default: char for shakespeare_char, else gpt2
    data_dir="data",
    val_fraction=0.1,            # in (0, 1); unused where a hub dataset has its own validation split
    max_tokens=0,                # stop each split after this many tokens (0 = all); the fineweb-edu sample needs a cap
    text_field="text",           # the field holding the text in .jsonl files and HF datasets
    num_threads=8,               # tiktoken encode_ordinary_batch threads
    force=False,                 # rebuild even when the output is up to date
    synthetic_docs=20000,        # --dataset=synthetic:facts|bios: documents to generate (synthetic.py)
    seed=1337,                   # the generator's seed
)

SHAKESPEARE = os.path.join(ASSETS, "tinyshakespeare", "input.txt")
HF_DATASETS = {  # name -> load_dataset arguments (streamed: the corpora are large), its validation split, row kind
    "tinystories": dict(path="roneneldan/TinyStories", val_split="validation"),
    "wikitext103": dict(path="wikitext", name="wikitext-103-raw-v1", val_split="validation", rows="lines"),
    "fineweb-edu": dict(path="HuggingFaceFW/fineweb-edu", name="sample-10BT"),
}
BATCH_DOCS = 1024  # documents tokenized per batch
WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")  # " = Title = " opens an article; " = = Section = = " does not


def sha256_of(paths):
    h = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def local_files(path):
    """The .txt/.jsonl files a path names, or SystemExit."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True)
                       + glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True))
        if not files:
            raise SystemExit(f"no .txt or .jsonl files in folder {path}")
        kinds = {os.path.splitext(f)[1] for f in files}
        if len(kinds) > 1:
            raise SystemExit(f"folder {path} mixes .txt and .jsonl files: use one kind per dataset")
        return files
    if os.path.isfile(path):
        if os.path.splitext(path)[1] not in (".txt", ".jsonl", ".json"):
            raise SystemExit(f"{path}: expected a .txt or .jsonl file")
        return [path]
    raise SystemExit(f"dataset {path!r} is neither a known name ({', '.join(['shakespeare', 'shakespeare_char', *HF_DATASETS])}) "
                     f"nor an existing file or folder")


def check_utf8(files):
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it first, "
                             f"e.g. iconv -f latin1 -t utf-8")


def jsonl_documents(files, text_field):
    """Each non-blank line's text_field; a broken line is an error naming its file and line."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{number}: not a JSON line ({e.msg}); fix or remove that line")
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    fields = list(row) if isinstance(row, dict) else type(row).__name__
                    raise SystemExit(f"{path}:{number}: no text field {text_field!r} (found {fields}); "
                                     f"set --text_field or fix that line")
                yield row[text_field]


def load_local(files, text_field):
    """(documents, count) from local files, read directly: one .txt file is one document, each .jsonl line one."""
    if files[0].endswith(".txt"):
        def texts():
            for path in files:
                with open(path, encoding="utf-8") as f:
                    yield f.read()
        return texts(), len(files)
    count = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            count += sum(1 for line in f if line.strip())
    return jsonl_documents(files, text_field), count


def wikitext_articles(rows):
    """WikiText's rows are lines; an article is a ` = Title = ` line and the lines up to the next one."""
    article = []
    for row in rows:
        if WIKITEXT_TITLE.match(row.rstrip("\n")) and any(line.strip() for line in article):
            yield "".join(article)
            article = []
        article.append(row)
    if any(line.strip() for line in article):
        yield "".join(article)


def load_hub(name, text_field):
    """[(split or None, documents)] of a named hub dataset, streamed; None: carve val out of these documents."""
    from datasets import load_dataset
    spec = HF_DATASETS[name]
    args = {k: spec[k] for k in ("path", "name") if k in spec}
    splits = {"train": "train", "val": spec["val_split"]} if "val_split" in spec else {None: "train"}
    streams = []
    for split, hub_split in splits.items():
        try:
            ds = load_dataset(**args, split=hub_split, streaming=True)
            first = next(iter(ds))
        except Exception as e:
            raise SystemExit(f"cannot load {spec['path']} ({hub_split} split) from the Hugging Face hub "
                             f"({type(e).__name__}: {str(e)[:200]}).\nThis needs the internet; offline, use "
                             f"--dataset=shakespeare or a local file/folder.")
        if text_field not in first:
            raise SystemExit(f"{name}: no field {text_field!r} (fields: {list(first)}); set --text_field")
        texts = (row[text_field] for row in ds)
        streams.append((split, wikitext_articles(texts) if spec.get("rows") == "lines" else texts, None))
    return streams


def resolve_source(cfg):
    """([(split or None, documents, count or None)], tokenizer, output name, provenance dict)."""
    dataset = cfg["dataset"]
    tok_name = cfg["tokenizer"] or ("char" if dataset == "shakespeare_char" or dataset.startswith("synthetic:") else "gpt2")
    if tok_name not in ("gpt2", "char"):
        raise SystemExit(f"tokenizer must be gpt2 or char, got {tok_name!r}")
    if dataset.startswith("synthetic:"):  # generated offline; validation documents hold only held-out people
        from synthetic import text_documents
        splits = text_documents(dataset.split(":", 1)[1], cfg["synthetic_docs"], cfg["seed"], cfg["val_fraction"])
        text = "".join(d for docs in splits.values() for d in docs)
        tokenizer = CharTokenizer(sorted(set(text))) if tok_name == "char" else GPT2Tokenizer()
        return [(split, docs, len(docs)) for split, docs in splits.items()], tokenizer, \
            cfg["name"] or dataset.replace(":", "_"), {"source": dataset, "synthetic_docs": cfg["synthetic_docs"], "seed": cfg["seed"]}
    if dataset in ("shakespeare", "shakespeare_char"):
        files, name = [SHAKESPEARE], dataset
    elif dataset in HF_DATASETS:
        if tok_name == "char":
            raise SystemExit("a character tokenizer needs the whole corpus up front; use it with local data")
        return (load_hub(dataset, cfg["text_field"]), GPT2Tokenizer(), cfg["name"] or dataset,
                {"source": f"hf:{HF_DATASETS[dataset]}"})
    else:
        files = local_files(dataset)
        name = cfg["name"] or os.path.splitext(os.path.basename(os.path.normpath(dataset)))[0]
    check_utf8(files)
    provenance = {"source": [os.path.relpath(f) for f in files], "source_sha256": sha256_of(files)}
    docs, count = load_local(files, cfg["text_field"])
    if tok_name == "char":
        docs = list(docs)
        tokenizer = CharTokenizer(sorted(set("".join(docs))))
    else:
        tokenizer = GPT2Tokenizer()
    return [(None, docs, count)], tokenizer, cfg["name"] or name, provenance


def batches(iterable, n):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def write_bins(streams, tokenizer, out_dir, val_fraction, max_tokens, num_threads):
    """Tokenize each stream of documents into train.bin/val.bin temp files; return token counts, dtype name
    and document count. A stream with split None is carved: by position if it is one document, else
    every k-th document to val. The temp files are removed if anything goes wrong."""
    dtype = np.uint16 if tokenizer.n_vocab <= 2 ** 16 else np.uint32
    paths = {split: os.path.join(out_dir, f"{split}.bin.tmp") for split in ("train", "val")}
    files = {split: open(p, "wb") for split, p in paths.items()}
    counts = {"train": 0, "val": 0}
    n_docs = 0
    try:
        for split, docs, doc_count in streams:
            every = max(2, round(1 / val_fraction))
            if doc_count and doc_count > 1:
                every = min(every, doc_count)  # at least one validation document
            doc_index, total = 0, 0
            with progress(doc_count, f"tokenizing {split or 'train+val'}", "doc") as bar:
                for batch in batches(docs, BATCH_DOCS):
                    for ids in tokenizer.encode_batch(batch, num_threads=num_threads):
                        ids.append(tokenizer.eot)
                        arr = np.array(ids, dtype=dtype)
                        if split is None and doc_count == 1:  # one document: split by position
                            n_val = int(len(arr) * val_fraction)
                            parts = {"train": arr[:len(arr) - n_val], "val": arr[len(arr) - n_val:]}
                        elif split is None:
                            parts = {"val" if doc_index % every == every - 1 else "train": arr}
                        else:
                            parts = {split: arr}
                        for part_split, part in parts.items():
                            part.tofile(files[part_split])
                            counts[part_split] += len(part)
                        doc_index += 1
                        total += len(arr)
                    bar.update(len(batch))
                    bar.set_postfix(tokens=total)
                    if max_tokens and total >= max_tokens:
                        break
            n_docs += doc_index
    except BaseException:
        for f in files.values():
            f.close()
        for path in paths.values():
            os.remove(path)
        raise
    for f in files.values():
        f.close()
    return counts, dtype.__name__, n_docs


def up_to_date(out_dir, recipe):
    """The old meta.json if out_dir already holds this recipe's output, else None (a broken meta: rebuild)."""
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError):
        print(f"{meta_path} is unreadable: rebuilding")
        return None
    bins = all(os.path.exists(os.path.join(out_dir, f"{s}.bin")) for s in ("train", "val"))
    return old if old.get("recipe") == recipe and bins else None


def prepare(cfg):
    """Build data/<name>/ from cfg (the DEFAULTS keys); returns the output folder."""
    try:
        return build(cfg)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: prepare.py wrote nothing (an existing output folder is unchanged)") from None
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise SystemExit(f"prepare.py cannot write {e.filename}: {e.strerror}. Give a --data_dir you may write "
                         f"to (an existing output folder is unchanged)") from None


def build(cfg):
    if not 0 < cfg["val_fraction"] < 1:
        raise SystemExit(f"val_fraction must be between 0 and 1 (exclusive), got {cfg['val_fraction']}")
    if cfg["max_tokens"] < 0 or cfg["num_threads"] < 1:
        raise SystemExit(f"max_tokens must be >= 0 and num_threads >= 1, got {cfg['max_tokens']} and "
                         f"{cfg['num_threads']}")
    streams, tokenizer, name, provenance = resolve_source(cfg)
    out_dir = os.path.join(cfg["data_dir"], name)
    meta_path = os.path.join(out_dir, "meta.json")
    recipe = {"dataset": cfg["dataset"], "tokenizer": tokenizer.name, "val_fraction": cfg["val_fraction"],
              "max_tokens": cfg["max_tokens"], **provenance}
    old = None if cfg["force"] else up_to_date(out_dir, recipe)
    if old:
        print(f"{out_dir} is up to date ({old['train_tokens']:,} train / {old['val_tokens']:,} val tokens); "
              f"--force=True rebuilds")
        return out_dir
    lock = claim_out_dir(out_dir, resuming=True, option="--data_dir")  # one prepare per data folder
    try:
        counts, dtype, n_docs = write_bins(streams, tokenizer, out_dir, cfg["val_fraction"], cfg["max_tokens"],
                                           cfg["num_threads"])
        if counts["train"] <= 1 or counts["val"] <= 1:
            for split in ("train", "val"):
                os.remove(os.path.join(out_dir, f"{split}.bin.tmp"))
            raise SystemExit(f"{cfg['dataset']}: too little text ({counts['train']} train / {counts['val']} val "
                             f"tokens from {n_docs} documents); is the input empty?")
        if os.path.exists(meta_path):
            os.remove(meta_path)  # never let new bins pair with the old meta, even if we are killed below
        for split in ("train", "val"):
            os.replace(os.path.join(out_dir, f"{split}.bin.tmp"), os.path.join(out_dir, f"{split}.bin"))
        meta = {**tokenizer.meta(), "vocab_size": tokenizer.n_vocab, "eot": tokenizer.eot, "dtype": dtype,
                "train_tokens": counts["train"], "val_tokens": counts["val"], "documents": n_docs,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "recipe": recipe}
        write_json_atomic(meta_path, meta)
    finally:
        lock.close()
    print(f"wrote {out_dir}: {counts['train']:,} train / {counts['val']:,} val tokens, vocab {tokenizer.n_vocab}, {dtype}")
    return out_dir


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    prepare(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
