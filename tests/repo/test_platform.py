"""The package imports timm/torchvision on CPU-only torch (see multimae_att._torchvision_guard)."""
import subprocess
import sys


def run_fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter (the guard acts at first import); its stdout, stripped."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_timm_in_fresh_process():
    code = "import multimae_att, timm, torchvision.transforms.v2; import timm.layers; print('ok')"
    assert run_fresh(code).endswith("ok")


def test_guard_is_idempotent():
    from multimae_att import _torchvision_guard

    assert _torchvision_guard.install() is False  # already done (or not needed) at import


def test_guard_does_nothing_where_the_extension_loads():
    """On a normal install (torchvision's _C loads) the guard must register no schema."""
    code = (
        "import sys, torch\n"
        "import multimae_att._torchvision_guard as g\n"  # importing the submodule runs the package guard
        "sys.modules.pop('torchvision', None)\n"
        "g._LIBRARY = None\n"
        "g._extension_loads = lambda package_dir: True\n"
        "assert g.install() is False and g._LIBRARY is None\n"
        "print('ok')\n"
    )
    assert run_fresh(code) == "ok"


def test_guard_registers_both_schemas_when_the_extension_cannot_load():
    """Where _C cannot load (CPU torch + CUDA torchvision), nms and qnms get a schema and
    torchvision's pure-Python parts import; the compiled op itself stays unavailable."""
    code = (
        "import torch, multimae_att, torchvision\n"
        "from multimae_att import _torchvision_guard as g\n"
        "if g._LIBRARY is None:\n"
        "    print('extension loads natively'); raise SystemExit(0)\n"
        "assert hasattr(torch.ops.torchvision, 'nms') and hasattr(torch.ops.torchvision, 'qnms')\n"
        "try:\n"
        "    torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
        "except (NotImplementedError, RuntimeError):\n"
        "    print('ok')\n"
    )
    assert run_fresh(code) in ("ok", "extension loads natively")


def test_config_schema_and_run_folder_tools_import_without_torch():
    """The pretraining schema and the torch-free modules import in a fresh interpreter without
    importing torch; torchvision still gets the guard afterwards."""
    code = (
        "import sys\n"
        "import multimae_att.pretrain.config, multimae_att.config, multimae_att.modalities\n"
        "import multimae_att.run, multimae_att.run.resume, multimae_att.run.metrics_log, multimae_att.run.provenance\n"
        "import multimae_att.run.cpu_malloc\n"
        "import multimae_att.atomic, multimae_att.seeds\n"
        "print('torch' in sys.modules)\n"
        "import torchvision.transforms.v2, timm\n"
        "print('ok')\n"
    )
    assert run_fresh(code).splitlines() == ["False", "ok"]
