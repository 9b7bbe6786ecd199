"""The package imports timm/torchvision on CPU-only torch (see multimae_att._torchvision_guard)."""
import subprocess
import sys


def test_import_timm_in_fresh_process():
    code = "import multimae_att, timm, torchvision.transforms.v2; import timm.layers; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_guard_is_idempotent():
    from multimae_att import _torchvision_guard

    assert _torchvision_guard.install() is False  # already done (or not needed) at import
