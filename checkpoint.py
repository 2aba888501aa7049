"""
Checkpoint I/O shared by every script: atomic saves, loads that explain what is wrong.

A checkpoint is a dict saved with torch.save: {"format", "model_args", "model", "config", ...}.
Scripts add what they need (optimizer, step, RNG states); `load_model` rebuilds the GPT from any.
"""
import os

import torch

from model import GPT, GPTConfig

FORMAT = "ulm-checkpoint-1"


def save_checkpoint(path, state):
    """Write to a temp file, fsync, then rename: a crash mid-save never leaves a broken file."""
    state = {"format": FORMAT, **state}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at path, or SystemExit saying why it cannot be used."""
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at {path}: train one first with python train.py "
                         f"--out_dir={os.path.dirname(path) or '.'}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, a file of some other kind
        raise SystemExit(f"checkpoint {path} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise SystemExit(f"{path} is not a µLM checkpoint (format {found!r}, expected {FORMAT!r})")
    return state


def load_model(state, device="cpu", knn_store=None):
    """The GPT a checkpoint dict describes, weights loaded, in eval mode; kNN stores from knn_store if given."""
    model = GPT(GPTConfig(**state["model_args"]))
    weights = {k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}
    model.load_state_dict(weights)
    if knn_store and model.knn_stores():
        load_knn_stores(model, knn_store)
    return model.to(device).eval()


def knn_store_dir(ckpt_path):
    """The folder beside a checkpoint that holds its kNN stores: out/run/ckpt.pt -> out/run/ckpt_knn/."""
    return f"{os.path.splitext(ckpt_path)[0]}_knn"


def save_knn_stores(model, directory):
    """Each kNN memory layer's store into directory/layer{i}/ as numpy arrays."""
    for i, store in model.knn_stores().items():
        store.save(os.path.join(directory, f"layer{i}"))


def load_knn_stores(model, directory):
    """Replace each kNN memory layer's store by the one saved in directory/layer{i}/ (memory-mapped)."""
    for i, store in model.knn_stores().items():
        store.load(os.path.join(directory, f"layer{i}"))
