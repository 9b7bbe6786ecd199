"""Published checkpoints: name / URL / path resolution, verified downloads into the torch hub
cache, offline use. Everything runs offline: file:// URLs and files the tests write."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from multimae_att import hub
from multimae_att.hub import (
    PUBLISHED,
    CheckpointHashError,
    CheckpointUnavailableError,
    PublishedCheckpoint,
    resolve_checkpoint,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private torch hub cache (TORCH_HOME) for the test; returns its checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    assert folder.is_relative_to(tmp_path)
    return folder


def _weights_file(folder: Path, stem: str) -> tuple[Path, str]:
    """A small checkpoint named torch.hub's way, ``<stem>-<sha256[:8]>.pth``; returns (path, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save({"model": {"w": torch.arange(6.0)}}, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"{stem}-{digest[:8]}.pth"
    tmp.rename(path)
    return path, digest


def _cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != ".locks") if cache.exists() else []


def test_registry_entries_are_the_published_files():
    assert set(PUBLISHED) == {"multimae-b", "multimae-b-timm", "mae-b", "mae-b-timm"}
    base = "https://github.com/EPFL-VILAB/MultiMAE/releases/download/pretrained-weights/"
    want = {"multimae-b": ("multimae-b_98_rgb+-depth-semseg_1600e_multivit-afff3f8c.pth", "afff3f8c", "multimae"),
            "multimae-b-timm": ("multimae-b_98_rgb+-depth-semseg_1600e_timm-bafa5499.pth", "bafa5499", "timm"),
            "mae-b": ("mae-b_dec512d8b_1600e_multivit-c477195b.pth", "c477195b", "multimae"),
            "mae-b-timm": ("mae-b_dec512d8b_1600e_timm-f74f3a8d.pth", "f74f3a8d", "timm")}
    for name, (file_name, prefix, layout) in want.items():
        entry = PUBLISHED[name]
        assert (entry.url, entry.hash_prefix, entry.layout) == (base + file_name, prefix, layout)
    assert PUBLISHED["multimae-b"].in_modalities == ("rgb", "depth", "semseg")


def test_hash_prefix_follows_torch_hub_names_strictly():
    assert hub.hash_prefix_of("resnet18-5c106cde.pth") == "5c106cde"
    assert hub.hash_prefix_of("multimae-b_98_rgb+-depth-semseg_1600e_multivit-afff3f8c.pth") == "afff3f8c"
    assert hub.hash_prefix_of("final.pth") is None
    assert hub.hash_prefix_of("model-abc.pth") is None            # fewer than 8 digits
    assert hub.hash_prefix_of("run-deadbeef.final.pth") is None   # not right before the extension


def test_paths_resolve_to_themselves(tmp_path):
    path, _ = _weights_file(tmp_path, "local")
    assert resolve_checkpoint(str(path)) == path
    assert resolve_checkpoint(path) == path
    with pytest.raises(CheckpointUnavailableError, match=r"missing.pth does not exist.*multimae-b"):
        resolve_checkpoint(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unsupported URL scheme 's3'"):
        resolve_checkpoint("s3://bucket/x.pth")


def test_file_url_is_copied_into_the_cache_and_checked(tmp_path, cache):
    src, _ = _weights_file(tmp_path / "remote", "tiny")
    got = resolve_checkpoint(src.as_uri(), progress=False)
    assert got == cache / src.name and got.read_bytes() == src.read_bytes()
    src.unlink()                                             # the cached copy is used from now on
    assert resolve_checkpoint(src.as_uri(), progress=False) == got


def test_urls_without_a_hash(tmp_path, cache, monkeypatch):
    """file://: the file itself; http(s): cached per URL, so equal file names never collide."""
    local = tmp_path / "run" / "final.pth"
    local.parent.mkdir()
    local.write_bytes(b"weights")
    assert resolve_checkpoint(local.as_uri()) == local and _cache_files(cache) == []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def fake_download(url, dst, hash_prefix=None, progress=True):
        assert hash_prefix is None
        Path(dst).write_text(url)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    a, b = (resolve_checkpoint(f"https://example.invalid/{run}/final.pth") for run in ("a", "b"))
    assert a != b and a.name == b.name == "final.pth" and a.is_relative_to(cache / "by-url")
    assert a.read_text().endswith("/a/final.pth") and b.read_text().endswith("/b/final.pth")


def test_wrong_hash_is_refused_and_nothing_is_cached(tmp_path, cache):
    src, digest = _weights_file(tmp_path / "remote", "tiny")
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    bad = src.with_name(f"tiny-{wrong}.pth")
    src.rename(bad)
    with pytest.raises(CheckpointHashError, match=f"does not start with {wrong}.*Nothing was kept"):
        resolve_checkpoint(bad.as_uri(), progress=False)
    assert _cache_files(cache) == []                         # no file, no .partial left


@pytest.fixture
def published(tmp_path, cache, monkeypatch):
    """A registry entry for a small file served from a file:// folder."""
    src, digest = _weights_file(tmp_path / "release", "tiny-published")
    entry = PublishedCheckpoint(name="tiny-test", file_name=src.name, title="test", layout="multimae",
                                size="tiny", patch_size=16, image_size=32, in_modalities=("rgb",),
                                decoders=(), holds="w", continuation="-",
                                base_url=src.parent.as_uri() + "/")
    monkeypatch.setitem(PUBLISHED, entry.name, entry)
    return entry, src, digest


def test_name_downloads_once_then_uses_the_cache(published, cache, monkeypatch, tmp_path):
    entry, src, _ = published
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-test").write_bytes(b"a local file named like the entry")  # names win
    got = resolve_checkpoint("tiny-test", progress=False)
    assert got == cache / entry.file_name == hub.cached_path("tiny-test")
    assert got.read_bytes() == src.read_bytes()
    assert resolve_checkpoint("./tiny-test") == Path("./tiny-test")            # unless written as a path

    def no_download(*args, **kwargs):
        raise AssertionError("the cached file must be used")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    assert resolve_checkpoint("tiny-test") == got


def test_offline_uses_a_cached_file_without_network(published, cache, monkeypatch):
    entry, src, _ = published
    https = PublishedCheckpoint(**{**entry.__dict__, "name": "tiny-https",
                                   "base_url": "https://example.invalid/release/"})
    monkeypatch.setitem(PUBLISHED, "tiny-https", https)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("offline: nothing may be downloaded"))
    cache.mkdir(parents=True)
    (cache / entry.file_name).write_bytes(src.read_bytes())   # put there by hand
    assert resolve_checkpoint("tiny-https") == cache / entry.file_name
    assert resolve_checkpoint(https.url) == cache / entry.file_name


def test_offline_missing_file_names_the_exact_path(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("offline: nothing may be downloaded"))
    entry = PUBLISHED["multimae-b"]
    with pytest.raises(CheckpointUnavailableError) as info:
        resolve_checkpoint("multimae-b")
    message = str(info.value)
    assert f"put it at {cache / entry.file_name} " in message and entry.url in message
    assert "HF_HUB_OFFLINE=1" in message


def test_no_network_names_the_exact_path(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(url, dst, hash_prefix=None, progress=True):
        raise URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(CheckpointUnavailableError, match="Name or service not known") as info:
        resolve_checkpoint("https://example.invalid/w/model-0123abcd.pth")
    assert f"put it at {cache / 'model-0123abcd.pth'}" in str(info.value)


def test_a_cached_published_file_with_other_content_is_refused(published, cache):
    entry, _, _digest = published
    cache.mkdir(parents=True)
    (cache / entry.file_name).write_bytes(b"not the published file")
    with pytest.raises(CheckpointHashError, match=f"not the published prefix {entry.hash_prefix}"):
        resolve_checkpoint("tiny-test")


def test_runners_and_the_export_script_accept_names_and_urls(published, cache, tmp_path, monkeypatch):
    """Pretraining init, finetuning init and export_attention_maps all resolve the same way."""
    from multimae_att.checkpoint import export_weights
    from multimae_att.finetune.loading import load_pretrained
    from multimae_att.model import create_pretrain_model
    from multimae_att.pretrain.setup import load_init_checkpoint

    from helpers.prep import load_prep

    model = create_pretrain_model("tiny", image_size=32, semseg_num_classes=10)
    src = tmp_path / "release2" / "exported.pth"
    export_weights(model, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    named = src.rename(src.with_name(f"exported-{digest[:8]}.pth"))
    entry = PublishedCheckpoint(**{**published[0].__dict__, "name": "tiny-model", "file_name": named.name,
                                   "base_url": named.parent.as_uri() + "/"})
    monkeypatch.setitem(PUBLISHED, "tiny-model", entry)
    fresh = create_pretrain_model("tiny", image_size=32, semseg_num_classes=10)
    load_init_checkpoint(fresh, "tiny-model")
    assert torch.equal(fresh.global_tokens, model.global_tokens)

    class Task:  # the fields load_pretrained reads
        output = ""
    encoder = create_pretrain_model("tiny", image_size=32, semseg_num_classes=10, out_domains=(),
                                    extra_norm_rgb=False)
    report = load_pretrained(encoder, named.as_uri(), Task())
    assert report.path == os.fspath(cache / named.name)

    export = load_prep("export_attention_maps")
    loaded, patch, size = export.load_model("tiny-model", ["rgb"], 32, {})
    assert torch.equal(loaded.global_tokens, model.global_tokens) and (patch, size) == (16, 32)


def test_pretraining_names_the_key_when_a_checkpoint_is_unavailable(cache, monkeypatch):
    from multimae_att.config import ConfigError
    from multimae_att.model import create_pretrain_model
    from multimae_att.pretrain.setup import load_init_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_pretrain_model("tiny", image_size=32)
    with pytest.raises(ConfigError, match=r"init.checkpoint='multimae-b': .*put it at .*afff3f8c.pth"):
        load_init_checkpoint(model, "multimae-b")


def test_list_prints_the_registry_and_the_cache(published, cache, capsys):
    entry, _, _ = published
    assert hub.main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {cache}" in out
    assert all(name in out for name in PUBLISHED)
    assert "put the file at " + str(cache / entry.file_name) in out         # not cached yet
    resolve_checkpoint("tiny-test", progress=False)
    assert hub.main(["list"]) == 0
    assert f"cached:      {cache / entry.file_name} (" in capsys.readouterr().out


def test_inspect_and_the_module_command_line(published, cache, capsys):
    _entry, _src, digest = published
    assert hub.main(["inspect", "tiny-test"]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {digest}" in out and "top-level entries: model (dict)" in out and "w " in out
    env = {**os.environ, "TORCH_HOME": os.environ["TORCH_HOME"], "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "multimae_att.checkpoint", "list"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "multimae-b: MultiMAE-B" in run.stdout and "offline" in run.stdout
    run = subprocess.run([sys.executable, "-m", "multimae_att.checkpoint", "download", "mae-b"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "put it at" in run.stderr and "Traceback" not in run.stderr


def test_diagnose_takes_a_url_and_writes_next_to_the_caller(tmp_path, cache, monkeypatch):
    """python -m multimae_att.diagnose --checkpoint accepts names / URLs like the runners; its
    default output does not land in the torch hub cache."""
    from multimae_att.checkpoint import export_weights
    from multimae_att.diagnose import main as diagnose_main
    from multimae_att.model import create_pretrain_model

    from helpers.pretrain import make_synthetic, tiny_config

    data = make_synthetic(tmp_path / "data")
    cfg = tiny_config(tmp_path / "c.yaml", data)
    src = tmp_path / "release" / "tiny.pth"
    export_weights(create_pretrain_model("tiny", image_size=32, semseg_num_classes=10), src)
    monkeypatch.chdir(tmp_path)
    result = diagnose_main(["--checkpoint", src.as_uri(), "--data", str(data), "--split", "train",
                            "--config", str(cfg), "--background-classes", "0", "1", "--max-images", "2"])
    assert result["checkpoint"] == str(src) and result["images"] == 2      # file:// without a hash: the file
    assert (tmp_path / "diagnose-train.json").is_file() and not (src.parent / "diagnose-train.json").exists()


def test_local_path_is_where_resolve_puts_the_file(published, cache, tmp_path):
    """Run provenance identifies init.checkpoint by hub.local_path without downloading: it must
    name the file resolve_checkpoint returns."""
    _entry, src, _ = published
    plain = tmp_path / "run" / "final.pth"
    plain.parent.mkdir()
    plain.write_bytes(b"w")
    for spec in ("tiny-test", src.as_uri(), plain.as_uri(), str(plain), plain):
        assert hub.local_path(spec) == resolve_checkpoint(spec, progress=False)
    assert hub.local_path("https://example.invalid/a/final.pth") == \
        hub.cached_path("https://example.invalid/a/final.pth")
