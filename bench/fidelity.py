"""Research fidelity at CPU scale: do the paper's findings hold for small models trained here?

    .venv/bin/python bench/fidelity.py [--out runs/fidelity] [--steps 100]      # default: (a) (b) (c) (d)
    .venv/bin/python bench/fidelity.py --full               # + (e); 500 recall steps, 10 NIAH records per length
    .venv/bin/python bench/fidelity.py --variants fwpkm noaddr                   # a subset (rows resume)
    .venv/bin/python bench/fidelity.py --variants nowg notm h4k8 h1k32           # the rest of App. D (by name only)
    .venv/bin/python bench/fidelity.py --variants deep4-none deep4               # 4 layers, FwPKM at 2 (by name only)

Findings (docs/results.md reports them; method notes 5.2, 5.7):
  (a) recall beyond the attention window: no memory / static PKM / FwPKM / PKM + FwPKM, FwPKM one layer
      deeper (before layer 1), and a GDN + SWA hybrid without and with FwPKM (by name: a 4-layer model
      without memory and with FwPKM before layer 2), trained alike on
      `fwpkm-prep recall` documents, scored on held-out documents (their own seed) by the loss and top-1
      accuracy of the queried value tokens;
  (b) test-time memorisation: the FwPKM model of (a) read per_sequence vs persistent vs frozen;
  (c) reads 1..4 NIAH-style (recall needles in filler) at 1x, 4x and 16x the training length,
      through the exported model and `fwpkm-eval niah`'s protocol;
  (d) ablations of the FwPKM model: lookahead 0, dot-product scores, no addressing loss, no gate, no loss
      weight, no value norm, 4 heads x top-8, 1 head x top-32 (with slot coverage, collision rate and KL to
      uniform over the evaluation's reads);
  (e) [--full] natural text: configs/tiny.yaml on the `make demo` corpus, no memory / PKM / FwPKM / both
      at equal steps: validation perplexity and loss by position.
Every compared model has the same backbone, steps, batch, data order and seed. Nothing is tuned on the
evaluation documents. Each variant's result lands in OUT/variants/KEY.json as it finishes (a rerun with
the same arguments skips finished ones); OUT/results.{json,md} and OUT/*.png are rewritten at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fwpkm_megatron.config import load_config
from fwpkm_megatron.data.recall import RecallSpec, read_eval_records, write_recall
from fwpkm_megatron.eval.recall import chance_loss, loss_by_position, recall_metrics
from fwpkm_megatron.training.trainer import Trainer

# The recall model (docs/results.md): 2 layers x 128, sliding window 16 (reach 2 x 15 = 30 tokens < the
# 32-token minimum key -> query distance), untied embeddings, FwPKM before layer 0's mixer, static PKM as
# layer 1's MLP. 8 seqs x 256 tok = 2,048 tok/step.
RECALL_BASE = ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4",
               "model.max_seq_len=256", "model.attention=swa", "model.window=16", "model.tie_embeddings=false",
               "model.init_std=0.05", "fwpkm.num_slots=4096", "fwpkm.d_k=64", "fwpkm.d_v=128", "fwpkm.topk=8",
               "fwpkm.chunk_size=16", "fwpkm.policy=per_sequence", "pkm.num_slots=4096", "pkm.d_k=64",
               "pkm.d_v=128", "pkm.heads=2", "pkm.topk=8", "train.micro_batch_size=8", "train.seq_len=256",
               "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=50", "train.log_every=50",
               "train.eval_batches=4", "train.threads=1"]
FW, PKM = "fwpkm.layers=[0]", "pkm.layers=[1]"
# The paper's GDN:SWA = 3:1 hybrid cut to 2 layers: a Gated DeltaNet mixer at layer 0 (4 heads x 32, as
# configs/tiny-gdn.yaml) and the same window-16 attention at layer 1, so FwPKM again sits before layer 0's
# mixer, now a GDN one as in the paper. The GDN state has unbounded reach: nothing stops it recalling alone.
GDN = ["model.mixer=gdn", "model.attention_layers=[1]", "model.gdn_num_key_heads=4", "model.gdn_num_value_heads=4",
       "model.gdn_key_head_dim=32", "model.gdn_value_head_dim=32"]
DEEP4 = ["model.num_layers=4", "model.window=8"]
RECALL_VARIANTS = {  # key: (finding, label, overrides)
    "none": ("a", "no memory", ["fwpkm.layers=[]", "pkm.layers=[]"]),
    "pkm": ("a", "static PKM", ["fwpkm.layers=[]", PKM]),
    "fwpkm": ("a", "FwPKM", [FW, "pkm.layers=[]"]),
    "both": ("a", "PKM + FwPKM", [FW, PKM]),
    # one layer deeper: the query comes from layer 0's output (the token in its 16-token window), not the embedding
    "deep": ("a", "FwPKM before layer 1", ["fwpkm.layers=[1]", "pkm.layers=[]"]),
    "gdn": ("a", "GDN + SWA, no memory", [*GDN, "fwpkm.layers=[]", "pkm.layers=[]"]),
    "gdn-fwpkm": ("a", "GDN + SWA, FwPKM", [*GDN, FW, "pkm.layers=[]"]),
    "lahd0": ("d", "FwPKM, lookahead 0", [FW, "pkm.layers=[]", "fwpkm.lookahead=0"]),
    "dot": ("d", "FwPKM, dot-product scores", [FW, "pkm.layers=[]", "fwpkm.score=dot"]),
    "noaddr": ("d", "FwPKM, no addressing loss", [FW, "pkm.layers=[]", "fwpkm.addr_loss=false"]),
    "nogate": ("d", "FwPKM, no gate", [FW, "pkm.layers=[]", "fwpkm.gate=false"]),
    # the rest of App. D: the gate in the output but not in the memorization loss, no value z-scoring, and the
    # two larger read patterns (4 heads x top-8; 1 head x top-32)
    "nowg": ("d", "FwPKM, no loss weight", [FW, "pkm.layers=[]", "fwpkm.gate_weighted_loss=false"]),
    "notm": ("d", "FwPKM, no value norm", [FW, "pkm.layers=[]", "fwpkm.value_zscore=false"]),
    "h4k8": ("d", "FwPKM, 4 heads x top-8", [FW, "pkm.layers=[]", "fwpkm.heads=4"]),
    "h1k32": ("d", "FwPKM, 1 head x top-32", [FW, "pkm.layers=[]", "fwpkm.topk=32"]),
    # the paper's memories sit deeper (layers 2, 6, 10 of 12): 4 layers with the window halved to 8, so the
    # attention reach (4 x 7 = 28 tokens) stays below the 32-token key -> query distance, with its own baseline
    "deep4-none": ("a", "4 layers (window 8), no memory", [*DEEP4, "fwpkm.layers=[]", "pkm.layers=[]"]),
    "deep4": ("a", "4 layers (window 8), FwPKM before layer 2", [*DEEP4, "fwpkm.layers=[2]", "pkm.layers=[]"]),
}
# run when named in --variants: the default mode stays within its 30 minutes
BY_NAME_ONLY = ("nowg", "notm", "h4k8", "h1k32", "deep4-none", "deep4")
TEXT_VARIANTS = {  # configs/tiny.yaml has FwPKM at [1, 3] and PKM at [2]
    "text-none": ("e", "no memory", ["fwpkm.layers=[]", "pkm.layers=[]"]),
    "text-pkm": ("e", "static PKM", ["fwpkm.layers=[]"]),
    "text-fwpkm": ("e", "FwPKM", ["pkm.layers=[]"]),
    "text-both": ("e", "PKM + FwPKM", []),
}
SPEC = RecallSpec(docs=4000, eval_docs=256, seq_len=256, keys=32, values=32, filler=64, min_pairs=4, max_pairs=8,
                  min_gap=32, max_gap=48, seed=0, eval_seed=1)
TEXT_DATA = dict(max_mb=8, vocab_size=4096, seq_len=256)  # as `make demo`
TEXT_STEPS = 300  # configs/tiny.yaml's
NIAH_LENGTHS = (256, 1024, 4096)  # 1x, 4x, 16x the training length


def _command(args, key: str) -> str:
    parts = ["python", "bench/fidelity.py", "--out", args.out, "--variants", key]
    if args.full:
        parts.append("--full")
    if args.explicit_steps:
        parts += ["--steps", str(args.steps)]
    if key in TEXT_VARIANTS and args.text_steps != TEXT_STEPS:
        parts += ["--text-steps", str(args.text_steps)]
    return shlex.join(parts)


def _train(run) -> tuple[Trainer, dict]:
    shutil.rmtree(run.train.run_dir, ignore_errors=True)  # a fresh run: never resume another request's checkpoint
    trainer = Trainer(run)
    t0 = time.perf_counter()
    summary = trainer.train()
    return trainer, {"train_seconds": time.perf_counter() - t0, "val_loss": summary["val_loss"],
                     "final_loss_mean_last_10": summary["final_loss_mean_last_10"], "steps": summary["steps"],
                     "tokens_seen": summary["tokens_seen"]}


def run_recall_variant(args, key: str, data: Path) -> dict:
    finding, label, overrides = RECALL_VARIANTS[key]
    run = load_config(None, [*RECALL_BASE, *overrides, f"data.path={data}", f"train.steps={args.steps}",
                             f"train.run_dir={Path(args.out) / 'runs' / key}"])
    trainer, row = _train(run)
    try:
        records = read_eval_records(data)
        policies = ("per_sequence", "persistent", "frozen") if key == "fwpkm" else ("per_sequence",)
        if not run.fwpkm.layers:
            policies = ("per_sequence",)  # no fast weights: every policy reads the same model
        row["eval"] = {p: recall_metrics(trainer.model, records, policy=p) for p in policies}
        if key == "fwpkm":
            row["niah"] = _niah_reads(args, trainer, data)
    finally:
        trainer.close()
    return {"key": key, "finding": finding, "label": label, "overrides": overrides, **row}


def _niah_reads(args, trainer: Trainer, data: Path) -> dict:
    """(c): recall needles at 1x/4x/16x the training length, n reads, through the exported model."""
    from fwpkm_megatron.data.recall import niah_records
    from fwpkm_megatron.eval.niah import evaluate_niah
    from fwpkm_megatron.export import load_model

    records = niah_records(data, lengths=NIAH_LENGTHS, per_length=args.niah_per_length, seed=SPEC.eval_seed + 1)
    model, tokenizer = load_model(str(trainer.last_checkpoint), device="cpu")
    result = evaluate_niah(model, tokenizer, records, n_iters=(1, 2, 3, 4), progress=False)
    return {k: result[k] for k in ("accuracy", "accuracy_by_length")}


def run_text_variant(args, key: str) -> dict:
    from fwpkm_megatron.data import existing_prep, prepare_corpus
    from fwpkm_megatron.eval.perplexity import val_segments

    finding, label, overrides = TEXT_VARIANTS[key]
    data = Path(args.out) / "data" / "stdlib"
    request = dict(max_bytes=int(TEXT_DATA["max_mb"] * 1e6), vocab_size=TEXT_DATA["vocab_size"],
                   seq_len=TEXT_DATA["seq_len"])
    if existing_prep(data, **request) is None:
        prepare_corpus(data, overwrite=True, progress=False, **request)
    run = load_config("configs/tiny.yaml", [*overrides, f"data.path={data}", f"train.steps={args.text_steps}",
                                            f"train.run_dir={Path(args.out) / 'runs' / key}"])
    trainer, row = _train(run)
    try:
        segments = list(val_segments(data, "val", limit=args.text_segments))
        row["eval"] = {"persistent": loss_by_position(trainer.model, segments, policy="persistent")}
    finally:
        trainer.close()
    return {"key": key, "finding": finding, "label": label, "overrides": overrides, **row}


DEFAULT_STEPS = 100
FULL_STEPS = 500  # the trial runs in which this setup first learned recall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fidelity")
    p.add_argument("--steps", type=int, default=None, help=f"recall training steps (default {DEFAULT_STEPS}; "
                                                          f"--full: {FULL_STEPS})")
    p.add_argument("--full", action="store_true", help="500 recall steps, 10 NIAH records per length, plus (e) "
                                                       "natural text")
    p.add_argument("--variants", nargs="+", help="run only these keys (default: all of the mode)")
    p.add_argument("--text-steps", type=int, default=TEXT_STEPS, help="(e) steps, as configs/tiny.yaml")
    p.add_argument("--text-segments", type=int, default=64, help="(e) val segments scored")
    p.add_argument("--niah-per-length", type=int, default=None, help="(c) records per length (default 5; --full 10)")
    args = p.parse_args()
    explicit_steps = args.steps is not None
    if args.steps is None:
        args.steps = FULL_STEPS if args.full else DEFAULT_STEPS
    args.explicit_steps = explicit_steps
    if args.niah_per_length is None:
        args.niah_per_length = 10 if args.full else 5
    out = Path(args.out)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    keys = [k for k in RECALL_VARIANTS if k not in BY_NAME_ONLY] + (list(TEXT_VARIANTS) if args.full else [])
    unknown = set(args.variants or []) - set(RECALL_VARIANTS) - set(TEXT_VARIANTS)
    if unknown:
        p.error(f"--variants {sorted(unknown)}: unknown (known: {', '.join([*RECALL_VARIANTS, *TEXT_VARIANTS])})")
    keys = args.variants or keys
    t_start = time.perf_counter()
    data = out / "data" / "recall"
    if any(k in RECALL_VARIANTS for k in keys):
        write_recall(data, SPEC)
    for key in keys:
        path = out / "variants" / f"{key}.json"
        if path.is_file() and json.loads(path.read_text()).get("steps_asked") == _steps(args, key):
            print(f"{key}: done earlier ({path})")
            continue
        t0 = time.perf_counter()
        row = run_recall_variant(args, key, data) if key in RECALL_VARIANTS else run_text_variant(args, key)
        row.update(steps_asked=_steps(args, key), wall_seconds=time.perf_counter() - t0, command=_command(args, key),
                   load_after=os.getloadavg())
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(row, indent=1) + "\n")
        os.replace(tmp, path)
        print(f"{key}: {json.dumps(_brief(row))} ({row['wall_seconds']:.0f} s)", flush=True)
    rows = [json.loads((out / "variants" / f"{k}.json").read_text())
            for k in [*RECALL_VARIANTS, *TEXT_VARIANTS] if (out / "variants" / f"{k}.json").is_file()]
    meta = {"machine": _machine(), "wall_seconds_this_invocation": time.perf_counter() - t_start,
            "chance_loss": chance_loss(SPEC.values), "recall_spec": SPEC.__dict__, "recall_base": RECALL_BASE}
    report(out, rows, meta)


def _steps(args, key: str) -> int:
    return args.steps if key in RECALL_VARIANTS else args.text_steps


def _brief(row: dict) -> dict:
    return {p: {k: round(v, 4) for k, v in e.items() if k in ("loss", "accuracy", "ppl")}
            for p, e in row["eval"].items()}


def _machine() -> dict:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "threads": 1, "uptime_at_end": uptime}


def report(out: Path, rows: list[dict], meta: dict) -> None:
    """results.json, results.md and the plots from the finished variant rows."""
    from fwpkm_megatron.benign import silence

    silence()
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = [f"Chance loss on a value token: ln {SPEC.values} = {meta['chance_loss']:.3f} nats. "
          f"Machine: {meta['machine']['cpu_count']} CPUs, {meta['machine']['uptime_at_end']}.", ""]
    recall = [r for r in rows if r["finding"] in "ad"]
    if recall:
        md += ["| finding | variant | steps | value loss | value top-1 | all-token loss | train s | command |",
               "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in recall:
            e = r["eval"]["per_sequence"]
            md.append(f"| ({r['finding']}) | {r['label']} | {r['steps']} | {e['loss']:.3f} | {e['accuracy']:.3f} | "
                      f"{e['loss_all']:.3f} | {r['train_seconds']:.0f} | `{r['command']}` |")
        md.append("")
    fw = next((r for r in rows if r["key"] == "fwpkm"), None)
    if fw is not None:
        md += ["| (b) FwPKM read as | value loss | value top-1 | all-token loss |", "|---|---:|---:|---:|"]
        md += [f"| {p} | {e['loss']:.3f} | {e['accuracy']:.3f} | {e['loss_all']:.3f} |" for p, e in fw["eval"].items()]
        md += ["", f"Command: `{fw['command']}`", ""]
    mem = [r for r in recall if r["eval"]["per_sequence"].get("memory")]
    if mem:
        md += ["| memory statistics (eval reads, per_sequence) | coverage | collision rate | KL to uniform "
               "| gate mean |",
               "|---|---:|---:|---:|---:|"]
        for r in mem:
            for layer, s in r["eval"]["per_sequence"]["memory"].items():
                md.append(f"| {r['label']} ({layer}) | {s['coverage']:.3f} | {s['collision_rate']:.3f} | "
                          f"{s['kl_uniform']:.3f} | {s.get('gate_mean', float('nan')):.3f} |")
        md.append("")
    if fw is not None and "niah" in fw:
        md += ["| (c) reads | " + " | ".join(f"L={L}" for L in NIAH_LENGTHS) + " |",
               "|---|" + "---:|" * len(NIAH_LENGTHS)]
        for n, by_len in fw["niah"]["accuracy_by_length"].items():
            md.append(f"| {n} | " + " | ".join(f"{by_len.get(str(L), float('nan')):.2f}" for L in NIAH_LENGTHS) + " |")
        md += ["", f"Command: `{fw['command']}`", ""]
    text = [r for r in rows if r["finding"] == "e"]
    if text:
        md += ["| (e) natural text | steps | trainer val loss | loss (segments in order) | ppl | loss at positions "
               "0-63 / 64-127 / 128-191 / 192-255 | train s | command |", "|---|---:|---:|---:|---:|---|---:|---|"]
        for r in text:
            e = r["eval"]["persistent"]
            c = e["loss_by_position"]
            q = len(c) // 4
            quarters = " / ".join(f"{sum(c[i * q:(i + 1) * q]) / q:.3f}" for i in range(4))
            md.append(f"| {r['label']} | {r['steps']} | {r['val_loss']:.3f} | {e['loss']:.3f} | {e['ppl']:.2f} | "
                      f"{quarters} | {r['train_seconds']:.0f} | `{r['command']}` |")
        md.append("")
    (out / "results.md").write_text("\n".join(md) + "\n")
    _plots(out, recall, fw, text)
    print((out / "results.md").read_text())


def _plots(out: Path, recall: list[dict], fw: dict | None, text: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if recall:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        labels = [r["label"] for r in recall]
        for ax, metric, name in ((axes[0], "loss", "value-token loss (nats)"), (axes[1], "accuracy", "value top-1")):
            ax.barh(labels, [r["eval"]["per_sequence"][metric] for r in recall],
                    color=["tab:gray" if r["finding"] == "a" else "tab:orange" for r in recall])
            ax.set_xlabel(name)
            ax.invert_yaxis()
        axes[0].axvline(chance_loss(SPEC.values), color="k", linestyle=":", label="chance")
        axes[0].legend()
        axes[1].set_yticks([])
        fig.suptitle("Recall beyond the attention window (held-out documents): (a) gray, (d) orange", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "recall.png", dpi=90)
        plt.close(fig)
    if fw is not None:
        fig, ax = plt.subplots(figsize=(5, 3))
        pols = list(fw["eval"])
        ax.bar(pols, [fw["eval"][p]["loss"] for p in pols])
        ax.axhline(chance_loss(SPEC.values), color="k", linestyle=":", label="chance")
        ax.set_ylabel("value-token loss (nats)")
        ax.set_title("(b) FwPKM model read under each policy", fontsize=10)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "policies.png", dpi=90)
        plt.close(fig)
    if fw is not None and "niah" in fw:
        fig, ax = plt.subplots(figsize=(5, 3))
        ns = sorted(fw["niah"]["accuracy_by_length"], key=int)
        for L in NIAH_LENGTHS:
            ax.plot([int(n) for n in ns], [fw["niah"]["accuracy_by_length"][n].get(str(L)) for n in ns], marker="o",
                    label=f"{L} tok")
        ax.set_xlabel("reads")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "niah_reads.png", dpi=90)
        plt.close(fig)
    if text:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in text:
            curve = torch.tensor(r["eval"]["persistent"]["loss_by_position"])
            smooth = torch.nn.functional.avg_pool1d(curve[None, None], 8, 8)[0, 0]
            ppl = r["eval"]["persistent"]["ppl"]
            ax.plot(torch.arange(len(smooth)) * 8 + 4, smooth, label=f"{r['label']} (ppl {ppl:.1f})")
        ax.set_xlabel("position in the 256-token segment")
        ax.set_ylabel("loss (nats), 8-token means")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "text_loss_by_position.png", dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    main()
