"""
Text -> token bins: data/<name>/train.bin, val.bin (uint16, or uint32 for large vocabularies) and meta.json.

    python prepare.py                                   # shakespeare_char, offline (the default)
    python prepare.py --dataset=shakespeare             # GPT-2 BPE, offline
    python prepare.py --dataset=path/to/folder --name=mine   # local .txt / .jsonl through `datasets`
    python prepare.py --dataset=tinystories             # Hugging Face, needs the internet

Documents are separated by the EOT token. A corpus that is one document (Tiny Shakespeare) is split
by position, the last val_fraction for validation; otherwise every k-th document goes to validation.
Bins are written in chunks to temp files and renamed at the end, so memory stays bounded and an
interrupted run leaves nothing half-written. An up-to-date output is not rebuilt.
"""
import datetime
import glob
import hashlib
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from configurator import configure, print_config
from tokenizer import ASSETS, CharTokenizer, GPT2Tokenizer

DEFAULTS = dict(
    dataset="shakespeare_char",  # a name below, or a path to a .txt/.jsonl file or a folder of them
    name="",                     # folder under data_dir; default: the dataset name (or the path's stem)
    tokenizer="",                # gpt2 | char; default: char for shakespeare_char, else gpt2
    data_dir="data",
    val_fraction=0.1,
    max_tokens=0,                # stop after this many tokens (0 = all); the fineweb-edu sample needs a cap
    text_field="text",           # the field holding the text in .jsonl files and HF datasets
    num_threads=8,               # tiktoken encode_ordinary_batch threads
    force=False,                 # rebuild even when the output is up to date
)

SHAKESPEARE = os.path.join(ASSETS, "tinyshakespeare", "input.txt")
HF_DATASETS = {  # name -> load_dataset arguments (streamed: the corpora are large)
    "tinystories": dict(path="roneneldan/TinyStories", split="train"),
    "wikitext103": dict(path="wikitext", name="wikitext-103-raw-v1", split="train"),
    "fineweb-edu": dict(path="HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train"),
}
BATCH_DOCS = 1024  # documents tokenized per batch


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


def load_local(files, text_field):
    """An iterable of document strings from local files, through `datasets`: one .txt file is one
    document; each .jsonl line is one document."""
    from datasets import load_dataset
    if files[0].endswith(".txt"):
        ds = load_dataset("text", data_files=files, sample_by="document", split="train")
    else:
        ds = load_dataset("json", data_files=files, split="train")
        if text_field not in ds.column_names:
            raise SystemExit(f"{files[0]}: no field {text_field!r} (fields: {ds.column_names}); set --text_field")
    return (row[text_field] for row in ds), len(ds)


def load_hub(name, text_field):
    from datasets import load_dataset
    try:
        ds = load_dataset(**HF_DATASETS[name], streaming=True)
        first = next(iter(ds))
    except Exception as e:
        raise SystemExit(f"cannot load {HF_DATASETS[name]['path']} from the Hugging Face hub "
                         f"({type(e).__name__}: {str(e)[:200]}).\nThis needs the internet; offline, use "
                         f"--dataset=shakespeare or a local file/folder.")
    if text_field not in first:
        raise SystemExit(f"{name}: no field {text_field!r} (fields: {list(first)})")
    return (row[text_field] for row in ds), None


def resolve_source(cfg):
    """(documents iterable, document count or None, tokenizer, output name, provenance dict)."""
    dataset = cfg["dataset"]
    tok_name = cfg["tokenizer"] or ("char" if dataset == "shakespeare_char" else "gpt2")
    if tok_name not in ("gpt2", "char"):
        raise SystemExit(f"tokenizer must be gpt2 or char, got {tok_name!r}")
    if dataset in ("shakespeare", "shakespeare_char"):
        files, name = [SHAKESPEARE], dataset
    elif dataset in HF_DATASETS:
        if tok_name == "char":
            raise SystemExit("a character tokenizer needs the whole corpus up front; use it with local data")
        docs, count = load_hub(dataset, cfg["text_field"])
        return docs, count, GPT2Tokenizer(), cfg["name"] or dataset, {"source": f"hf:{HF_DATASETS[dataset]}"}
    else:
        files = local_files(dataset)
        name = cfg["name"] or os.path.splitext(os.path.basename(os.path.normpath(dataset)))[0]
    check_utf8(files)
    provenance = {"source": [os.path.relpath(f) for f in files], "source_sha256": sha256_of(files)}
    if dataset in ("shakespeare", "shakespeare_char"):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            text = f.read()
        docs, count = [text], 1
    else:
        docs, count = load_local(files, cfg["text_field"])
    if tok_name == "char":
        docs = list(docs)
        tokenizer = CharTokenizer(sorted(set("".join(docs))))
    else:
        tokenizer = GPT2Tokenizer()
    return docs, count, tokenizer, cfg["name"] or name, provenance


def batches(iterable, n):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def write_bins(docs, doc_count, tokenizer, out_dir, val_fraction, max_tokens, num_threads):
    """Tokenize documents into train.bin/val.bin temp files; return token counts and dtype name."""
    dtype = np.uint16 if tokenizer.n_vocab <= 2 ** 16 else np.uint32
    paths = {split: os.path.join(out_dir, f"{split}.bin.tmp") for split in ("train", "val")}
    files = {split: open(p, "wb") for split, p in paths.items()}
    counts = {"train": 0, "val": 0}
    every = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
    doc_index, total = 0, 0
    bar = tqdm(total=doc_count, unit="doc", desc="tokenizing")
    try:
        for batch in batches(docs, BATCH_DOCS):
            for ids in tokenizer.encode_batch(batch, num_threads=num_threads):
                ids.append(tokenizer.eot)
                arr = np.array(ids, dtype=dtype)
                if doc_count == 1:  # one document: split by position
                    n_val = int(len(arr) * val_fraction)
                    parts = {"train": arr[:len(arr) - n_val], "val": arr[len(arr) - n_val:]}
                else:
                    parts = {"val" if every and doc_index % every == every - 1 else "train": arr}
                for split, part in parts.items():
                    part.tofile(files[split])
                    counts[split] += len(part)
                doc_index += 1
                total += len(arr)
            bar.update(len(batch))
            bar.set_postfix(tokens=total)
            if max_tokens and total >= max_tokens:
                break
    finally:
        bar.close()
        for f in files.values():
            f.close()
    return counts, dtype.__name__, doc_index


def prepare(cfg):
    """Build data/<name>/ from cfg (the DEFAULTS keys); returns the output folder."""
    docs, doc_count, tokenizer, name, provenance = resolve_source(cfg)
    out_dir = os.path.join(cfg["data_dir"], name)
    meta_path = os.path.join(out_dir, "meta.json")
    recipe = {"dataset": cfg["dataset"], "tokenizer": tokenizer.name, "val_fraction": cfg["val_fraction"],
              "max_tokens": cfg["max_tokens"], **provenance}
    if not cfg["force"] and os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("recipe") == recipe and all(os.path.exists(os.path.join(out_dir, f"{s}.bin")) for s in ("train", "val")):
            print(f"{out_dir} is up to date ({old['train_tokens']:,} train / {old['val_tokens']:,} val tokens); --force=True rebuilds")
            return out_dir
    os.makedirs(out_dir, exist_ok=True)
    counts, dtype, n_docs = write_bins(docs, doc_count, tokenizer, out_dir, cfg["val_fraction"],
                                       cfg["max_tokens"], cfg["num_threads"])
    if counts["train"] <= 1 or (cfg["val_fraction"] > 0 and counts["val"] <= 1):
        for split in ("train", "val"):
            os.remove(os.path.join(out_dir, f"{split}.bin.tmp"))
        raise SystemExit(f"{cfg['dataset']}: too little text ({counts['train']} train / {counts['val']} val tokens "
                         f"from {n_docs} documents); is the input empty?")
    for split in ("train", "val"):
        os.replace(os.path.join(out_dir, f"{split}.bin.tmp"), os.path.join(out_dir, f"{split}.bin"))
    meta = {**tokenizer.meta(), "vocab_size": tokenizer.n_vocab, "eot": tokenizer.eot, "dtype": dtype,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "documents": n_docs,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "recipe": recipe}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out_dir}: {counts['train']:,} train / {counts['val']:,} val tokens, vocab {tokenizer.n_vocab}, {dtype}")
    return out_dir


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    prepare(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
