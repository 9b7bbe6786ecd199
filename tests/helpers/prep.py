"""data_prep/ in tests: a script imported as a module, a tar written from bytes, and the synthetic
set in both layouts (folders and shards)."""
from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import REPO


def load_prep(name: str):
    """Import a data_prep script as a module (data_prep is not a package, by design)."""
    sys.path.insert(0, str(REPO / "data_prep"))
    spec = importlib.util.spec_from_file_location(name, REPO / "data_prep" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 training and 8 validation scenes (10 semseg classes), folders and one-shard shards."""
    out = tmp_path_factory.mktemp("bad_input") / "data"
    subprocess.run([sys.executable, str(REPO / "data_prep/make_synthetic.py"), "--out", str(out),
                    "--num-train", "16", "--num-val", "8", "--size", "48", "--format", "both",
                    "--shard-size", "16"], check=True, capture_output=True)
    return out
