"""The finetuning runner of this checkout on its synthetic configs (``configs/finetune/synthetic_*``)."""
import importlib.util
import subprocess
import sys

import pytest

from helpers import REPO


def _load_cli():
    """``run_finetune.py`` of this checkout (not whatever an editable install points at)."""
    spec = importlib.util.spec_from_file_location("run_finetune", REPO / "run_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_finetune = _load_cli()
SMALL = ["data.image_size=32", "data.batch_size=8", "train.max_steps=2", "log.progress=false",
         "log.every=1"]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """The synthetic dataset written once per session by the documented script."""
    out = tmp_path_factory.mktemp("synthetic_ft")
    subprocess.run([sys.executable, str(REPO / "data_prep/make_synthetic.py"), "--out", str(out),
                    "--num-train", "24", "--num-val", "12", "--size", "48", "--format", "folder"],
                   check=True, capture_output=True)
    return out


def run_task(task, root, out, *extra):
    """``run_finetune.py --config configs/finetune/synthetic_<task>.yaml`` with SMALL sizes, in process."""
    return run_finetune.main(["--config", str(REPO / f"configs/finetune/synthetic_{task}.yaml"),
                              f"data.root={root}", f"output_dir={out}", *SMALL, *extra])
