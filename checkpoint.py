"""
Checkpoint I/O shared by every script: one layout for every kind of run, atomic saves, loads that
explain what is wrong.

The layout, a dict saved with torch.save (written and read only here):
    format      "ulm-checkpoint-1"
    kind        what wrote it: "train" | "world" (a policy) | "export" (compress.py: inference only,
                maybe quantized, see shrink.py) | ... ; sample.py reads any kind
    model_args  every model option (architecture.py), flat; model  the state dict
    tokenizer   {"tokenizer": "char" | "gpt2", "vocab_size", "eot", "chars"?}
    config      the run's resolved config
    step        optimizer steps (train) or episodes (world) so far
    val_loss    the last evaluation's val loss, or None where the run measures something else
Scripts add what their resume needs (optimizer, rng, best_val, episode, ...). A kNN memory model's
stores are not weights: they live in a folder beside the checkpoint (`knn_store_dir`).
"""
import errno
import json
import os
import shutil

import numpy as np
import torch

from architecture import build_model
from memory import knn_stores
from shrink import build_export_model, fit_to_state_dict

FORMAT = "ulm-checkpoint-1"
REQUIRED = ("model_args", "model")


def _fsync_dir(directory):
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make a rename itself durable
    finally:
        os.close(dir_fd)


def _no_space(e):
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e) or \
        "file write failed" in str(e)


def atomic_write(path, write):
    """write(f) into a temp file beside path, fsync, then rename over path: a crash never leaves a torn file.

    The temp name carries the pid, so two writers never share one. A full disk is a clear error, the
    temp file is removed and the old file at path is kept.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _no_space(e):
            kept = "the previous file is kept" if os.path.exists(path) else "nothing was written"
            raise SystemExit(f"no space left on device while saving {path}; {kept}. Free some space, "
                             f"then resume") from None
        raise
    _fsync_dir(directory)


def write_json_atomic(path, obj):
    """A JSON file that describes other files: written whole or not at all."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1, default=str) + "\n").encode()))


def read_json(path, fix):
    """A JSON file written by write_json_atomic, or SystemExit naming the file and `fix` (what to do)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path} is unreadable ({e}): {fix}")


def save_checkpoint(path, state, kind="train"):
    """Save a checkpoint dict in the layout above (atomically)."""
    state = {"format": FORMAT, "kind": kind, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at path, or SystemExit saying why it cannot be used."""
    if os.path.isdir(path):
        raise SystemExit(f"{path} is a folder; give a checkpoint file (e.g. {os.path.join(path, 'ckpt.pt')})")
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
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise SystemExit(f"{path} is a damaged µLM checkpoint: it has no {', '.join(missing)}")
    return state


def load_model(state, device="cpu", knn_store=None):
    """The GPT a checkpoint dict describes, weights loaded, in eval mode; kNN stores from knn_store if given.
    An inference export's weights move into the model: state["model"] is gone afterwards."""
    try:
        model = build_model(state["model_args"])
    except (TypeError, ValueError) as e:
        raise SystemExit(f"the checkpoint's model_args do not make a model this code can build: {e}")
    try:
        if state.get("kind") == "export":  # compress.py's inference file: quantized layers, no float copy made
            # the model takes the file's tensors out of state (no second reference keeps them alive), so
            # int4's conversion to its kernel layout frees each layer's file tensors as it goes
            return build_export_model(state["model_args"], state.pop("model"), device)
        weights = {k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}
        model = fit_to_state_dict(model, weights)  # a pruned model: smaller layers, fixed masks
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError, AttributeError) as e:  # missing, extra or mis-shaped tensors
        raise SystemExit(f"the checkpoint's weights do not fit the model its model_args describe "
                         f"({type(e).__name__}: {str(e)[:300]}): the file is damaged or was edited") from None
    if knn_store and knn_stores(model):
        load_knn_stores(model, knn_store)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- kNN stores

KNN_FILES = ("keys", "values", "last_used")


def knn_store_dir(ckpt_path):
    """The folder beside a checkpoint that holds its kNN stores: out/run/ckpt.pt -> out/run/ckpt_knn/."""
    return f"{os.path.splitext(ckpt_path)[0]}_knn"


def save_knn_stores(model, directory):
    """Each kNN memory layer's store into directory/layer{i}/ as numpy arrays."""
    for i, store in knn_stores(model).items():
        save_knn_store(store, os.path.join(directory, f"layer{i}"))


def load_knn_stores(model, directory):
    """Replace each kNN memory layer's store by the one saved in directory/layer{i}/ (memory-mapped)."""
    for i, store in knn_stores(model).items():
        load_knn_store(store, os.path.join(directory, f"layer{i}"))


def save_knn_store(store, directory):
    """keys.npy, values.npy, last_used.npy and meta.json, written to a temp folder then swapped in:
    a save interrupted at any point leaves the previous store or the new one, never a broken one."""
    tmp, old = f"{directory}.tmp", f"{directory}.old"
    if not os.path.exists(directory) and os.path.exists(old):
        os.replace(old, directory)  # an earlier save stopped between its two renames: the old store is whole
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(tmp)
    for name in KNN_FILES:
        np.save(os.path.join(tmp, f"{name}.npy"), getattr(store, name).cpu().numpy())
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"clock": store.clock, "capacity": store.capacity, "threshold": store.threshold}, f)
    if os.path.exists(directory):
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_knn_store(store, directory):
    """Read a saved store into `store`; arrays are memory-mapped copy-on-write, so a large store loads lazily."""
    if not os.path.exists(directory) and os.path.exists(f"{directory}.old"):
        directory = f"{directory}.old"  # a save stopped between its two renames: this one is whole
    if not os.path.exists(os.path.join(directory, "meta.json")):
        raise SystemExit(f"no kNN store at {directory} (expected keys.npy, values.npy, meta.json)")
    arrays = {name: torch.from_numpy(np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="c"))
              for name in KNN_FILES}
    if arrays["keys"].size(1) != store.keys.size(1) or arrays["values"].size(1) != store.values.size(1):
        raise SystemExit(f"kNN store at {directory} has keys of size {arrays['keys'].size(1)} and values of "
                         f"size {arrays['values'].size(1)}; this model needs {store.keys.size(1)} and "
                         f"{store.values.size(1)}")
    if arrays["keys"].size(0) > store.capacity:
        raise SystemExit(f"kNN store at {directory} holds {arrays['keys'].size(0)} pairs, more than "
                         f"knn_capacity={store.capacity}")
    device = store.keys.device
    store.keys, store.values, store.last_used = arrays["keys"], arrays["values"], arrays["last_used"]
    with open(os.path.join(directory, "meta.json")) as f:
        store.clock = json.load(f)["clock"]
    return store.to(device)
