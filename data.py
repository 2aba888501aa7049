"""
The token data prepare.py writes, read by every script that trains or evaluates: a folder per dataset
with train.bin, val.bin (flat token ids) and meta.json (tokenizer, dtype, sizes, source hash).
"""
import os

import numpy as np
import torch

from checkpoint import read_json


def open_dataset(data_dir, name, block_size):
    """meta.json of data/<name> after checking it matches both splits and each holds more than block_size tokens."""
    folder = os.path.join(data_dir, name)
    meta_path = os.path.join(folder, "meta.json")
    hint = f"python prepare.py --dataset={name}" if name in ("shakespeare", "shakespeare_char") else \
        f"python prepare.py --dataset=<your text file or folder> --name={name}"
    if not os.path.exists(meta_path):
        if os.path.exists(os.path.join(folder, "train.bin")):
            raise SystemExit(f"{meta_path} is missing (prepare.py was stopped before writing it): rebuild with "
                             f"{hint} --force=True")
        raise SystemExit(f"no dataset at {folder}: create it with {hint}")
    meta = read_json(meta_path, fix=f"rebuild it with {hint} --force=True")
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: rebuild with {hint} --force=True")
        n = os.path.getsize(path) // np.dtype(meta["dtype"]).itemsize
        if n != meta.get(f"{split}_tokens", n):
            raise SystemExit(f"{path} holds {n} tokens but {meta_path} says {meta[f'{split}_tokens']}: the two are "
                             f"from different runs of prepare.py; rebuild with {hint} --force=True")
        if n <= block_size:
            raise SystemExit(f"{path} holds {n} tokens, too few for block_size={block_size}: "
                             f"use a smaller --block_size or more text")
    meta["folder"] = folder
    return meta


def get_batch(meta, split, batch_size, block_size, generator, device, rank=0, world_size=1):
    """Random windows x and next-token targets y, each (B, T), drawn with the given generator.

    Under DDP every process draws the windows of all world_size processes from one shared generator
    and keeps its own share: the run sees the same data as one process with world_size times the batch.
    """
    # a fresh memmap per batch avoids a known memory leak of long-lived np.memmap (nanoGPT #232)
    data = np.memmap(os.path.join(meta["folder"], f"{split}.bin"), dtype=meta["dtype"], mode="r")
    starts = torch.randint(len(data) - block_size, (world_size * batch_size,), generator=generator)
    starts = starts[rank * batch_size:(rank + 1) * batch_size].tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
    if device.type == "cuda":  # pinned memory lets the copy run while the GPU computes
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
