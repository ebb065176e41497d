"""`torchrun --nnodes 2`: two "nodes" (two torchrun agents) on this machine, one rank each, one launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from promptkd.data import load_examples, make_synthetic_splits, train_tokenizer
from tests.fixtures.cli import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_torchrun_two_nodes(tmp_path):
    files = make_synthetic_splits(str(tmp_path / "data"), 64, 8, 8, seed=2)
    texts = [e.prompt + " " + e.references[0] for e in load_examples(files["train"])]
    train_tokenizer(texts, 512, str(tmp_path / "tok"))
    port = free_port()
    out = tmp_path / "run"
    overrides = ["stage=train", "method.name=promptkd", f"tokenizer.path={tmp_path / 'tok'}", "tokenizer.train=false",
                 "data.synthetic.enabled=false", f"data.train_file={files['train']}", "data.dev_size=4", "eval.dev_interval=1",
                 "data.max_length=128", "data.max_prompt_length=96", "model.teacher.dtype=fp32",
                 "model.teacher.init={arch: llama, layers: 2, hidden: 32, heads: 4}",
                 "model.student.init={arch: llama, layers: 2, hidden: 32, heads: 4}", "rollout.max_new_tokens=8",
                 "train.max_steps=2", "train.micro_batch_size=2", "dist_timeout_s=60", "deepspeed=ds_configs/zero3_tiny_test.json",
                 f"output.dir={out}", "output.resume=", "logging.progress_bar=false", "eval.max_new_tokens=8"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    nodes = [subprocess.Popen(
        ["timeout", "300", sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         os.path.join(REPO, "launcher", "main.py"), *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [p.communicate()[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "world size 2" in logs[0]
    assert (out / "export" / "config.json").exists() and (out / "checkpoints" / "step_2" / "COMPLETE").exists()
    # dev is scored at every step; the end of training reuses step 2's score instead of logging it twice
    dev_steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if "dev/rougeL" in line]
    assert dev_steps == [1, 2]
