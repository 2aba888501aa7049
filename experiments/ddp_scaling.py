"""
Does training on two GPUs give twice the tokens/s of one, and the same model? (issue 17)

    python prepare.py --dataset=shakespeare
    python experiments/ddp_scaling.py --out=out/ddp_scaling                     # a machine with 2 GPUs
    python experiments/ddp_scaling.py --smoke=True --device=cpu --out=/tmp/ddp  # 2 gloo processes, tiny model
    python experiments/ddp_scaling.py --parts=[] --out=out/ddp_scaling          # the report again from the runs there

Each model config (gpu_124m, gpu_1b) is trained by train.py itself, `python train.py <config>` on one GPU and
`torchrun --standalone --nproc_per_node=2 train.py <config>` on two, in two ways:
- speed: the config's own global batch (gradient_accumulation_steps is global: each of two processes takes
  half), a few steps, nothing else on the machine. tokens/s is the median of the per-step log lines after
  the first two steps (train.py logs the compile step apart).
- loss: loss_steps steps at a smaller global batch (loss_accum micro-batches per step, so the comparison fits
  in minutes), then the validation loss. Seed A on one GPU and on two see the same windows in the same steps
  (data.get_batch draws every process's share from one generator), so they differ only by rounding; seed B on
  one GPU is the yardstick: two GPUs are "within noise" when they land closer to seed A than seed B does.
  One-GPU loss runs go to free GPUs at once; speed runs and multi-GPU runs wait for the machine.
Writes <out>/ddp_scaling.json and <out>/ddp_scaling.png; every run's folder (metrics.jsonl, log) stays in
<out>/runs, while checkpoints go to `scratch` (e.g. /dev/shm: a 1B checkpoint is ~10 GB) and are deleted.
"""
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
import processes  # noqa: E402
from metrics import save_figure  # noqa: E402
from runtime import read_jsonl  # noqa: E402

DEFAULTS = dict(
    out="out/ddp_scaling",
    scratch="",           # where checkpoints are written (and deleted after each run); "" = beside the metrics
    models={  # name -> train.py config, steps of the speed run, micro-batches per step of the loss runs, and
              # optionally loss_args: more train.py overrides for the loss runs only
        "gpu_124m": {"config": "config/gpu_124m.py", "speed_steps": 20, "loss_accum": 8},
        # uncompiled loss runs: the comparison is of the loss, and the 1B's compilation costs two minutes a run
        "gpu_1b": {"config": "config/gpu_1b.py", "speed_steps": 5, "loss_accum": 2, "loss_args": ["--compile=False"]},
    },
    gpus=2,               # processes of the multi-GPU runs (one GPU each); the baseline is always one process
    parts=["speed", "loss"],
    only=[],              # run names to (re)run, e.g. ["gpu_1b_speed_2gpu"]; [] runs every run of the parts
    loss_steps=200,
    loss_evals=4,         # evaluations in a loss run (the last after loss_steps)
    loss_eval_iters=50,   # batches per evaluation
    seeds=[1337, 1338],   # seed A (one and several GPUs), seed B (one GPU: the seed-to-seed yardstick)
    device="auto",        # auto | cuda | cpu (cpu: gloo processes, for the smoke test)
    data_dir="data",
    train_args=[],        # more train.py overrides for every run, e.g. ["--dataset=tiny"]
    smoke=False,          # tiny shapes, uncompiled, a few steps: checks the script runs (numbers mean nothing)
)
SMOKE = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--compile=False",
         "--checkpoint_activations=False"]
TARGET = 1.85  # the tokens/s ratio, two GPUs over one


def count_gpus(device):
    if device == "cpu":
        return 0
    import torch
    return torch.cuda.device_count()


def jobs_for(cfg):
    """Every run of the chosen parts, in the order they should start: [{name, model, part, procs, seed, args}]."""
    jobs = []
    for model, spec in cfg["models"].items():
        if "speed" in cfg["parts"]:
            steps = 3 if cfg["smoke"] else spec["speed_steps"]
            for procs in (1, cfg["gpus"]):
                jobs.append(dict(name=f"{model}_speed_{procs}gpu", model=model, part="speed", procs=procs,
                                 seed=cfg["seeds"][0], args=[f"--max_iters={steps}", f"--eval_interval={steps}",
                                                             "--eval_iters=1", "--log_interval=1"]))
    for model, spec in cfg["models"].items():
        if "loss" in cfg["parts"]:
            steps = 6 if cfg["smoke"] else cfg["loss_steps"]
            common = [*spec.get("loss_args", []), f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--warmup_iters={max(1, steps // 10)}",
                      f"--eval_interval={max(1, steps // cfg['loss_evals'])}", f"--eval_iters={cfg['loss_eval_iters']}",
                      f"--gradient_accumulation_steps={spec['loss_accum']}", "--log_interval=5"]
            seed_a, seed_b = cfg["seeds"]
            for procs, seed in ((1, seed_a), (1, seed_b), (cfg["gpus"], seed_a)):
                jobs.append(dict(name=f"{model}_loss_{procs}gpu_seed{seed}", model=model, part="loss", procs=procs,
                                 seed=seed, args=common))
    return [j for j in jobs if not cfg["only"] or j["name"] in cfg["only"]]


def command(cfg, job, out_dir):
    """argv of one run: plain python for one process (what a one-GPU user runs), torchrun for several."""
    script = os.path.join(ROOT, "train.py")
    launcher = [sys.executable, script] if job["procs"] == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job['procs']}", script]
    device = "cpu" if cfg["device"] == "cpu" else "auto"
    return [*launcher, os.path.join(ROOT, cfg["models"][job["model"]]["config"]), *job["args"],
            *(SMOKE if cfg["smoke"] else []), *cfg["train_args"], f"--seed={job['seed']}", f"--out_dir={out_dir}", f"--device={device}",
            f"--data_dir={cfg['data_dir']}", "--overwrite=True"]


def run_all(cfg, jobs, done):
    """Run the jobs, each on GPUs no other job holds; a speed run or a multi-GPU run has the machine to itself.
    Fills done with {name: (exit code or None if stopped, seconds)}. Metrics and logs go to
    <out>/runs/<name>, checkpoints to scratch."""
    gpus = count_gpus(cfg["device"])
    if cfg["device"] != "cpu" and gpus < cfg["gpus"]:
        raise SystemExit(f"this machine has {gpus} GPU(s); the multi-GPU runs need gpus={cfg['gpus']}")
    free, running, pending = set(range(max(gpus, cfg["gpus"]))), {}, list(jobs)
    # NCCL_NVLS_ENABLE and the machine's other multicast settings pass through unchanged, as everything else
    env = os.environ | {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    bar = tqdm(total=len(jobs), unit="run")
    try:
        schedule(cfg, gpus, env, free, running, done, pending, bar)
    finally:  # stopped (Ctrl-C, SIGTERM from a time limit): the runs still going keep what they logged
        # killed at once, each whole group (torchrun's ranks too): their checkpoints are deleted anyway
        processes.stop_all([r["proc"] for r in running.values()], grace=0)
        for name, r in running.items():
            collect(r)
            done[name] = (None, time.perf_counter() - r["t0"])
        bar.close()


def collect(r):
    """A finished or stopped run: its metrics beside its log, its checkpoints deleted."""
    r["log"].close()
    if r["ckpt_dir"] != r["run_dir"]:
        for f in ("metrics.jsonl", "config.json"):
            if os.path.exists(os.path.join(r["ckpt_dir"], f)):
                shutil.copy(os.path.join(r["ckpt_dir"], f), r["run_dir"])
        shutil.rmtree(r["ckpt_dir"], ignore_errors=True)
    else:
        for f in glob.glob(os.path.join(r["run_dir"], "*.pt")):
            os.remove(f)


def schedule(cfg, gpus, env, free, running, done, pending, bar):
    """Start each pending job once its GPUs are free; wait for them all."""
    while pending or running:
        job = pending[0] if pending else None
        alone = job and (job["part"] == "speed" or job["procs"] > 1)
        if job and len(free) >= job["procs"] and not (alone and running) and not any(
                j["alone"] for j in running.values()):
            pending.pop(0)
            held = sorted(free)[:job["procs"]]
            free -= set(held)
            run_dir = os.path.join(cfg["out"], "runs", job["name"])
            ckpt_dir = os.path.join(cfg["scratch"], job["name"]) if cfg["scratch"] else run_dir
            shutil.rmtree(run_dir, ignore_errors=True)
            os.makedirs(run_dir)
            log = open(os.path.join(run_dir, "log.txt"), "w")
            job_env = env | ({"CUDA_VISIBLE_DEVICES": ",".join(map(str, held))} if gpus else {})
            # its own process group; if this script dies, SIGTERM (train.py stops, torchrun stops its ranks)
            proc = processes.start(command(cfg, job, ckpt_dir), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=job_env, death_signal=signal.SIGTERM)
            running[job["name"]] = dict(proc=proc, log=log, held=held, alone=alone, run_dir=run_dir,
                                        ckpt_dir=ckpt_dir, t0=time.perf_counter())
            continue
        time.sleep(1)
        for name, r in list(running.items()):
            if not processes.exited(r["proc"]):
                continue
            code = processes.stop(r["proc"], grace=0)  # reaped, and anything it left in its group ended
            collect(r)
            free |= set(r["held"])
            done[name] = (code, time.perf_counter() - r["t0"])
            del running[name]
            bar.update(1)


EVAL_LINE = re.compile(r"^step (\d+): train ([\d.]+), val ([\d.]+) \(([\d.]+) s of training\)")


def read_log(log):
    """What train.py printed: (its config, [(step, val, train seconds)]). Where a run was stopped before its
    metrics.jsonl could be kept, its printed evaluations still give its val curve and its mean speed."""
    config, evals = None, []
    for line in open(log).read().splitlines():
        if line.startswith("config: {") and config is None:
            config = json.loads(line[len("config: "):])
        elif m := EVAL_LINE.match(line):
            evals.append((int(m[1]), float(m[3]), float(m[4])))
    return config, evals


def read_run(cfg, name):
    """A run's val curve, train batch losses, per-step tokens/s and mean tokens/s over its timed steps, or its
    error (the end of its log). Timed steps: all but the compile step, which train.py logs apart."""
    run_dir = os.path.join(cfg["out"], "runs", name)
    log = os.path.join(run_dir, "log.txt")
    if not os.path.exists(log):
        return dict(error="not run")
    config, printed = read_log(log)
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = read_jsonl(path) if os.path.exists(path) else []
    evals = [(r["step"], r["val_loss"], r["train_time"]) for r in rows if "val_loss" in r] or printed
    if not evals or config is None:
        # a worker's own message comes before torchrun's report of the failure
        lines = [l for l in open(log).read().splitlines() if l.strip()]
        cut = next((i for i, l in enumerate(lines) if "torch.distributed" in l or l.startswith("Traceback")), len(lines))
        return dict(error=f"see {log}: " + " | ".join(lines[max(0, cut - 3):cut] or lines[-3:]))
    tokens_per_step = config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
    last_step, _, train_time = evals[-1]
    timed = last_step - (1 if config["compile"] else 0)
    steps = [r for r in rows if "tokens_per_s" in r]
    return dict(val=[(s, v) for s, v, _ in evals], train=[(r["step"], r["loss"]) for r in steps],
                tokens_per_s=[r["tokens_per_s"] for r in steps], from_log=not rows,
                mean_tokens_per_s=tokens_per_step * timed / train_time if train_time else None)


def summarize(cfg):
    """{model: {speed: ..., loss: ...}} from the run folders under <out>/runs."""
    report = {}
    seed_a, seed_b = cfg["seeds"]
    n = cfg["gpus"]
    for model in cfg["models"]:
        one, many = read_run(cfg, f"{model}_speed_1gpu"), read_run(cfg, f"{model}_speed_{n}gpu")
        speed = dict(one_gpu=one.get("error"), many_gpu=many.get("error"))
        if one.get("mean_tokens_per_s") and many.get("mean_tokens_per_s"):
            # two estimates: the mean over every timed step (warm-up steps included), and, where per-step
            # rows were kept, the median after the first two (steady state: DDP rebuilds its buckets early)
            a, b = one["mean_tokens_per_s"], many["mean_tokens_per_s"]
            speed = dict(one_gpu_mean_tokens_per_s=a, many_gpu_mean_tokens_per_s=b, ratio_mean=b / a)
            if one["tokens_per_s"][2:] and many["tokens_per_s"][2:]:
                a, b = statistics.median(one["tokens_per_s"][2:]), statistics.median(many["tokens_per_s"][2:])
                speed |= dict(one_gpu_median_tokens_per_s=a, many_gpu_median_tokens_per_s=b, ratio_median=b / a)
            speed |= dict(one_gpu_tokens_per_s=a, many_gpu_tokens_per_s=b, ratio=b / a,
                          estimate="median" if "ratio_median" in speed else "mean", target=TARGET,
                          meets_target=b / a >= TARGET, from_log=one["from_log"] or many["from_log"])
        runs = {key: read_run(cfg, f"{model}_loss_{procs}gpu_seed{seed}")
                for key, procs, seed in (("one_gpu_seed_a", 1, seed_a), ("one_gpu_seed_b", 1, seed_b),
                                         ("many_gpu_seed_a", n, seed_a))}
        loss = {k: r.get("error") for k, r in runs.items() if "error" in r}
        if not loss:
            final = {k: r["val"][-1][1] for k, r in runs.items()}
            ddp_gap = abs(final["many_gpu_seed_a"] - final["one_gpu_seed_a"])
            seed_gap = abs(final["one_gpu_seed_b"] - final["one_gpu_seed_a"])
            loss = dict(step=runs["one_gpu_seed_a"]["val"][-1][0], final_val=final, ddp_gap=ddp_gap, seed_gap=seed_gap,
                        within_noise=ddp_gap <= seed_gap,
                        curves={k: r["val"] for k, r in runs.items()}, train={k: r["train"] for k, r in runs.items()})
        report[model] = dict(speed=speed, loss=loss)
    return report


def plot(cfg, report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(report)
    fig, axes = plt.subplots(1, 1 + len(models), figsize=(5 * (1 + len(models)), 4.5))
    bars = axes[0]
    for i, model in enumerate(models):
        s = report[model]["speed"]
        if "ratio" not in s:
            continue
        bars.bar([2 * i, 2 * i + 0.8], [1.0, s["ratio"]], width=0.7, color=["C0", "C1"])
        bars.text(2 * i + 0.8, s["ratio"], f"{s['ratio']:.2f}x\n{s['many_gpu_tokens_per_s'] / 1e3:,.0f}K tok/s",
                  ha="center", va="bottom", fontsize=8)
        bars.text(2 * i, 1.0, f"{s['one_gpu_tokens_per_s'] / 1e3:,.0f}K", ha="center", va="bottom", fontsize=8)
    bars.axhline(TARGET, color="k", ls="--", lw=0.8, label=f"target {TARGET}x")
    bars.axhline(cfg["gpus"], color="grey", ls=":", lw=0.8, label="perfect")
    bars.set_xticks([2 * i + 0.4 for i in range(len(models))], models)
    bars.set(ylabel=f"tokens/s vs one GPU (blue 1, orange {cfg['gpus']})", title="speed at the config's global batch",
             ylim=(0, cfg["gpus"] * 1.2))
    bars.legend(fontsize=8)
    for ax, model in zip(axes[1:], models):
        loss = report[model]["loss"]
        for i, key in enumerate(("one_gpu_seed_a", "one_gpu_seed_b", "many_gpu_seed_a")):
            if "curves" not in loss:
                break
            label = key.replace("many_gpu", f"{cfg['gpus']}_gpus").replace("one_gpu", "1_gpu")
            steps, vals = zip(*loss["curves"][key])
            ax.plot(steps, vals, color=f"C{i}", marker="o", ms=3, lw=2 if i != 2 else 1, ls="-" if i != 2 else "--",
                    label=f"{label}: val {vals[-1]:.4f}")
            if loss["train"][key]:
                t_steps, t_vals = zip(*loss["train"][key])
                ax.plot(t_steps, t_vals, color=f"C{i}", lw=0.6, alpha=0.4)
        title = f"{model}: val after {loss.get('step', '?')} steps" + (
            f"\n{cfg['gpus']}-GPU gap {loss['ddp_gap']:.4f}, seed gap {loss['seed_gap']:.4f}" if "ddp_gap" in loss else "")
        ax.set(xlabel="step", ylabel="loss (thin: train batches, rank 0's share)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    unknown = [p for p in cfg["parts"] if p not in ("speed", "loss")]
    if unknown or len(cfg["seeds"]) != 2 or cfg["gpus"] < 2 or not cfg["models"]:
        raise SystemExit(f"need parts from ['speed', 'loss'] (got {unknown}), two seeds, gpus >= 2 and a model")
    for model, spec in cfg["models"].items():
        missing = {"config", "speed_steps", "loss_accum"} - set(spec)
        unknown = set(spec) - {"config", "speed_steps", "loss_accum", "loss_args"}
        if unknown:
            raise SystemExit(f"models[{model!r}] has unknown keys {sorted(unknown)}")
        if missing or not os.path.exists(os.path.join(ROOT, spec.get("config", ""))):
            raise SystemExit(f"models[{model!r}] needs config (an existing file), speed_steps and loss_accum")
        if spec["loss_accum"] % cfg["gpus"]:
            raise SystemExit(f"models[{model!r}] loss_accum={spec['loss_accum']} must be a multiple of gpus={cfg['gpus']}")
    os.makedirs(cfg["out"], exist_ok=True)
    # a time limit's SIGTERM unwinds like Ctrl-C: the runs going are stopped and keep what they logged
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t0, done, stopped = time.perf_counter(), {}, None
    try:
        if jobs := jobs_for(cfg):  # none with parts=[]: the report again from the runs already there
            run_all(cfg, jobs, done)
    except (KeyboardInterrupt, SystemExit) as e:  # the report still covers every run, finished or stopped
        stopped = e
    report = summarize(cfg)
    write_json_atomic(os.path.join(cfg["out"], "ddp_scaling.json"),
                      dict(settings=cfg, command=" ".join(["python", *sys.argv]), wall_s=time.perf_counter() - t0,
                           runs={name: dict(exit_code=code, seconds=s) for name, (code, s) in done.items()},
                           report=report))
    plot(cfg, report, os.path.join(cfg["out"], "ddp_scaling.png"))
    for model, r in report.items():
        s, loss = r["speed"], r["loss"]
        if "ratio" in s:
            print(f"{model}: {s['one_gpu_tokens_per_s']:,.0f} -> {s['many_gpu_tokens_per_s']:,.0f} tokens/s "
                  f"= {s['ratio']:.3f}x on {cfg['gpus']} GPUs ({s['estimate']} of the timed steps; mean "
                  f"{s['ratio_mean']:.3f}x; target {TARGET}x)")
        else:
            print(f"{model}: speed not measured: {s}")
        if "ddp_gap" in loss:
            print(f"{model}: val after {loss['step']} steps {loss['final_val']}; {cfg['gpus']}-GPU gap "
                  f"{loss['ddp_gap']:.4f}, seed gap {loss['seed_gap']:.4f} ({'within' if loss['within_noise'] else 'outside'} noise)")
        else:
            print(f"{model}: loss not measured: see {cfg['out']}/runs/*/log.txt")
    if stopped is not None:
        raise SystemExit("stopped before every run finished; the report covers what they logged")


if __name__ == "__main__":
    main(sys.argv[1:])
