import json
import os

import pytest
import torch

import train
from checkpoint import knn_store_dir, load_checkpoint, load_knn_store, load_model, save_knn_store
from conftest import tiny_train_config
from architecture import build_model
from memory import KNNStore, MemoryConfig, ProductKeyMemory, knn_stores, memorize
from model import norm
from training import distill_kl, make_optimizers

PKM = dict(memory="pkm", memory_slots=256, memory_heads=2, memory_key_dim=16, memory_topk=4)
KNN = dict(memory="knn", memory_topk=4, knn_capacity=512, knn_key_dim=16)


def tiny_memory_model(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32, memory_layers=[1]) | kw
    return build_model(args).eval()


def metrics(cfg):
    with open(os.path.join(cfg["out_dir"], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_pkm_layer_keeps_shapes_and_holds_the_value_table():
    model = tiny_memory_model(**PKM)
    assert isinstance(model.blocks[1].ffn, ProductKeyMemory)
    assert model(torch.randint(0, 50, (2, 7)))[0].shape == (2, 7, 50)  # the real vocabulary, no padding
    assert model.blocks[1].ffn.values.weight.shape == (256, 32)


def test_pkm_topk_equals_brute_force_over_all_slots():
    torch.manual_seed(0)
    layer = ProductKeyMemory(MemoryConfig(**PKM | dict(memory_slots=64 ** 2, memory_topk=8)), 32)
    x = torch.randn(3, 5, 32)
    scores, index = layer.lookup(x)  # (15, heads, k)
    q = norm(layer.query(x).view(15, 2, 2, 8))
    half = torch.einsum("bhsd,hsnd->bhsn", q, layer.keys)  # (15, heads, 2, 64)
    every_slot = (half[:, :, 0, :, None] + half[:, :, 1, None, :]).flatten(2)  # (15, heads, 4096)
    brute_scores, brute_index = every_slot.topk(8, dim=-1)
    assert torch.allclose(scores, brute_scores, atol=1e-5)
    assert torch.equal(index.sort(-1).values, brute_index.sort(-1).values)


def test_sparse_value_gradients_touch_only_the_rows_read():
    model = tiny_memory_model(**PKM)
    layer = model.blocks[1].ffn
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    idx = torch.randint(0, 50, (2, 6))
    model(idx, idx)[1].backward()
    grad = layer.values.weight.grad
    assert grad.is_sparse
    touched = set(grad.coalesce().indices()[0].tolist())
    read = set(layer.lookup(seen[0])[1].flatten().tolist())
    assert touched == read and len(touched) < 256


def test_memory_values_train_with_sparse_adam_at_a_higher_lr():
    model = tiny_memory_model(**PKM)
    values = model.blocks[1].ffn.values.weight
    adamw, sparse = make_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", memory_lr_scale=10.0)
    assert isinstance(sparse, torch.optim.SparseAdam) and sparse.param_groups[0]["params"] == [values]
    assert sparse.param_groups[0]["lr_scale"] == 10.0
    assert all(p is not values for g in adamw.param_groups for p in g["params"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_dense_memory_values_get_an_undecayed_group_at_a_higher_lr(optimizer):
    model = tiny_memory_model(**PKM | dict(memory_sparse=False))
    opt, sparse = make_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", optimizer=optimizer, memory_lr_scale=10.0)
    group = next(g for g in opt.param_groups if any(p is model.blocks[1].ffn.values.weight for p in g["params"]))
    assert group["params"] == [model.blocks[1].ffn.values.weight]
    assert group["lr_scale"] == 10.0 and group["weight_decay"] == 0.0
    assert sparse is None


def test_knn_search_equals_brute_force_across_chunks():
    torch.manual_seed(0)
    store = KNNStore(capacity=1000, key_dim=8, value_dim=4, threshold=0.0, chunk=64)
    store.write(torch.nn.functional.normalize(torch.randn(300, 8), dim=-1), torch.randn(300, 4))
    queries = torch.randn(10, 8)
    scores, index = store.search(queries, 5)
    brute_scores, brute_index = (queries @ store.keys.T).topk(5, dim=-1)
    assert torch.allclose(scores, brute_scores) and torch.equal(index, brute_index)


def test_knn_write_skips_keys_already_stored():
    store = KNNStore(capacity=100, key_dim=4, value_dim=2, threshold=0.1)
    keys = torch.eye(4)
    store.write(keys, torch.ones(4, 2))
    store.write(torch.cat((keys[:2], keys[:1])), torch.zeros(3, 2))  # all near-duplicates
    assert len(store) == 4 and torch.equal(store.values, torch.ones(4, 2))


def test_knn_store_evicts_the_least_recently_used_pair():
    store = KNNStore(capacity=3, key_dim=4, value_dim=1, threshold=0.1)
    keys = torch.eye(4)
    store.write(keys[:3], torch.arange(3.0)[:, None])
    store.touch(store.search(torch.stack((keys[0], keys[2])), 1)[1])  # pairs 0 and 2 were read; 1 was not
    store.write(keys[3:], torch.tensor([[3.0]]))
    assert sorted(store.values.flatten().tolist()) == [0.0, 2.0, 3.0]


def test_knn_store_round_trips_through_disk_and_can_be_swapped(tmp_path):
    model = tiny_memory_model(**KNN)
    prompt = torch.randint(0, 50, (1, 12))
    memorize(model, torch.randint(0, 50, (4, 20)))
    store = knn_stores(model)[1]
    before = model(prompt)[0]
    save_knn_store(store, str(tmp_path / "a"))
    clock, keys = store.clock, store.keys.clone()
    store.clear()
    assert not torch.allclose(model(prompt)[0], before)  # the store matters
    load_knn_store(store, str(tmp_path / "a"))
    assert torch.equal(store.keys, keys) and store.clock >= clock
    assert torch.allclose(model(prompt)[0], before)
    other = KNNStore(512, 16, 32, 0.05)
    other.write(torch.nn.functional.normalize(torch.randn(30, 16), dim=-1), torch.randn(30, 32))
    save_knn_store(other, str(tmp_path / "b"))
    load_knn_store(store, str(tmp_path / "b"))
    assert len(store) == 30 and not torch.allclose(model(prompt)[0], before)


def test_knn_store_of_the_wrong_shape_is_refused(tmp_path):
    save_knn_store(KNNStore(10, 8, 32, 0.05), str(tmp_path / "s"))
    with pytest.raises(SystemExit, match="keys of size 8"):
        load_knn_store(KNNStore(10, 16, 32, 0.05), str(tmp_path / "s"))


@pytest.mark.parametrize("memory", [PKM, KNN])
def test_kv_cache_generation_matches_no_cache_with_memory_layers(memory):
    model = tiny_memory_model(**memory)
    if memory["memory"] == "knn":
        memorize(model, torch.randint(0, 50, (4, 32)))
    idx = torch.randint(0, 50, (3, 5))
    cached = model.generate(idx, 40, temperature=0.0, use_cache=True)
    assert torch.equal(cached, model.generate(idx, 40, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("memory", [PKM, KNN])
def test_a_tiny_memory_model_trains(tiny_data, memory):
    cfg = tiny_train_config(tiny_data, memory_layers=[1], **memory)
    train.train(cfg)
    evals = [r for r in metrics(cfg) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5


@pytest.mark.parametrize("memory", [PKM, KNN])
def test_resume_with_memory_layers_continues_exactly(tiny_data, memory):
    whole = tiny_train_config(tiny_data, out_dir=str(tiny_data / "whole"), memory_layers=[1], **memory)
    train.train(whole)
    split = whole | dict(out_dir=str(tiny_data / "split"), max_iters=10, lr_decay_iters=20)
    train.train(split)
    train.train(split | {"max_iters": 20, "init_from": "resume"})
    steps = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in metrics(c)] for c in (whole, split)]
    assert steps[0] == steps[1]
    state = load_checkpoint(os.path.join(split["out_dir"], "ckpt.pt"))
    assert state["model_args"]["memory"] == memory["memory"] and state["model_args"]["memory_layers"] == [1]
    path = os.path.join(split["out_dir"], "ckpt.pt")
    model = load_model(state, knn_store=knn_store_dir(path))
    if memory["memory"] == "knn":
        assert len(knn_stores(model)[1]) > 0


def test_distillation_brings_the_student_closer_to_the_teacher_than_data_alone(tiny_data):
    teacher = tiny_train_config(tiny_data, out_dir=str(tiny_data / "teacher"), max_iters=30)
    train.train(teacher)
    students = {}
    for name, extra in (("data", {}), ("distilled", dict(teacher=teacher["out_dir"], distill_alpha=0.9))):
        cfg = tiny_train_config(tiny_data, out_dir=str(tiny_data / name), memory_layers=[1], **PKM, **extra)
        train.train(cfg)
        students[name] = load_model(load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt")))
    t = load_model(load_checkpoint(os.path.join(teacher["out_dir"], "ckpt.pt")))
    idx = torch.randint(0, t.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kl = {name: distill_kl(s(idx)[0], t(idx)[0], 2.0, t.config.vocab_size).item()
              for name, s in students.items()}
    assert kl["distilled"] < 0.7 * kl["data"]


def test_teacher_with_another_vocabulary_is_refused(tiny_data, tmp_path):
    state = {"model_args": {"vocab_size": 999}, "model": {}}
    from checkpoint import save_checkpoint
    save_checkpoint(str(tmp_path / "t.pt"), state)
    with pytest.raises(SystemExit, match="vocab 999"):
        train.train(tiny_train_config(tiny_data, teacher=str(tmp_path / "t.pt")))


@pytest.mark.parametrize("kw", [dict(memory="ffn"), dict(memory_slots=1000), dict(memory_key_dim=15),
                                dict(memory_topk=100, memory_slots=64 ** 2)])
def test_impossible_memory_settings_are_rejected(kw):
    with pytest.raises(ValueError):
        build_model(dict(n_layer=2, n_embd=32, n_head=4, memory_layers=[1]) | kw)


def test_memory_vs_dense_experiment_runs_both_models_and_writes_json(tiny_data):
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("memory_vs_dense", os.path.join(ROOT, "experiments", "memory_vs_dense.py"))
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    out = tiny_data / "mvd.json"
    experiment.main(["--device=cpu", "--max_steps=6", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16",
                     "--batch_size=4", "--memory_layers=[1]", "--memory_slots=256", "--memory_key_dim=16",
                     "--memory_topk=4", "--eval_interval=3", "--eval_iters=1", "--warmup_steps=2", "--dataset=tiny",
                     f"--data_dir={tiny_data / 'data'}", f"--out={out}"])
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"dense", "pkm"} and result["summary"]["param_ratio"] > 1
    assert all(r["steps"] == 6 for r in result["results"].values())


def test_missing_knn_store_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no kNN store at"):
        load_knn_store(KNNStore(10, 8, 32, 0.05), str(tmp_path / "nowhere"))


def test_a_knn_store_save_interrupted_between_its_renames_loses_nothing(tmp_path):
    def filled(n):
        store = KNNStore(512, 16, 32, 0.0)
        store.write(torch.nn.functional.normalize(torch.randn(n, 16), dim=-1), torch.randn(n, 32))
        return store
    path = str(tmp_path / "s")
    save_knn_store(filled(10), path)
    os.replace(path, path + ".old")  # the crash: the old store moved aside, the new one not yet in place
    os.makedirs(path + ".tmp")
    assert len(load_knn_store(KNNStore(512, 16, 32, 0.0), path)) == 10  # loading finds the whole old store
    save_knn_store(filled(20), path)  # the next save recovers and replaces it cleanly
    assert len(load_knn_store(KNNStore(512, 16, 32, 0.0), path)) == 20
    assert not os.path.exists(path + ".old") and not os.path.exists(path + ".tmp")
