"""The ``flashinfer`` attention variant: named only, refuses clearly without the package (CPU), and on a GPU with
flashinfer importable matches the float32 reference like the other kernels (cuda marker)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from svg2 import SVG2Config, svg2_attention
from svg2_kernels import registry
from svg2_kernels.flashinfer_variant import flashinfer_block_sizes, flashinfer_import_error

_HAS = flashinfer_import_error() is None


def test_registered_but_never_chosen_by_auto():
    assert "flashinfer" in registry.available_attention_variants()
    variant = registry.get_attention_variant("flashinfer")
    assert variant.priority < registry.get_attention_variant("torch").priority
    gpu = registry.AttentionInputs("cuda", torch.bfloat16, 128, 4096, 4096)
    assert registry.select_attention_variant("auto", gpu).name != "flashinfer"


@pytest.mark.skipif(_HAS, reason="flashinfer is importable here")
def test_refuses_clearly_without_the_package():
    variant = registry.get_attention_variant("flashinfer")
    reasons = variant.not_supported_reasons(registry.AttentionInputs("cuda", torch.bfloat16, 128, 4096, 4096))
    assert len(reasons) == 1 and "'flashinfer' is not installed" in reasons[0]
    assert "vendor_flashinfer.py" in reasons[0]
    cpu = variant.not_supported_reasons(registry.AttentionInputs("cpu", torch.float32, 48, 64, 64))
    assert any("device 'cpu'" in r for r in cpu) and any("dtype" in r for r in cpu)
    assert any("head dim 48" in r for r in cpu)
    with pytest.raises(NotImplementedError, match="flashinfer.*not installed"):
        registry.select_attention_variant("flashinfer", registry.AttentionInputs("cuda", torch.bfloat16, 128, 64, 64))


def test_named_on_cpu_is_an_error_not_a_fallback():
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    cfg = SVG2Config(num_q_centroids=4, num_k_centroids=8, attention_kernel="flashinfer")
    with pytest.raises(NotImplementedError, match="flashinfer"):
        svg2_attention(q, k, v, cfg)


@pytest.mark.skipif(_HAS, reason="flashinfer is importable here")
def test_a_broken_copy_says_what_does_not_import(tmp_path, monkeypatch):
    pkg = tmp_path / "flashinfer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sparse.py").write_text("import flashinfer_missing_native_part\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        variant = registry.get_attention_variant("flashinfer")
        reasons = variant.not_supported_reasons(registry.AttentionInputs("cuda", torch.bfloat16, 128, 64, 64))
        assert len(reasons) == 1 and "does not import" in reasons[0] and "flashinfer_missing_native_part" in reasons[0]
    finally:
        for name in [m for m in sys.modules if m == "flashinfer" or m.startswith("flashinfer.")]:
            del sys.modules[name]


def test_block_sizes_cover_the_sequence():
    offsets = torch.tensor([[[0, 3, 3, 7], [0, 1, 5, 8]]])  # (B=1, H=2, C+1=4)
    sizes = flashinfer_block_sizes(offsets, 10)
    assert sizes.dtype == torch.int32 and sizes.tolist() == [[3, 0, 4, 3], [1, 4, 3, 2]]
    assert (sizes.sum(-1) == 10).all()


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and _HAS), reason="needs an NVIDIA GPU and flashinfer")
def test_matches_reference_on_gpu():
    torch.manual_seed(0)
    b, h, s, d, cq, ck = 1, 2, 1024, 128, 8, 16
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = SVG2Config(num_q_centroids=cq, num_k_centroids=ck, target_density=0.3)
    out, lse, layout = svg2_attention(q, k, v, cfg.replace(attention_kernel="flashinfer"), return_lse=True)
    ref, ref_lse, _ = svg2_attention(q, k, v, cfg.replace(attention_kernel="torch"), layout=layout, return_lse=True)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)  # natural log, like every kernel
