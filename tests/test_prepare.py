import json
import os

import numpy as np
import pytest

import prepare
from configurator import configure
from tokenizer import tokenizer_from_meta


def run_prepare(tmp_path, dataset, *args):
    cfg = configure(prepare.DEFAULTS, [f"--dataset={dataset}", f"--data_dir={tmp_path / 'data'}", *args])
    return prepare.prepare(cfg)


def read_split(folder, split, meta):
    return np.fromfile(folder + f"/{split}.bin", dtype=meta["dtype"]).tolist()


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_folder_round_trips_with_eot_between_documents(tmp_path, tokenizer):
    docs = [f"Document {i}: héllo wörld, it's {i * 7} o'clock.\nSecond line." for i in range(10)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    out = run_prepare(tmp_path, folder, f"--tokenizer={tokenizer}", "--name=c")
    meta = json.load(open(out + "/meta.json"))
    tok = tokenizer_from_meta(meta)
    train, val = read_split(out, "train", meta), read_split(out, "val", meta)
    eot = tok.decode([tok.eot])
    # val_fraction 0.1 with 10 documents: the 10th document is the validation split
    assert tok.decode(train) == "".join(d + eot for d in docs[:9])
    assert tok.decode(val) == docs[9] + eot
    assert meta["train_tokens"] == len(train) and meta["documents"] == 10 and len(meta["recipe"]["source_sha256"]) == 64


def test_jsonl_rows_are_documents(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    out = run_prepare(tmp_path, f)
    meta = json.load(open(out + "/meta.json"))
    assert meta["documents"] == 20 and meta["val_tokens"] > 0


def test_shakespeare_char_is_offline_and_split_by_position(tmp_path):
    out = run_prepare(tmp_path, "shakespeare_char")
    meta = json.load(open(out + "/meta.json"))
    assert meta["vocab_size"] == 66 and meta["train_tokens"] == 1003856
    assert tokenizer_from_meta(meta).decode(read_split(out, "train", meta)[:11]) == "First Citiz"


def test_up_to_date_output_is_not_rebuilt(tmp_path, capsys):
    f = tmp_path / "a.txt"
    f.write_text("some text to tokenize, long enough.\n" * 20)
    out = run_prepare(tmp_path, f)
    mtime = (tmp_path / "data" / "a" / "train.bin").stat().st_mtime_ns
    run_prepare(tmp_path, f)
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "data" / "a" / "train.bin").stat().st_mtime_ns == mtime
    f.write_text("changed text\n" * 40)
    run_prepare(tmp_path, f)
    assert json.load(open(out + "/meta.json"))["train_tokens"] < 400


def test_empty_input_is_a_clear_error_and_writes_no_bins(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    with pytest.raises(SystemExit, match="too little text"):
        run_prepare(tmp_path, f)
    assert not (tmp_path / "data" / "empty" / "train.bin").exists()


def test_non_utf8_input_is_a_clear_error(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="not UTF-8"):
        run_prepare(tmp_path, f)


def test_missing_path_names_the_known_datasets(tmp_path):
    with pytest.raises(SystemExit, match="neither a known name.*shakespeare"):
        run_prepare(tmp_path, tmp_path / "nope.txt")


def test_hub_dataset_offline_says_it_needs_the_internet(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="needs the internet"):
        run_prepare(tmp_path, "tinystories")


def test_gpt2_tokenizer_falls_back_to_vendored_files_offline(monkeypatch, tmp_path):
    import socket

    import tiktoken.registry

    import tokenizer
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings loaded by earlier tests

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # a cache without the GPT-2 files
    tok = tokenizer.GPT2Tokenizer()
    assert tok.encode("hello world") == [31373, 995] and tok.n_vocab == 50257


def decoded(out):
    meta = json.load(open(out + "/meta.json"))
    tok = tokenizer_from_meta(meta)
    return tok.decode(read_split(out, "train", meta)), tok.decode(read_split(out, "val", meta)), tok.decode([tok.eot])


def test_a_changed_source_is_rebuilt_even_with_the_same_mtime(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"old row {i}"}) + "\n" for i in range(20)))
    run_prepare(tmp_path, f)
    stat = f.stat()
    f.write_text("".join(json.dumps({"text": f"NEW row {i}"}) + "\n" for i in range(20)))  # same size
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    train, val, _ = decoded(run_prepare(tmp_path, f))
    assert "NEW row 0" in train and "old" not in train + val
    train, val, _ = decoded(run_prepare(tmp_path, f, "--force=True"))
    assert "NEW row 0" in train and "old" not in train + val


@pytest.mark.parametrize("n_docs", [2, 3, 9])
def test_small_folders_give_validation_at_least_one_document(tmp_path, n_docs):
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(n_docs):
        (folder / f"{i}.txt").write_text(f"document number {i} with a few words in it.")
    train, val, eot = decoded(run_prepare(tmp_path, folder))
    assert val == f"document number {n_docs - 1} with a few words in it." + eot
    assert train.count(eot) == n_docs - 1


@pytest.mark.parametrize("line, phrase", [("{not json", r"d\.jsonl:3: not a JSON line"),
                                          ('{"txt": "oops"}', r"d\.jsonl:3: no text field 'text'"),
                                          ('["a list"]', r"d\.jsonl:3: no text field 'text'")])
@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_a_broken_jsonl_line_names_file_and_line_and_leaves_nothing(tmp_path, line, phrase, tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "one"}) + "\n\n" + line + "\n" + json.dumps({"text": "two"}) + "\n")
    with pytest.raises(SystemExit, match=phrase):
        run_prepare(tmp_path, f, f"--tokenizer={tokenizer}")
    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.name != ".lock"]


def test_ctrl_c_during_prepare_is_a_clean_message_and_keeps_the_old_output(tmp_path, monkeypatch):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    out = run_prepare(tmp_path, f)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data" / "d").iterdir()}
    f.write_text("".join(json.dumps({"text": f"other row {i}"}) + "\n" for i in range(20)))

    real_batches = prepare.batches

    def interrupted(docs, n):
        yield next(real_batches(docs, 2))
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "batches", interrupted)
    with pytest.raises(SystemExit, match="interrupted: prepare.py wrote nothing"):
        run_prepare(tmp_path, f)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data" / "d").iterdir()} == before
    assert decoded(out)[0].startswith("row 0")


def test_new_bins_never_pair_with_old_meta(tmp_path, monkeypatch):
    from data import open_dataset
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    run_prepare(tmp_path, f)
    f.write_text("".join(json.dumps({"text": f"a longer row {i}"}) + "\n" for i in range(20)))

    def killed(path, obj):
        raise SystemExit("killed between the bin renames and the meta write")
    monkeypatch.setattr(prepare, "write_json_atomic", killed)
    with pytest.raises(SystemExit, match="killed"):
        run_prepare(tmp_path, f)
    with pytest.raises(SystemExit, match="meta.json is missing .*--force=True"):
        open_dataset(str(tmp_path / "data"), "d", 4)


def test_a_broken_meta_says_what_to_do_and_prepare_rebuilds_it(tmp_path):
    from data import open_dataset
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    out = run_prepare(tmp_path, f)
    open(out + "/meta.json", "w").close()  # killed mid-write by an older version
    with pytest.raises(SystemExit, match="meta.json is unreadable .*rebuild it with python prepare.py.*--force=True"):
        open_dataset(str(tmp_path / "data"), "d", 4)
    run_prepare(tmp_path, f)
    assert open_dataset(str(tmp_path / "data"), "d", 4)["documents"] == 20


def hub_fixture(folder, config, splits, rows):
    """A local dataset folder laid out as on the hub (parquet per split, configs in README.md): load_dataset
    reads it the way it reads the hub's, so the hub code path runs offline."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    sub = folder / (config or "data")
    sub.mkdir(parents=True)
    if config:
        (folder / "README.md").write_text("---\nconfigs:\n- config_name: " + config + "\n  data_files:\n" + "".join(
            f"  - split: {s}\n    path: {config}/{s}-*\n" for s in splits) + "---\n")
    for split in splits:
        pq.write_table(pa.table({"text": rows(split)}), sub / f"{split}-00000-of-00001.parquet")


def wikitext_rows(split):
    """WikiText-103's raw rows: lines, an article opened by ' = Title = ', sections by ' = = Section = = '."""
    rows = []
    for a in range(3):
        rows += ["", f" = {split} article {a} = \n", "", f" First paragraph of {a} . \n", "",
                 " = = Section = = \n", "", f" More about {a} . \n"]
    return rows


def test_wikitext_rows_are_grouped_into_articles_and_its_own_validation_split_is_used(tmp_path, monkeypatch):
    hub_fixture(tmp_path / "wikitext", "wikitext-103-raw-v1", ["train", "validation", "test"], wikitext_rows)
    monkeypatch.setitem(prepare.HF_DATASETS, "wikitext103",
                        prepare.HF_DATASETS["wikitext103"] | {"path": str(tmp_path / "wikitext")})
    train, val, eot = decoded(run_prepare(tmp_path, "wikitext103"))
    articles = train.split(eot)[:-1]
    assert len(articles) == 3 and all(a.startswith(" = train article") for a in articles)
    assert " = = Section = = \n" in articles[0] and "More about 0" in articles[0]
    assert val.count(eot) == 3 and "validation article 2" in val and "train" not in val and "test" not in train + val


def test_tinystories_uses_its_own_validation_split(tmp_path, monkeypatch):
    hub_fixture(tmp_path / "tinystories", None, ["train", "validation"],
                lambda split: [f"Once upon a time ({split} story {i}), a fox." for i in range(5)])
    monkeypatch.setitem(prepare.HF_DATASETS, "tinystories",
                        prepare.HF_DATASETS["tinystories"] | {"path": str(tmp_path / "tinystories")})
    train, val, eot = decoded(run_prepare(tmp_path, "tinystories"))
    assert train.count(eot) == 5 and "validation" not in train
    assert val.count(eot) == 5 and "train story" not in val
