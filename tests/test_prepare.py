import json

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
