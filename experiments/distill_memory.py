"""
Does a teacher move knowledge into a memory layer (issue 33, item 5; research notes 003)? A dense model is
distilled into its clone with a product-key memory layer in place of its last MLP (memory.py): the student
trains with and without the teacher's logits (training.distill_loss, as train.py's --teacher), the same steps and
batches, over several seeds; then its val loss and the bits of knowledge it stores (Allen-Zhu & Li 2024, as
experiments/knowledge_capacity.py counts them) on synthetic.py's biographies.

    OMP_NUM_THREADS=1 nice -n 10 python experiments/distill_memory.py config/distill_memory.py   # ~12 CPU min

The teacher (dense, `size`) trains teacher_steps first, on its own stream of batches; each student seed then
trains `steps` on the stream of that seed, once on the data alone and once on (1 - alpha) data loss + alpha
T^2 KL(teacher || student). Val loss: fresh renderings of the same people (knowledge, not generalisation to new
people, is what is measured). Writes <out_dir>/distill_memory.json and .png.
"""
import functools
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import synthetic  # noqa: E402
from architecture import build_model  # noqa: E402
from checkpoint import write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from metrics import save_figure  # noqa: E402
from runtime import code_version  # noqa: E402
from training import distill_loss, fit  # noqa: E402

DEFAULTS = dict(
    out_dir="out/distill_memory",
    n_people=100,
    people_seed=1337,             # who the people are and what they are (fixed for every model)
    size=[1, 2, 32],              # [n_layer, n_head, n_embd] of the teacher and of its memory clone
    teacher_steps=1200,
    steps=300,                    # each student's steps
    batch_size=64,
    block_size=64,
    learning_rate=3e-3,
    memory_slots=1024,            # the student's product-key memory (its last layer's MLP replaced)
    memory_heads=2,
    memory_key_dim=16,
    memory_topk=8,
    distill_alpha=0.5,
    distill_temperature=2.0,
    val_batches=20,
    seeds=[1337],
)
VAL_STREAM = 10 ** 6  # the val renderings' seed: no training stream uses it


def build(cfg, vocab_size, memory, seed):
    n_layer, n_head, n_embd = cfg["size"]
    options = dict(memory_layers=[n_layer - 1], memory="pkm", memory_slots=cfg["memory_slots"],
                   memory_heads=cfg["memory_heads"], memory_key_dim=cfg["memory_key_dim"],
                   memory_topk=cfg["memory_topk"]) if memory else {}
    torch.manual_seed(seed)
    return build_model(dict(vocab_size=vocab_size, block_size=cfg["block_size"], n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd, **options))


@torch.no_grad()
def measure(model, bios, cfg):
    """Val loss on fresh renderings and the bits of knowledge stored (by loss and by accuracy)."""
    vocab, names, values = bios
    model.eval()
    val_batch = synthetic.bios_batches(vocab, names, values, cfg["batch_size"], cfg["block_size"], VAL_STREAM)
    val = float(np.mean([model(*val_batch(i))[1].item() for i in range(cfg["val_batches"])]))
    per_attribute = synthetic.bits_of_knowledge(len(names), *synthetic.recall(model, vocab, names, values,
                                                                             torch.device("cpu")))
    return {"val_loss": val, "bits_by_loss": sum(a["bits_by_loss"] for a in per_attribute.values()),
            "bits_by_accuracy": sum(a["bits_by_accuracy"] for a in per_attribute.values()),
            "params": model.num_params(), "attributes": per_attribute}


def train_student(cfg, bios, teacher, seed):
    """One memory student of a seed: on the data alone (teacher None) or distilled from the teacher."""
    vocab, names, values = bios
    model = build(cfg, len(vocab), memory=True, seed=seed)
    loss_of = None if teacher is None else functools.partial(distill_loss, teacher, cfg["distill_temperature"],
                                                             cfg["distill_alpha"], len(vocab))
    fit(model, synthetic.bios_batches(vocab, names, values, cfg["batch_size"], cfg["block_size"], seed),
        cfg["steps"], cfg["learning_rate"], torch.device("cpu"), loss_of=loss_of)
    return {"seed": seed, "teacher": teacher is not None, **measure(model, bios, cfg)}


def plot(result, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "val_loss", "val loss (nats/token, fresh renderings)"),
                           (axes[1], "bits_by_loss", "bits of knowledge stored (by loss)")):
        for i, with_teacher in enumerate((False, True)):
            rows = [r for r in result["students"] if r["teacher"] == with_teacher]
            ax.scatter([i] * len(rows), [r[key] for r in rows], color=f"C{i}")
            if rows:
                ax.errorbar(i, np.mean([r[key] for r in rows]), fmt="_", color="k", markersize=20)
        ax.axhline(result["teacher"][key], color="gray", ls="--", label="the dense teacher")
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["memory student alone", "memory student + teacher"])
        ax.set_xlabel("student (a point per seed, the bar their mean)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].axhline(result["bits_available"], color="gray", ls=":")
    fig.suptitle(f"distilling a dense {result['config']['size']} teacher into its memory clone")
    fig.tight_layout()
    save_figure(fig, png)
    return fig


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    vocab = synthetic.bios_vocab()
    names, values = synthetic.bios_people(cfg["n_people"], cfg["people_seed"])
    bios = (vocab, names, values)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    path = os.path.join(cfg["out_dir"], "distill_memory.json")
    teacher = build(cfg, len(vocab), memory=False, seed=cfg["people_seed"])
    fit(teacher, synthetic.bios_batches(vocab, names, values, cfg["batch_size"], cfg["block_size"], cfg["people_seed"] + 1),
        cfg["teacher_steps"], cfg["learning_rate"], torch.device("cpu"))
    teacher.requires_grad_(False)
    result = {"config": cfg, "code": code_version(__file__), "teacher": measure(teacher, bios, cfg), "students": [],
              "bits_available": len(names) * sum(math.log2(len(v)) for v, _ in synthetic.ATTRIBUTES.values())}
    print(f"teacher: val {result['teacher']['val_loss']:.4f}, {result['teacher']['bits_by_loss']:,.0f} bits", flush=True)
    for seed in cfg["seeds"]:
        for with_teacher in (False, True):
            row = train_student(cfg, bios, teacher if with_teacher else None, seed)
            result["students"].append(row)
            print(f"seed {seed} {'with' if with_teacher else 'without'} teacher: val {row['val_loss']:.4f}, "
                  f"{row['bits_by_loss']:,.0f} bits by loss ({row['bits_by_accuracy']:,.0f} by accuracy)", flush=True)
            write_json_atomic(path, result)
    for with_teacher in (False, True):
        rows = [r for r in result["students"] if r["teacher"] == with_teacher]
        result[f"mean_{'with' if with_teacher else 'without'}_teacher"] = {
            k: float(np.mean([r[k] for r in rows])) for k in ("val_loss", "bits_by_loss", "bits_by_accuracy")}
    write_json_atomic(path, result)
    plot(result, os.path.join(cfg["out_dir"], "distill_memory.png"))
    print({k: v for k, v in result.items() if k.startswith("mean_")})


if __name__ == "__main__":
    main(sys.argv[1:])
