"""The README's commands run as written (with small sizes), so the front page cannot drift from the code.

Which blocks: every ```bash block of README.md directly preceded by a line starting with
`<!-- readme-test: run`. Other blocks (make, SLURM, ...) are not run; adding blocks elsewhere changes
nothing here. Each command of a marked block (backslash continuations joined) is run in order, from a
temporary directory, after the substitutions in SUBSTITUTIONS: README text -> test text, applied as
plain string replacements. They only shrink sizes or point at local stand-ins ("your corpus" becomes a
small JSON Lines corpus of stdlib text, `lambada_openai` a local lm-eval task); every one must match
some marked command, so a README edit that a substitution no longer fits fails here, by name, instead
of silently running the full-size command. Then `lm_eval --model hf` (lm-eval's own command, without
this project's wrapper) evaluates the README's export, which proves plain transformers loads it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARK = "<!-- readme-test: run"

SMALL_TRAIN = ("model.num_layers=2 model.hidden_size=64 model.max_seq_len=64 model.window=8 fwpkm.layers=[0] "
               "fwpkm.num_slots=256 fwpkm.d_k=16 fwpkm.d_v=32 fwpkm.chunk_size=16 pkm.layers=[1] pkm.num_slots=256 "
               "pkm.d_k=16 pkm.d_v=32 train.seq_len=64 train.micro_batch_size=2 train.steps=4 train.warmup_steps=1 "
               "train.log_every=2 train.eval_batches=1")
TASK = "readme_task"

# README text -> what the test runs instead (each must occur in a marked command)
SUBSTITUTIONS = {
    "'corpus/*.jsonl'": "corpus.jsonl",                                  # your corpus: a small local one
    "--vocab-size 32000 --seq-len 4096 --workers 8": "--vocab-size 512 --seq-len 64 --workers 1",
    "configs/paper-112m.yaml": f"{REPO}/configs/tiny.yaml {SMALL_TRAIN}",  # the tiny model, 4 steps
    "--nproc 8": "--nproc 2",
    "--policies persistent frozen": "--policies persistent frozen --limit 2",
    "--lengths 4096 32768 --n-iters 1 2 4": "--lengths 160 --per-length 1 --n-iters 1 2",
    "--tasks lambada_openai": f"--tasks {TASK} --include_path tasks --limit 2 --device cpu",
}


def readme_commands(text: str) -> list[str]:
    """Commands of the marked ```bash blocks, continuations joined, in order."""
    commands, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith(MARK):
            continue
        assert lines[i + 1].strip() == "```bash", f"README.md:{i + 2}: a readme-test mark must precede ```bash"
        block = []
        for body in lines[i + 2:]:
            if body.strip() == "```":
                break
            block.append(body)
        joined = re.sub(r"\\\n\s*", " ", "\n".join(block))
        commands += [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]
    return commands


def _corpus(path: Path) -> None:
    import sysconfig

    texts, size = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        source = f.read_text(errors="replace")
        for at in range(0, len(source), 2000):  # many small documents: the val split gets enough of them
            texts.append(json.dumps({"text": source[at:at + 2000]}))
            size += len(texts[-1])
        if size > 400_000:
            break
    path.write_text("\n".join(texts) + "\n")


def _task(root: Path) -> None:
    root.mkdir()
    data = root / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": 0}) + "\n" for q, c in
                            [("import os\nimport", [" sys", " 42"]), ("def main(", ["):", " !"])]))
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\nmetadata: {version: 1.0}\n")


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_HOME=str(cwd / "hf_home"))
    return subprocess.run(shlex.split(command), cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def test_readme_commands_run_as_written(tmp_path):
    commands = readme_commands((REPO / "README.md").read_text())
    assert any("fwpkm-eval niah" in c for c in commands) and any("fwpkm-train" in c for c in commands), \
        "the README's runnable blocks must keep their readme-test marks"
    unused = [old for old in SUBSTITUTIONS if not any(old in c for c in commands)]
    assert not unused, f"README changed: these substitutions (tests/e2e/test_readme.py) match no command: {unused}"
    _corpus(tmp_path / "corpus.jsonl")
    _task(tmp_path / "tasks")
    for command in commands:
        for old, new in SUBSTITUTIONS.items():
            command = command.replace(old, new)
        command = command.replace(".venv/bin/", f"{BIN}/")
        done = _run(command, tmp_path)
        assert done.returncode == 0, f"README command failed ({done.returncode}): {command}\n{done.stderr[-3000:]}"
    assert json.loads((tmp_path / "eval/exp1/niah.json").read_text())["n_iters"] == [1, 2]
    assert "persistent" in json.loads((tmp_path / "eval/exp1/ppl.json").read_text())["mine"]

    plain = _run(f"{BIN}/lm_eval --model hf --model_args pretrained={tmp_path}/exports/exp1,trust_remote_code=True "
                 f"--tasks {TASK} --include_path tasks --device cpu --limit 2", tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert TASK in plain.stdout
