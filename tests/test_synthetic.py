import json
import math
import os

import numpy as np
import pytest
import torch

import prepare
import synthetic
from configurator import configure
from model import GPT, GPTConfig
from training import fit


@pytest.mark.parametrize("style", ["where", "cloze", "induction"])
def test_facts_answers_are_correct_by_construction(style):
    rng = np.random.default_rng(0)
    names, _ = synthetic.split_names(0)
    hops = set()
    for _ in range(200):
        world = synthetic.facts_world(rng, names, 5, 3, 8)
        words, answers = synthetic.facts_document(rng, world, 6, style=style)
        assert synthetic.solve(words) == [a for _, a, _ in answers]
        assert all(words[pos] == a for pos, a, _ in answers)
        hops |= {h for _, _, h in answers}
    assert hops == {1, 2}


def test_fixed_world_documents_state_the_world_or_changed_facts():
    rng = np.random.default_rng(1)
    names, _ = synthetic.split_names(0)
    world = synthetic.facts_world(rng, names, 30, 15, 8)
    words, answers = synthetic.fixed_world_document(rng, world, 4, 4)
    assert synthetic.solve(words) == [a for _, a, _ in answers]
    for i in range(len(words) - 4):
        if words[i + 2:i + 4] == ["lives", "in"]:
            assert world["home"][" ".join(words[i:i + 2])] == words[i + 4]
    removed, _ = synthetic.fixed_world_document(rng, world, 4, 4, with_facts=False)
    assert "lives" not in removed and "works" not in removed


def test_held_out_people_never_appear_in_training_documents():
    train_names, held = synthetic.split_names(7)
    assert not set(train_names) & set(held) and len(held) > 50
    docs = synthetic.text_documents("facts", 60, 7, val_fraction=0.1)
    assert len(docs["train"]) == 54 and len(docs["val"]) == 6
    for split, others in (("train", held), ("val", train_names)):
        for doc in docs[split]:
            words = doc.split()
            assert not {" ".join(words[j:j + 2]) for j in range(len(words) - 1)} & set(others)


@pytest.mark.parametrize("people, bosses, questions, cities, message", [
    (0, 0, 1, 8, "at least one person"),
    (3, 1, 5, 8, "n_questions=5 must be between 1 and the number of facts"),
    (3, 3, 1, 8, "must be below n_people"),
    (3, 1, 1, 99, "n_cities must be between"),
])
def test_impossible_facts_settings_are_clear_errors(people, bosses, questions, cities, message):
    with pytest.raises(SystemExit, match=message):
        synthetic.check_facts_settings(people, bosses, questions, cities)


def test_bios_people_and_bad_sizes():
    names, values = synthetic.bios_people(100, 3)
    assert len(set(names)) == 100 and all(len(v) == 100 for v in values.values())
    with pytest.raises(SystemExit, match="at least 1"):
        synthetic.bios_people(0, 3)
    with pytest.raises(SystemExit, match="exceeds"):
        synthetic.bios_people(10 ** 6, 3)
    words = synthetic.bios_words(np.random.default_rng(0), names, values, [0])[0]
    vocab = synthetic.bios_vocab()
    assert vocab.decode(vocab.encode(words)) == " ".join(words)
    for a, (options, _) in synthetic.ATTRIBUTES.items():
        assert options[values[a][0]] in words


def test_bits_of_knowledge_bounds():
    D = {a: len(v) for a, (v, _) in synthetic.ATTRIBUTES.items()}
    full = synthetic.bits_of_knowledge(10, {a: 1.0 for a in D}, {a: 0.0 for a in D})
    none = synthetic.bits_of_knowledge(10, {a: 1 / D[a] for a in D}, {a: np.log2(D[a]) for a in D})
    for a in D:
        assert full[a]["bits_by_loss"] == pytest.approx(10 * np.log2(D[a]))
        assert full[a]["bits_by_accuracy"] == pytest.approx(10 * np.log2(D[a]), rel=1e-6)
        assert none[a]["bits_by_loss"] == pytest.approx(0) and none[a]["bits_by_accuracy"] == pytest.approx(0, abs=1e-6)


def test_fit_learns_the_bios_and_recall_measures_it():
    vocab = synthetic.bios_vocab()
    names, values = synthetic.bios_people(4, 0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=64, n_layer=1, n_head=2, n_embd=32))
    before, _ = synthetic.recall(model, vocab, names, values, torch.device("cpu"))

    def next_batch(step):
        rng = np.random.default_rng(step)
        return synthetic.pad_batch([vocab.encode(w) for w in synthetic.bios_words(rng, names, values, range(4))], 64, 1)
    loss, tok_s, tokens = fit(model, next_batch, 60, 1e-2, torch.device("cpu"), warmup=5)
    after, _ = synthetic.recall(model, vocab, names, values, torch.device("cpu"))
    assert tokens > 0 and tok_s > 0
    assert sum(after.values()) > sum(before.values()) + 1


def test_prepare_writes_a_synthetic_facts_dataset(tmp_path):
    cfg = configure(prepare.DEFAULTS, ["--dataset=synthetic:facts", "--synthetic_docs=50", f"--data_dir={tmp_path}"])
    out = prepare.prepare(cfg)
    meta = json.loads((tmp_path / "synthetic_facts" / "meta.json").read_text())
    assert out.endswith("synthetic_facts") and meta["tokenizer"] == "char" and meta["documents"] == 50
    with pytest.raises(SystemExit, match="unknown synthetic corpus"):
        prepare.prepare(configure(prepare.DEFAULTS, ["--dataset=synthetic:nope", f"--data_dir={tmp_path}"]))


def load_experiment(name):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_named_city_baseline_guesses_the_most_often_named_city():
    rvk = load_experiment("reason_vs_knowledge")
    words = "<bos> ka lo lives in rome . mi ra lives in rome . te su lives in oslo . where does ka lo live ?".split()
    assert rvk.named_city_baseline([(words, [(len(words), "rome", 1)], [None])]) == 1
    assert rvk.named_city_baseline([(words, [(len(words), "oslo", 1)], [None])]) == 0
    # only the facts name cities: the answers after cloze questions ("? X lives in rome .") do not count
    cloze = "<bos> ka lo lives in rome . mi ra lives in oslo . ? ka lo lives in rome . ? ka lo lives in rome .".split()
    assert rvk.named_city_baseline([(cloze, [(16, "oslo", 1)], [None])]) == 0.5


def test_reason_vs_knowledge_runs_tiny(tmp_path):
    load_experiment("reason_vs_knowledge").main(["--sizes=[[1, 2, 16]]", "--steps=2", "--eval_docs=4", f"--out={tmp_path}"])
    result = json.loads((tmp_path / "reason_vs_knowledge.json").read_text())
    assert [r["kind"] for r in result["results"]] == ["context", "weights"]
    assert 1 / 8 < result["named_city_baseline"] < 1  # better than chance without a lookup, short of one
    assert set(result["results"][0]["tests"]) == {"held_out_with_facts", "held_out_facts_removed", "world_facts_removed",
                                                  "world_facts_changed"}
    assert (tmp_path / "reason_vs_knowledge.png").exists()
    with pytest.raises(SystemExit, match="n_questions"):
        load_experiment("reason_vs_knowledge").main(["--n_questions=9", f"--out={tmp_path}"])


def test_knowledge_capacity_runs_tiny(tmp_path):
    load_experiment("knowledge_capacity").main(["--sizes=[[1, 2, 16]]", "--kinds=['dense', 'pkm', 'knn']", "--steps=2",
                                                "--n_people=10", "--profile_steps=1", f"--out={tmp_path}"])
    result = json.loads((tmp_path / "knowledge_capacity.json").read_text())
    assert [r["kind"] for r in result["results"]] == ["dense", "pkm", "knn"]
    assert all(r["bits_by_loss"] >= 0 and r["train_flops"] > 0 for r in result["results"])
    assert {t["kind"] for t in result["vs_dense"]} == {"pkm", "knn"} and result["results"][1]["profile"]
    assert [s["kind"] for s in result["speeds"]] == ["dense", "pkm", "knn"]  # kept beside the results (a cut run has them)
    assert (tmp_path / "knowledge_capacity.png").exists()


def test_run_in_processes_gives_every_result_in_worker_processes():
    import math
    import subprocess
    import sys
    from runtime import run_in_processes
    jobs = [(2, 3), (3, 2), (5, 1)]
    assert list(run_in_processes(math.pow, jobs, 1)) == [8.0, 9.0, 5.0]
    assert list(run_in_processes(math.pow, jobs, 1, deadline=0.0)) == []  # past the deadline nothing starts
    # the worker pools in a child interpreter: spawn's resource tracker would outlive them in this one
    # (and fail textworld's no-children check later in a full run)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import math, runtime; jobs = {jobs}; print(sorted(runtime.run_in_processes(math.pow, jobs, 2))); "
            "print(sorted(runtime.run_in_processes(runtime.named_call, [(str(j), math.pow, *j) for j in jobs], 2)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[5.0, 8.0, 9.0]", "[('(2, 3)', 8.0), ('(3, 2)', 9.0), ('(5, 1)', 5.0)]"]


def test_an_unknown_question_style_is_a_clear_error(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import reason_vs_knowledge
    with pytest.raises(SystemExit, match="question_style must be one of where, cloze, induction"):
        reason_vs_knowledge.main(["--question_style=what", f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_induction_style_puts_the_city_right_after_the_name_and_the_question_ends_with_it():
    rng = np.random.default_rng(3)
    names, _ = synthetic.split_names(0)
    world = synthetic.facts_world(rng, names, 4, 2, 8)
    words, answers = synthetic.facts_document(rng, world, 6, style="induction")
    for pos, answer, hops in answers:
        assert words[pos - 3:pos - 2] == (["lives"] if hops == 1 else ["boss"])
        if hops == 1:  # the tokens before the answer stand before the same city in the person's fact
            fact = next(i for i in range(pos - 3) if words[i:i + 3] == words[pos - 3:pos])
            assert words[fact + 3] == answer
    rvk = load_experiment("reason_vs_knowledge")
    world = synthetic.facts_world(rng, names, 30, 15, 8)
    for _ in range(20):
        words, answers = synthetic.fixed_world_document(rng, world, 4, 4, style="induction")
        for pos, answer, _ in answers:
            assert world["home"][rvk.solve_person(words, pos)] == answer


def test_reason_vs_knowledge_without_bosses_reports_no_two_hop_accuracy(tmp_path):
    load_experiment("reason_vs_knowledge").main(["--sizes=[[1, 2, 16]]", "--steps=2", "--eval_docs=4", "--n_bosses=0",
                                                 "--question_style=induction", f"--out={tmp_path}"])
    context = json.loads((tmp_path / "reason_vs_knowledge.json").read_text())["results"][0]
    assert math.isnan(context["tests"]["held_out_with_facts"]["2hop"])  # no 2-hop questions asked, not 0 right
    assert 0 <= context["tests"]["held_out_with_facts"]["1hop"] <= 1 and (tmp_path / "reason_vs_knowledge.png").exists()
