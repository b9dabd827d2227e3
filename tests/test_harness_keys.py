"""Reference and row keys follow the weights: retraining a model in place (same preset, new weights) gives new
keys, so a stale dense reference is never compared with the new videos and a relaunched sweep does not skip
rows measured with the old weights. Hub models are keyed by the commit the local cache resolves to (no
network); the per-file hashes are cached by (path, size, mtime)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import svg2.harness.runner as runner
from svg2.harness.reference import ReferenceCache, reference_key
from svg2.harness.runner import job_identity, method_spec, run_job
from svg2.harness.schema import register_configs
from svg2.harness.session import LoadedPipeline, RunSession
from svg2.harness.weights_identity import (
    HASH_CACHE_NAME,
    FileHashCache,
    files_identity,
    hub_identity,
    software_stack,
    weights_identity,
)
from svg2.mini.pipeline import default_weights_path

ROOT = Path(__file__).resolve().parents[1]
register_configs()

# The mini model at its smallest: 16 frames of 64x64, 2 steps, PSNR/SSIM in memory (no LPIPS, no MP4).
MINI = ["model=mini", "prompts=mini", "prompts.limit=1", "model.num_steps=2", "model.device=cpu", "metrics=fast",
        "store.save_videos=false", "progress=false", "method=dense"]


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=overrides)


def _rows(store: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((store / "rows").glob("*.json"))]


def _retrain_in_place(weights: Path) -> None:
    """What ``train_mini.py --assemble`` does to the folder: new tensors under the same file names."""
    from safetensors.torch import load_file, save_file

    f = weights / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    g = torch.Generator().manual_seed(0)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v)
             for k, v in state.items()}
    save_file(state, f)


def test_files_identity_follows_content_and_caches_hashes(tmp_path):
    w = tmp_path / "w"
    (w / "sub").mkdir(parents=True)
    (w / "a.bin").write_bytes(b"\x00" * 64)
    (w / "sub" / "b.json").write_text('{"x": 1}')
    (w / ".lock").write_text("ignored")  # hidden files are not weights
    cache_file = tmp_path / "hashes.json"
    c1 = FileHashCache(cache_file)
    first = files_identity(w, c1)
    assert first["kind"] == "files" and first["files"] == 2 and c1.hashed == 2
    # A second process: hashes come from the cache file, nothing is read again.
    c2 = FileHashCache(cache_file)
    assert files_identity(w, c2) == first and c2.hashed == 0
    (w / ".lock").write_text("changed")
    assert files_identity(w, FileHashCache(cache_file)) == first
    # Documentation beside the weights (a model card, a loss plot) is not part of their identity.
    (w / "MODEL_CARD.md").write_text("# card")
    (w / "sub" / "loss.png").write_bytes(b"png")
    assert files_identity(w, FileHashCache(cache_file)) == first
    (w / "MODEL_CARD.md").write_text("# card, edited")
    assert files_identity(w, FileHashCache(cache_file)) == first
    # Same size, new content, new mtime: re-hashed, new identity.
    st = (w / "a.bin").stat()
    (w / "a.bin").write_bytes(b"\x01" * 64)
    os.utime(w / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c3 = FileHashCache(cache_file)
    second = files_identity(w, c3)
    assert second != first and c3.hashed == 1
    # A renamed file is another checkpoint.
    (w / "sub" / "b.json").rename(w / "sub" / "c.json")
    assert files_identity(w, FileHashCache(cache_file)) != second
    assert files_identity(tmp_path / "absent")["missing"].endswith("absent")
    # A damaged cache file is ignored, not fatal.
    cache_file.write_text("{not json")
    assert files_identity(w, FileHashCache(cache_file))["sha256"]


def test_hub_identity_reads_the_local_cache_without_network(tmp_path):
    repo = tmp_path / "models--Org--Model"
    (repo / "refs").mkdir(parents=True)
    assert hub_identity("Org/Model", cache_dir=tmp_path)["commit"] is None  # not downloaded yet
    (repo / "refs" / "main").write_text("a" * 40)
    ident = hub_identity("Org/Model", cache_dir=tmp_path)
    assert ident == {"kind": "hub", "repo_id": "Org/Model", "revision": "main", "commit": "a" * 40}
    (repo / "refs" / "main").write_text("b" * 40)  # a new revision downloaded
    assert hub_identity("Org/Model", cache_dir=tmp_path)["commit"] == "b" * 40
    assert hub_identity("Org/Model", "c" * 40, cache_dir=tmp_path)["commit"] == "c" * 40  # a pinned commit
    model = {"name": "m", "loader": "diffusers", "repo_id": "Org/Model", "kwargs": {"cache_dir": str(tmp_path)}}
    assert weights_identity(model)["commit"] == "b" * 40
    # A local folder as repo_id is hashed by content.
    local = tmp_path / "folder"
    local.mkdir()
    (local / "model_index.json").write_text("{}")
    assert weights_identity({**model, "repo_id": str(local)})["kind"] == "files"
    assert weights_identity({"loader": "tiny_wan", "kwargs": {}}) == {"kind": "code", "loader": "tiny_wan"}


def test_keys_change_when_weights_are_retrained_in_place(tmp_path):
    w = tmp_path / "mini"
    shutil.copytree(default_weights_path(), w)
    cfg = _compose([*MINI, f"+model.kwargs.path={w}", f"cache.dir={tmp_path / 'cache'}"])
    spec = method_spec(cfg)
    before = job_identity(cfg, spec)
    assert before["weights"]["kind"] == "files" and before["stack"]["torch"] == torch.__version__
    assert (tmp_path / "cache" / HASH_CACHE_NAME).is_file()  # per-file hashes kept for the next job
    assert job_identity(cfg, spec) == before
    model = OmegaConf.to_container(cfg.model, resolve=True)
    stack = software_stack("cpu")
    ref_before = reference_key(model, "cpu", "p", None, 0, weights=before["weights"], stack=stack)
    _retrain_in_place(w)
    after = job_identity(cfg, spec)
    assert after["weights"] != before["weights"] and after["model"] == before["model"]
    assert reference_key(model, "cpu", "p", None, 0, weights=after["weights"], stack=stack) != ref_before
    # The shipped weights (no kwargs.path) are found through the loader's weights_path.
    shipped = _compose([*MINI, f"cache.dir={tmp_path / 'cache'}"])
    assert job_identity(shipped, method_spec(shipped))["weights"] == files_identity(default_weights_path())
    with pytest.raises(TypeError, match="weights_identity"):
        reference_key(model, "cpu", "p", None, 0, weights=None, stack=stack)


def test_retrained_model_gets_fresh_reference_and_rows(tmp_path):
    """The defect: after retraining in place, dense against its "own" cached reference scored 23 dB with
    ref_cached=True, and a relaunched sweep skipped every row."""
    w = tmp_path / "mini"
    shutil.copytree(default_weights_path(), w)
    cfg = _compose([*MINI, f"+model.kwargs.path={w}", f"cache.dir={tmp_path / 'cache'}"])
    session = RunSession()
    assert run_job(cfg, tmp_path / "a", session=session)["ok"] == 1  # stock dense: its video is the reference
    assert run_job(cfg, tmp_path / "b", session=session)["ok"] == 1  # ... now cached
    (old,) = _rows(tmp_path / "b")
    assert old["ref_cached"] and old["psnr"] > 60  # float16 reference of the same video
    old_ref = np.load(tmp_path / "cache" / old["ref_key"] / "frames.npy").astype(np.float32)

    _retrain_in_place(w)
    fresh = RunSession()  # a new process: the retrained weights are loaded
    counts = run_job(cfg, tmp_path / "a", session=fresh)  # the relaunched sweep
    assert counts == {"total": 1, "skipped": 0, "ok": 1, "failed": 0}
    assert run_job(cfg, tmp_path / "c", session=fresh)["ok"] == 1
    (new,) = _rows(tmp_path / "c")
    assert new["ref_key"] != old["ref_key"] and new["key"] != old["key"]
    assert new["ref_cached"] and new["psnr"] > 60  # against the reference of the new weights
    new_ref = np.load(tmp_path / "cache" / new["ref_key"] / "frames.npy").astype(np.float32)
    assert np.abs(new_ref - old_ref).max() > 0.05  # the retraining changed the video: the old one was stale
    meta = json.loads((tmp_path / "cache" / new["ref_key"] / "meta.json").read_text())
    assert meta["weights"]["sha256"] == job_identity(cfg, method_spec(cfg))["weights"]["sha256"]
    assert meta["stack"]["device"] == "cpu" and meta["format"] == 2


def test_old_or_foreign_cache_entries_regenerate(tmp_path):
    cache = ReferenceCache(tmp_path)
    frames = np.zeros((2, 16, 16, 3), np.float32)
    cache.put("k1", frames, {}, fps=8, write_video=False)
    assert cache.get("k1") is not None
    # An entry whose meta names another key (copied or damaged folder) is a miss, not a wrong reference.
    shutil.copytree(tmp_path / "k1", tmp_path / "k2")
    assert cache.get("k2") is None
    # An entry of the old format (key without weights) is never looked up by the new keys.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "meta.json").write_text(json.dumps({"key": "old", "frames_dtype": "float16"}))
    np.save(tmp_path / "old" / "frames.npy", frames.astype(np.float16))
    new = reference_key({}, "cpu", "p", None, 0, weights={"kind": "code"}, stack=software_stack("cpu"))
    assert new != "old" and cache.get(new) is None


def test_hub_model_rekeyed_once_loading_resolves_its_commit(tmp_path, monkeypatch):
    """A Hub model not in the local cache has no commit when the job is planned; once loaded (downloaded)
    its rows are keyed by the commit, so a relaunch skips them."""
    hub = tmp_path / "hub"
    cfg = _compose(["model=tiny", "model.loader=diffusers", "model.repo_id=Org/Model",
                    f"+model.kwargs.cache_dir={hub}", "prompts.limit=1", "model.num_steps=2", "model.num_frames=5",
                    "model.height=32", "model.width=32", "metrics=fast", "store.save_videos=false",
                    "method=dense", f"cache.dir={tmp_path / 'cache'}", "progress=false"])
    assert job_identity(cfg, method_spec(cfg))["weights"]["commit"] is None

    def fake_pipeline(self, cfg_, parallelize=None):  # "downloads": the commit appears in the local cache
        (hub / "models--Org--Model" / "refs").mkdir(parents=True, exist_ok=True)
        (hub / "models--Org--Model" / "refs" / "main").write_text("d" * 40)
        from svg2.harness.models import tiny_wan_pipeline

        return LoadedPipeline(tiny_wan_pipeline(), torch.device("cpu"), torch.float32)

    monkeypatch.setattr(RunSession, "pipeline", fake_pipeline)
    assert run_job(cfg, tmp_path / "store")["ok"] == 1
    (row,) = _rows(tmp_path / "store")
    ident = job_identity(cfg, method_spec(cfg))
    assert ident["weights"]["commit"] == "d" * 40
    assert row["key"] == runner.row_key(ident, *_first_item(cfg))
    assert run_job(cfg, tmp_path / "store")["skipped"] == 1
    # The local cache cleared, then downloaded again: planned unresolved, found done once loaded.
    (hub / "models--Org--Model" / "refs" / "main").unlink()
    assert run_job(cfg, tmp_path / "store") == {"total": 1, "skipped": 1, "ok": 0, "failed": 0}


def _first_item(cfg):
    from svg2.harness.prompts import load_prompts

    return load_prompts(cfg.prompts)[0], int(cfg.seeds[0])
