"""Evaluation gives the same numbers with 1 process and with 2 gloo processes (torchrun), also
when a corrupt validation sample is left out (it is in the round Accelerate pads)."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
import multimae_att  # noqa: F401
from multimae_att.finetune.config import load_finetune_config
from multimae_att.finetune.engine import end_distributed, run
root, out = sys.argv[1], sys.argv[2]
for task in ("semseg", "knn"):
    # eval only (0 epochs): same seed -> same weights on every process and in both runs;
    # 12 val samples in batches of 4 over 2 processes: Accelerate pads the last round;
    # semseg is scored at label resolution (48 px files, 32 px input: eval_mode full)
    cfg = load_finetune_config({repo!r} + f"/configs/finetune/synthetic_{{task}}.yaml",
        [f"data.root={{root}}", f"output_dir={{out}}/{{task}}", "data.image_size=32",
         "data.batch_size=4", "train.epochs=0", "log.progress=false", "task.few_shot=[1,5]",
         "data.eval_on_corrupt=skip_ok"])
    run(cfg)
end_distributed()
"""


@pytest.mark.slow
def test_two_process_evaluation_matches_one_process(tmp_path):
    root = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "data_prep/make_synthetic.py"), "--out", str(root),
                    "--num-train", "12", "--num-val", "12", "--size", "48", "--format", "folder"],
                   check=True, capture_output=True)
    first = sorted((root / "val" / "rgb").rglob("*.png"))[0]   # also the padding of the last round
    first.write_bytes(first.read_bytes()[:64])
    script = tmp_path / "evaluate.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(root), str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(script), str(root), str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    for task in ("semseg", "knn"):
        a = json.loads((tmp_path / "one" / task / "metrics.json").read_text())
        b = json.loads((tmp_path / "two" / task / "metrics.json").read_text())
        assert a.keys() == b.keys() and a["skipped_eval_samples"] == [first.stem]
        for k, v in a.items():
            assert b[k] == (pytest.approx(v, rel=1e-6, nan_ok=True) if isinstance(v, float) else v), (task, k)
