"""
Load on serve.py: completions from 1, 8 and 32 concurrent streaming clients, against generation in-process;
and a soak: a mix of completions and small jobs for a while, watching errors and the server's memory.

    python experiments/serve_load.py                                   # CPU: a cpu_quick-shaped model
    python experiments/serve_load.py --config=config/gpu_124m.py --device=cuda --max_tokens=256 --out_dir=out/serve_load_gpu
    python experiments/serve_load.py --soak_minutes=30 --out_dir=out/serve_soak    # the soak (CPU, loopback)
    python experiments/serve_load.py --config=config/gpu_124m.py --device=cuda --max_tokens=256 "--decode_graph=[False,True]"

A model of the config's shape with random weights is saved as out_dir/model/ckpt.pt (speed does not
depend on the weights; ignore_eos makes every request generate exactly max_tokens), serve.py is started
on a free loopback port with out_root=out_dir, and `clients` streaming clients each send `requests`
completions back to back. Per concurrency level: requests/s, p50/p95 latency, p50/p95 time to first
token, aggregate completion tokens/s. The same model generates in-process with model.generate_stream
(what sample.py runs) for the single-stream overhead. Writes out_dir/serve_load.json and .png. With
several decode_graph values (the last command: serve.py's decode step off, then as a CUDA graph) one
server per value runs every level in turn, and graph_speedup is each level's tokens/s with the graph over
those without.

The soak (`soak_minutes` > 0) uploads a small dataset (a prepare job), then runs `soak_clients` clients
sending random completions (streamed or not, n, stop, logprobs; some hang up mid-stream and some send
a bad value on purpose) while tiny train jobs run one after another (every third one cancelled). It
counts error responses that nobody provoked, job outcomes, and samples the server's RSS; writes
out_dir/serve_soak.json and .png.
"""
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402
import torch  # noqa: E402

from checkpoint import save_checkpoint  # noqa: E402
from configurator import configure, print_config, read_config_file  # noqa: E402
from architecture import MODEL_KEYS, build_model  # noqa: E402
from runtime import resolve_device, resolve_dtype, set_threads  # noqa: E402
from tokenizer import ASSETS  # noqa: E402

DEFAULTS = dict(
    config="config/cpu_quick.py",  # the model shape (and dataset: shakespeare_char means characters, else GPT-2 BPE)
    out_dir="out/serve_load",
    device="auto",
    dtype="auto",                  # the server's and the in-process baseline's
    concurrency=[1, 8, 32],
    requests=4,                    # per client at each level
    max_tokens=64,
    prompt="ROMEO:\nWhat light through yonder window breaks?",
    threads=0,                     # torch threads of the server and the in-process baseline alike (0: automatic,
                                   # runtime.set_threads, chosen once here)
    seed=1337,
    decode_graph=[False],          # serve.py's decode_graph, one server each: [False, True] compares them (CUDA only)
    decode_compile=False,          # serve.py's decode_compile, for the servers with decode_graph=True
    soak_minutes=0.0,              # > 0: run the soak instead of the load levels
    soak_clients=4,
)

SOAK_JOB = """# a tiny train job for the soak
dataset = "soak"
device = "cpu"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
batch_size = 8
max_iters = 60
eval_interval = 20
eval_iters = 2
log_interval = 10
"""


def quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def save_random_model(cfg, path):
    """A random-weight checkpoint of the config's shape; returns (model, tokenizer meta)."""
    shape = read_config_file(os.path.join(ROOT, cfg["config"]) if not os.path.isabs(cfg["config"]) else cfg["config"])
    if shape.get("dataset", "shakespeare_char") == "shakespeare_char":
        with open(os.path.join(ASSETS, "tinyshakespeare", "input.txt")) as f:
            chars = sorted(set(f.read()))
        meta = {"tokenizer": "char", "chars": chars, "vocab_size": len(chars) + 1, "eot": len(chars)}
    else:
        meta = {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256}
    model_args = {k: v for k, v in shape.items() if k in MODEL_KEYS} | {"vocab_size": meta["vocab_size"], "dropout": 0.0}
    torch.manual_seed(cfg["seed"])
    model = build_model(model_args).eval()
    save_checkpoint(path, {"model_args": model_args, "model": model.state_dict(), "tokenizer": meta,
                           "config": {"config": cfg["config"]}, "step": 0, "val_loss": None}, kind="random")
    return model, meta


def in_process_tokens_per_s(model, meta, cfg, device, dtype, repeats=3):
    """Single-stream tokens/s of model.generate_stream (sample.py's path), best of `repeats`."""
    from tokenizer import tokenizer_from_meta
    model = model.to(device, dtype)
    ids = tokenizer_from_meta(meta).encode(cfg["prompt"])
    best = 0.0
    for _ in range(repeats + 1):  # the first run warms up
        idx = torch.tensor([ids], device=device)
        t0 = time.perf_counter()
        for token in model.generate_stream(idx, cfg["max_tokens"], temperature=1.0, seed=cfg["seed"]):
            int(token[0])  # the host sees each token, as a streaming sampler does
        best = max(best, cfg["max_tokens"] / (time.perf_counter() - t0))
    return best


async def one_request(http, cfg):
    """(latency s, time to first token s, completion tokens) of one streamed completion."""
    t0, first, tokens = time.perf_counter(), None, 0
    body = {"model": "model", "prompt": cfg["prompt"], "max_tokens": cfg["max_tokens"], "temperature": 1.0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter() - t0
    return time.perf_counter() - t0, first, tokens


async def level(url, clients, cfg):
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def client():
            return [await one_request(http, cfg) for _ in range(cfg["requests"])]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[client() for _ in range(clients)]) for r in rs]
        wall = time.perf_counter() - t0
    latency, ttft, tokens = zip(*results)
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 3),
            "latency_p50_s": round(quantile(latency, 0.5), 4), "latency_p95_s": round(quantile(latency, 0.95), 4),
            "ttft_p50_s": round(quantile(ttft, 0.5), 4), "ttft_p95_s": round(quantile(ttft, 0.95), 4),
            "tokens_per_s": round(sum(tokens) / wall, 1),
            "stream_tokens_per_s": round(statistics.mean(t / lat for t, lat in zip(tokens, latency)), 1)}


def start_server(cfg, port, device, *extra, cwd=None):
    args = [sys.executable, os.path.join(ROOT, "serve.py"), f"--port={port}", f"--out_root={cfg['out_dir']}",
            f"--jobs_dir={os.path.join(cfg['out_dir'], 'jobs')}", f"--device={device}", f"--dtype={cfg['dtype']}",
            f"--max_batch={max(cfg['concurrency'])}", f"--max_tokens={cfg['max_tokens']}", f"--threads={cfg['threads']}",
            *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/health", timeout=1)
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit(f"serve.py exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("serve.py did not answer /health within 2 minutes")


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for graph in dict.fromkeys(lv["decode_graph"] for lv in result["levels"]):
        levels = [lv for lv in result["levels"] if lv["decode_graph"] == graph]
        x, tag = [lv["clients"] for lv in levels], ", decode_graph" if graph else ""
        a.plot(x, [lv["tokens_per_s"] for lv in levels], "o-", label=f"server, aggregate{tag}")
        b.plot(x, [lv["latency_p50_s"] for lv in levels], "o-", label=f"latency p50{tag}")
        b.plot(x, [lv["latency_p95_s"] for lv in levels], "o--", label=f"latency p95{tag}")
        b.plot(x, [lv["ttft_p50_s"] for lv in levels], "s-", label=f"time to first token p50{tag}")
    a.axhline(result["in_process_tokens_per_s"], color="gray", ls="--", label="in-process, one stream")
    a.set(xscale="log", xlabel="concurrent clients", ylabel="completion tokens/s", xticks=x, xticklabels=x)
    a.legend()
    b.set(xscale="log", xlabel="concurrent clients", ylabel="seconds", xticks=x, xticklabels=x)
    b.legend()
    fig.suptitle(f"serve.py load: {result['config']} on {result['device']}, {result['max_tokens']} tokens per request")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- the soak

def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def soak_completions(http, rng, stats, deadline):
    """Random completions until the deadline; provoked errors (bad values, hang-ups) are counted apart."""
    while time.time() < deadline:
        body = {"model": "model", "prompt": rng.choice(["ROMEO:", "To be", "", "KING HENRY:\nMy lord"]),
                "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0.0, 0.7, 1.0]), "n": rng.choice([1, 1, 2]),
                "stop": rng.choice([None, "\n", ["e", "."]]), "logprobs": rng.choice([None, None, 2]),
                "seed": rng.choice([None, 7])}
        kind = rng.choices(["plain", "stream", "hangup", "bad"], [4, 4, 1, 1])[0]
        if kind == "bad":
            field, value = rng.choice([("max_tokens", 0), ("top_p", 2.0), ("temperature", -1), ("n", 1000)])
            body[field] = value
        try:
            if kind == "plain" or kind == "bad":
                r = await http.post("/v1/completions", json=body)
                ok = r.status_code == 200 if kind == "plain" else r.status_code in (400, 422)
            else:
                async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    ok, lines = r.status_code == 200, []
                    async for line in r.aiter_lines():
                        lines.append(line)
                        if kind == "hangup" and len(lines) > 2:
                            break
                    ok = ok and (kind == "hangup" or "data: [DONE]" in lines)
        except httpx.HTTPError as e:
            ok, r = False, type(e).__name__
        stats[kind] = stats.get(kind, 0) + 1
        if not ok:
            stats["unexpected"].append(f"{kind}: {getattr(r, 'status_code', r)} {getattr(r, 'text', '')[:200]}")


async def soak_jobs(http, stats, deadline):
    """Tiny train jobs one after another; every third is cancelled once it runs."""
    i = 0
    while time.time() < deadline:
        r = await http.post("/v1/jobs", json={"kind": "train", "config": "soak.py",
                                              "overrides": {"out_dir": f"out/job{i}", "max_iters": 60 if i % 3 else 100000}})
        if r.status_code != 202:
            stats["unexpected"].append(f"job submit: {r.status_code} {r.text[:200]}")
            return
        job_id, expect = r.json()["id"], "succeeded" if i % 3 else "cancelled"
        while True:
            job = (await http.get(f"/v1/jobs/{job_id}")).json()
            if expect == "cancelled" and job["state"] == "running" and (job["last_metrics"] or {}).get("step", 0) >= 10:
                await http.delete(f"/v1/jobs/{job_id}")
            if job["state"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.5)
        stats["jobs"][job["state"]] = stats["jobs"].get(job["state"], 0) + 1
        if job["state"] != expect:
            stats["unexpected"].append(f"job {job_id}: {job['state']} (expected {expect}): {job['error']}")
        i += 1


async def soak(url, pid, cfg):
    rng, stats = random.Random(cfg["seed"]), {"unexpected": [], "jobs": {}}
    rss = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        with open(os.path.join(ASSETS, "tinyshakespeare", "input.txt"), "rb") as f:
            r = await http.post("/v1/datasets?name=soak", content=f.read(200_000),
                                headers={"content-type": "application/octet-stream"})
        job_id = r.json()["id"]
        while (job := (await http.get(f"/v1/jobs/{job_id}")).json())["state"] in ("queued", "running"):
            await asyncio.sleep(0.5)
        if job["state"] != "succeeded":
            raise SystemExit(f"the soak's prepare job {job['state']}: {job['error']}")
        await http.post("/v1/completions", json={"model": "model", "max_tokens": 4})  # load the model first
        start = time.time()
        deadline = start + cfg["soak_minutes"] * 60

        async def watch():
            while time.time() < deadline:
                rss.append((round(time.time() - start, 1), round(rss_mb(pid), 1)))
                await asyncio.sleep(10)
        await asyncio.gather(watch(), soak_jobs(http, stats, deadline),
                             *[soak_completions(http, random.Random(rng.random()), stats, deadline)
                               for _ in range(cfg["soak_clients"])])
        rss.append((round(time.time() - start, 1), round(rss_mb(pid), 1)))
        health = (await http.get("/health")).json()
    return {"minutes": cfg["soak_minutes"], "requests": {k: v for k, v in stats.items() if k not in ("unexpected", "jobs")},
            "jobs": stats["jobs"], "unexpected_errors": len(stats["unexpected"]),
            "unexpected_examples": stats["unexpected"][:10], "rss_mb_start": rss[0][1], "rss_mb_end": rss[-1][1],
            "rss_mb_max": max(v for _, v in rss), "rss_mb": rss, "health_at_end": health}


def run_soak(cfg, device):
    work = os.path.abspath(cfg["out_dir"])
    os.makedirs(os.path.join(work, "config"), exist_ok=True)
    with open(os.path.join(work, "config", "soak.py"), "w") as f:
        f.write(SOAK_JOB)
    save_random_model(cfg, os.path.join(work, "out", "model", "ckpt.pt"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    soak_cfg = {**cfg, "out_dir": "out"}  # relative to the server's working folder, work/
    proc, url = start_server(soak_cfg, port, str(device), "--data_root=data", "--jobs_dir=jobs",
                             f"--config_root={os.path.join(work, 'config')}", cwd=work)
    try:
        result = asyncio.run(soak(url, proc.pid, cfg))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    result |= {"config": cfg["config"], "date": time.strftime("%Y-%m-%d"), "clients": cfg["soak_clients"],
               "command": "python experiments/serve_load.py " + " ".join(sys.argv[1:])}
    with open(os.path.join(work, "serve_soak.json"), "w") as f:
        json.dump(result, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([t / 60 for t, _ in result["rss_mb"]], [v for _, v in result["rss_mb"]], "o-")
    ax.set(xlabel="minutes", ylabel="server RSS (MB)", ylim=(0, None),
           title=f"serve.py soak: {sum(result['requests'].values())} requests, {sum(result['jobs'].values())} jobs")
    fig.tight_layout()
    fig.savefig(os.path.join(work, "serve_soak.png"), dpi=100)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb"}, indent=1))


def server_levels(cfg, device, decode_graph):
    """Every concurrency level against one server, started with this decode_graph."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = [f"--decode_graph={decode_graph}"] + ([f"--decode_compile={cfg['decode_compile']}"] if decode_graph else [])
    proc, url = start_server(cfg, port, str(device), *extra)
    try:
        asyncio.run(level(url, 1, {**cfg, "requests": 1}))  # loads the model and warms up (and captures its graph)
        levels = []
        for clients in cfg["concurrency"]:
            levels.append({**asyncio.run(level(url, clients, cfg)), "decode_graph": decode_graph})
            print(json.dumps(levels[-1]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    err = proc.stderr.read().decode().strip()
    if err:  # e.g. batching's warning that the decode step could not be captured (then it ran uncaptured)
        print(f"serve.py (decode_graph={decode_graph}) wrote to stderr:\n{err[-3000:]}")
    return levels


def check_decode_graph(values, device):
    if not values or not all(isinstance(v, bool) for v in values):
        raise SystemExit(f"decode_graph is a list of True/False, one server each (e.g. [False,True]), got {values!r}")
    if any(values) and device.type != "cuda":
        raise SystemExit(f"decode_graph=True replays serve.py's decode step as a CUDA graph: it needs --device=cuda, "
                         f"got {device}")


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    device = resolve_device(cfg["device"])
    cfg["threads"] = set_threads(cfg["threads"])
    if cfg["soak_minutes"] > 0:
        return run_soak(cfg, device)
    check_decode_graph(cfg["decode_graph"], device)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[resolve_dtype(cfg["dtype"], device)]
    model, meta = save_random_model(cfg, os.path.join(cfg["out_dir"], "model", "ckpt.pt"))
    levels = [lv for graph in cfg["decode_graph"] for lv in server_levels(cfg, device, graph)]
    with torch.no_grad():
        baseline = in_process_tokens_per_s(model, meta, cfg, device, dtype)
    first = [lv for lv in levels if lv["decode_graph"] == cfg["decode_graph"][0]]  # the first server's levels
    single = next((lv for lv in first if lv["clients"] == 1), None)
    result = {"config": cfg["config"], "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "max_tokens": cfg["max_tokens"],
              "params_m": round(model.num_params(False) / 1e6, 2), "levels": levels,
              "in_process_tokens_per_s": round(baseline, 1), "date": time.strftime("%Y-%m-%d"),
              "command": "python experiments/serve_load.py " + " ".join(argv)}
    if single:
        result["single_stream_overhead"] = round(1 - single["stream_tokens_per_s"] / baseline, 3)
        result["scaling_vs_single"] = {lv["clients"]: round(lv["tokens_per_s"] / single["tokens_per_s"], 2)
                                       for lv in first}
    if {False, True} <= set(cfg["decode_graph"]):
        eager = {lv["clients"]: lv["tokens_per_s"] for lv in levels if not lv["decode_graph"]}
        result["graph_speedup"] = {lv["clients"]: round(lv["tokens_per_s"] / eager[lv["clients"]], 2)
                                   for lv in levels if lv["decode_graph"]}
    with open(os.path.join(cfg["out_dir"], "serve_load.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(cfg["out_dir"], "serve_load.png"))
    print(json.dumps({k: v for k, v in result.items() if k != "levels"}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
