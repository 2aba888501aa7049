"""The experiments' plots redrawn from a JSON: every panel has numbers and labelled axes, and single runs are
not drawn as a spread."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_experiment(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_labelled(fig):
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel(), f"panel {ax.get_title()!r} lacks an axis label"
        assert ax.has_data(), f"panel {ax.get_title()!r} is empty"


def test_compress_plot_draws_only_the_parts_that_ran_with_labelled_axes(tmp_path):
    compress_gpu = load_experiment("compress_gpu")
    results = {"config": {"big": [36, 1536, 12]},
               "big": {"bfloat16": {"peak_gpu_gib": 2.2, "decode_tokens_per_s": 245.0},
                       "int4": {"peak_gpu_gib": 0.76, "decode_tokens_per_s": 336.0, "val_loss_increase": 0.001},
                       "int8": {"skipped": "time_limit_s=1 passed"}},
               "mid": {"skipped": "not started within time_limit_s=1"},
               "decode": {"skipped": "not started within time_limit_s=1"}}
    path = tmp_path / "compress_gpu.json"
    path.write_text(json.dumps(results))
    fig = compress_gpu.plot(results, str(tmp_path / "direct.png"))
    assert [ax.get_ylabel() for ax in fig.axes] == ["peak GPU memory (GiB)", "decode tokens/s",
                                                   "val loss increase over float (nats)"]
    assert_labelled(fig)
    compress_gpu.main([f"--replot={path}"])  # the PNG beside the JSON, nothing measured
    assert (tmp_path / "compress_gpu.png").stat().st_size > 0
    assert compress_gpu.plot({"big": {"skipped": "x"}}, str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()


def test_swarm_learning_plot_labels_every_panel_and_replots_from_its_json(tmp_path):
    swarm_learning = load_experiment("swarm_learning")
    curve = {"decision": [0, 0, 1, 1, 1, 0, 1, 1], "worker": [0, 1, 0, 1, 1, 1, 0, 1]}
    report = {"config": {"goals": 8, "temperature": 0.5, "learn_every": 1, "throughput_workers": [1, 2]},
              "results": {"arith_frozen": {"curve": curve}, "arith_learning": {"curve": curve}},
              "table": {"messages": {"none": {"majority_success": 0.3}, "adopt": {"majority_success": 0.4}},
                        "throughput_episodes_per_minute": {"throughput_none_1": 100.0, "throughput_each_1": 50.0,
                                                           "throughput_none_2": 180.0}}}
    fig = swarm_learning.plot(report, str(tmp_path / "direct.png"))
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["arith", "success", "throughput (the swarms on the CPU)"]
    assert_labelled(fig)
    path = tmp_path / "swarm_learning_gpu.json"
    path.write_text(json.dumps(report))
    swarm_learning.main([f"--replot={path}"])
    assert (tmp_path / "swarm_learning_gpu.png").stat().st_size > 0


def test_knowledge_capacity_replot_draws_each_runs_kinds_in_one_labelled_plot(tmp_path):
    knowledge_capacity = load_experiment("knowledge_capacity")

    def row(kind, params, bits, tokens_per_s):
        return {"kind": kind, "params": params, "bits_by_loss": bits, "train_flops": 6 * params * 1000,
                "tokens_per_s": tokens_per_s, "bits_available": 600.0}
    dense, pkm = tmp_path / "knowledge_capacity_gpu_dense.json", tmp_path / "knowledge_capacity_gpu_pkm.json"
    dense.write_text(json.dumps({"results": [row("dense", 100, 20.0, 5e5), row("dense", 400, 90.0, 3e5)]}))
    pkm.write_text(json.dumps({"speeds": [], "results": [row("pkm", 2000, 500.0, 4e5)]}))
    knowledge_capacity.main([f"--replot={[str(dense), str(pkm)]}"])
    assert (tmp_path / "knowledge_capacity_gpu_pkm.png").stat().st_size > 0  # beside the last JSON
    fig = knowledge_capacity.plot([r | {"run": "gpu_dense"} for r in json.loads(dense.read_text())["results"]] +
                                  [r | {"run": "gpu_pkm"} for r in json.loads(pkm.read_text())["results"]],
                                  str(tmp_path / "direct.png"))
    assert "dense (gpu_dense)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert_labelled(fig)
    speeds_only = tmp_path / "cut.json"
    speeds_only.write_text(json.dumps({"speeds": [{"size": [1, 2, 32], "kind": "dense", "tokens_per_s": 1.0}]}))
    with pytest.raises(SystemExit, match="no results"):
        knowledge_capacity.main([f"--replot={[str(speeds_only)]}"])


def test_textworld_seeds_draws_a_spread_only_where_two_runs_or_more_have_the_number(tmp_path):
    textworld_seeds = load_experiment("textworld_seeds")
    runs = [{"summary": {"1_easy": [{"games": 100, "choose": 0.6, "generate": None},
                                    {"games": 1000, "choose": 0.9, "generate": 0.4}]}},
            {"summary": {"1_easy": [{"games": 1000, "choose": 0.95, "generate": None}]}}]
    numbers = {"1_easy": textworld_seeds.easy_games(runs), "2_hard": {}, "4_shift": {}}
    fig = textworld_seeds.plot(runs, numbers, str(tmp_path / "seeds.png"))
    assert (tmp_path / "seeds.png").stat().st_size > 0
    (ax,) = fig.axes
    spreads = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(spreads) == 1  # choose at N = 1000 (two runs); choose at 100 and generate at 1000 are single runs
    assert spreads[0].lines[0].get_xdata()[0] == 1000
    assert_labelled(fig)


def test_thinking_halting_is_compared_with_the_best_fixed_loop_count_and_drawn_beside_the_curves(tmp_path, monkeypatch):
    thinking = load_experiment("thinking")
    table = {"8": {"4": 0.5, "8": 1.0, "16": 1.0}, "16": {"4": 0.0, "8": 0.5, "16": 1.0}}
    run = {"params": 10, "accuracy": table, "halting": {"8": {"accuracy": 1.0, "mean_loops": 6.0},
                                                        "16": {"accuracy": 0.98, "mean_loops": 10.0}}}
    summary = thinking.halting_summary(run)
    assert summary["best_fixed_loops"] == 16 and summary["best_fixed_accuracy"] == 1.0
    assert summary["halt_mean_loops"] == 8.0 and summary["compute_ratio"] == 0.5
    assert abs(summary["accuracy_gap"] - 0.01) < 1e-9
    figures = []
    import matplotlib.pyplot as plt
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    thinking.plot({"config": {"task": "parity", "loops": 8}, "difficulty": "length", "runs": {"looped": run}},
                  str(tmp_path / "t.png"))
    assert len(figures[0].axes) == 2
    assert_labelled(figures[0])


def test_distill_memory_trains_both_students_of_every_seed_and_labels_its_plot(tmp_path):
    distill_memory = load_experiment("distill_memory")
    distill_memory.main([f"--out_dir={tmp_path}", "--n_people=6", "--size=[1, 2, 16]", "--teacher_steps=3",
                         "--steps=2", "--batch_size=4", "--block_size=64", "--memory_slots=256", "--memory_key_dim=8",
                         "--memory_topk=2", "--val_batches=1", "--seeds=[1, 2]"])
    result = json.loads((tmp_path / "distill_memory.json").read_text())
    assert [(r["seed"], r["teacher"]) for r in result["students"]] == [(1, False), (1, True), (2, False), (2, True)]
    assert result["teacher"]["params"] < result["students"][0]["params"]  # the clone holds a memory table
    assert (tmp_path / "distill_memory.png").stat().st_size > 0


def test_residual_widths_runs_every_variant_at_equal_cpu_time_and_labels_its_plot(tiny_data, tmp_path):
    residual_widths = load_experiment("residual_widths")
    residual_widths.main([f"--out_dir={tmp_path}", f"--data_dir={tiny_data / 'data'}", "--dataset=tiny",
                          "--model={'n_layer': 2, 'n_head': 2, 'n_embd': 32, 'block_size': 16}",
                          "--variants={'uniform': {}, 'widths + root': {'residual_widths': [16, 48], "
                          "'residual_root': True}}", "--cpu_seconds=0.05", "--calibration_steps=1", "--eval_iters=1"])
    result = json.loads((tmp_path / "residual_widths.json").read_text())
    assert set(result["summary"]) == {"uniform", "widths + root"}
    assert all(row["steps"] >= 1 and row["tokens_per_s"] > 0 for rows in result["runs"].values() for row in rows)
    assert (tmp_path / "residual_widths.png").stat().st_size > 0


def test_tokenizer_shim_plot_draws_every_variant_with_labelled_axes(tmp_path):
    tokenizer_shim = load_experiment("tokenizer_shim")
    curves = {name: [[0, 4.0], [25, 3.0], [50, 2.5]] for name in tokenizer_shim.VARIANTS}
    fig = tokenizer_shim.plot({"curves": curves, "char_model_val_nats_per_char": 1.6}, str(tmp_path / "shim.png"))
    assert_labelled(fig)
    assert (tmp_path / "shim.png").stat().st_size > 0
