"""SVG-EAR's fused error probe (``svg2_kernels.ear_probe``) against the float64 definition and the torch probe.

CPU: the kernel cases run in one subprocess under ``TRITON_INTERPRET=1`` (the flag must precede Triton's import;
``python -m tests.test_ear_probe`` is the worker). Error rule (FlashAttention's): over the pairs whose error is
above the floor, the kernel's max error in log E against the float64 definition is at most twice that of the
torch probe (fp32) plus a small floor; pairs whose true error is 0 (a one-key cluster, an empty one) are at the
floor (``exact_fits_floored``: many one-key clusters at large logits in the GPU tiles). GPU (``cuda``
marker): bf16 / fp16 keys at a larger shape with the TF32x3 dot.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import interp_results_of, interp_worker

cuda = pytest.mark.cuda
_FLOOR = math.log(1e-8)


def probe_case(n=3, s=200, d=32, cq=7, ck=13, dtype=torch.float16, seed=0, device="cpu", max_size=30, q_std=0.8):
    """Sorted K / V with an empty cluster and a one-key cluster (cluster sizes below ``max_size``); query
    centroids (entries of std ``q_std``); the key summaries."""
    from svg2.compensation import segment_means

    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, max_size, (n, ck), generator=g)
    sizes[:, 3] = 0
    sizes[:, 5] = 1
    sizes = sizes * (sizes.cumsum(-1) <= s)
    ks = (torch.randn(n, s, d, generator=g) * 1.2).to(dtype)
    vs = torch.randn(n, s, d, generator=g).to(dtype)
    qc = torch.randn(n, cq, d, generator=g) * q_std
    kc = segment_means(ks[:, None], sizes[:, None])[:, 0]
    vm = segment_means(vs[:, None], sizes[:, None])[:, 0]
    return tuple(x.to(device) for x in (qc, ks, vs, kc, vm, sizes))


def log_error_f64(qc, ks, vs, sizes, scale):
    """log E_ij = log Σ_{y in K_j} ||e^{a_y} v_y - e^{c_ij} v̄_j||² in float64 from the definition (centroids and
    means of the keys themselves), floored at log(1e-8)."""
    n, cq, d = qc.shape
    ck = sizes.shape[-1]
    out = torch.full((n, cq, ck), _FLOOR, dtype=torch.float64)
    offs = torch.nn.functional.pad(sizes.cumsum(-1), (1, 0))
    for b in range(n):
        for j in range(ck):
            k = ks[b, offs[b, j]:offs[b, j + 1]].double()
            v = vs[b, offs[b, j]:offs[b, j + 1]].double()
            if k.shape[0] == 0:
                continue
            c = qc[b].double() @ k.mean(0) * scale  # (cq,)
            a = qc[b].double() @ k.T * scale  # (cq, nj)
            big = torch.maximum(a.max(1).values, c)
            diff = torch.exp(a - big[:, None])[..., None] * v[None] - torch.exp(c - big)[:, None, None] * v.mean(0)
            e = (diff * diff).sum((1, 2))
            out[b, :, j] = torch.where(e > 0, 2 * big + torch.log(e.clamp_min(1e-300)), _FLOOR).clamp_min(_FLOOR)
    return out


def _errors(got, want, ref):
    """(max |got - ref|, max |want - ref|) over the pairs whose true error is above the floor, and whether the
    pairs at the floor in ``ref`` are at (or within 1e-3 of) the floor in ``got``."""
    live = ref > _FLOOR + 1e-6
    e_got = (got.double() - ref)[live].abs().max().item()
    e_want = (want.double() - ref)[live].abs().max().item()
    floored = bool((got.double()[~live] <= _FLOOR + 1e-3).all())
    return e_got, e_want, floored


# -------------------------------------------------------------------------------- interpreter cases (worker)


def accuracy_case(name, dtype, **kw):
    from svg2.methods.svg_ear import ear_log_error
    from svg2_kernels.ear_probe import ear_log_error_triton

    qc, ks, vs, kc, vm, sizes = probe_case(dtype=dtype, **kw)
    scale = qc.shape[-1] ** -0.5
    got = ear_log_error_triton(qc, ks, vs, kc, vm, sizes, scale)
    want = ear_log_error(qc, ks, vs, kc, vm, sizes, scale)
    ref = log_error_f64(qc, ks, vs, sizes, scale)
    e_got, e_want, floored = _errors(got, want, ref)
    ok = got.dtype == torch.float32 and e_got <= 2 * e_want + 1e-4 and floored
    return name, ok, f"kernel err {e_got:.3g} vs torch probe {e_want:.3g}; true zeros floored {floored}"


def strided_and_tiles_case():
    """Non-contiguous sorted K / V (a slice of a wider tensor, as k-means' x_sorted view can be) and other tiles
    and groups: the same numbers."""
    from svg2_kernels.ear_probe import ear_log_error_triton

    qc, ks, vs, kc, vm, sizes = probe_case(dtype=torch.float32, s=150, d=24, ck=11, seed=3)
    wide = torch.randn(3, 150, 40)
    wide[..., 5:29] = ks
    ksv = wide[..., 5:29]
    a = ear_log_error_triton(qc, ks, vs, kc, vm, sizes, 0.3)
    b = ear_log_error_triton(qc, ksv, vs, kc, vm, sizes, 0.3, block_q=32, block_k=16, group=3)
    err = (a - b).abs().max().item()
    return "strided_and_tiles", err <= 1e-5, f"max diff {err:.3g}"


def exact_fits_case():
    """Clusters of one key (sizes 0-2: a third of them hold one key) at D = 128 with large logits, in the GPU
    default tiles (64 x 32, 16 clusters): a one-key cluster fits its centroid exactly (E = 0), so every such pair
    must sit at the floor. The kernel of b315c91 computed a_y (the tile dot) and the centroid's logit c (an FMA
    sum) apart, and their rounding difference, scaled by e^{2R}, put these pairs far above the floor (about 50
    of the 384 one-key pairs, up to log E = -4.6 against the floor's -18.4, even with the interpreter's fp32
    dot). Live pairs as in the accuracy cases."""
    from svg2.methods.svg_ear import ear_log_error
    from svg2_kernels.ear_probe import ear_log_error_triton

    qc, ks, vs, kc, vm, sizes = probe_case(n=1, s=120, d=128, cq=24, ck=48, dtype=torch.bfloat16, seed=6,
                                           max_size=3, q_std=2.5)
    scale = 128**-0.5
    got = ear_log_error_triton(qc, ks, vs, kc, vm, sizes, scale, block_q=64, block_k=32, group=16)
    want = ear_log_error(qc, ks, vs, kc, vm, sizes, scale)
    ref = log_error_f64(qc, ks, vs, sizes, scale)
    e_got, e_want, floored = _errors(got, want, ref)
    ones = (sizes == 1)[:, None, :].expand_as(got)
    worst_one = got[ones].max().item()
    ok = e_got <= 2 * e_want + 1e-4 and floored and int(ones.sum()) >= 200
    return "exact_fits_floored", ok, (f"kernel err {e_got:.3g} vs torch probe {e_want:.3g}; true zeros floored "
                                      f"{floored} (largest log E of a one-key pair {worst_one:.3g}; "
                                      f"{int(ones.sum())} such pairs)")


def method_case():
    """svg_ear with the fused probe routes exactly as with the torch probe on a clustered input (same block map,
    same output) and records probe=triton."""
    from svg2 import SVG2Config
    from svg2.methods import AttentionContext, MethodState, build_method
    from tests.helpers import clustered_qkv

    q, k, v = clustered_qkv(b=2, h=2, s=96, d=32, clusters=5)
    cfg = SVG2Config(num_q_centroids=6, num_k_centroids=12, top_p=0.7, kmeans_iters_init=3, compensate=True,
                     dense_steps_frac=0.0, dense_layers=0)
    outs, maps, used = {}, {}, {}
    for probe in ("torch", "triton"):
        method = build_method("svg_ear", cfg=cfg, probe=probe)
        st = MethodState()
        ctx = AttentionContext(layer_index=1, step_index=5, num_steps=10, state=st)
        outs[probe] = method(q, k, v, ctx)
        site = st.cluster_state(*ctx.site())
        maps[probe], _ = method.route(q, k, v, ctx, site)
        used[probe] = site.last_kernels.get("probe")
    same_map = torch.equal(maps["torch"].block_map, maps["triton"].block_map)
    err = (outs["torch"] - outs["triton"]).abs().max().item()
    ok = same_map and err <= 1e-5 and used == {"torch": "torch", "triton": "triton"}
    return "method_routes_like_torch", ok, f"same block map {same_map}; out diff {err:.3g}; probes {used}"


INTERP_CASES = {
    "accuracy_fp16": lambda: accuracy_case("accuracy_fp16", torch.float16),
    "accuracy_fp32_d48": lambda: accuracy_case("accuracy_fp32_d48", torch.float32, d=48, cq=20, ck=9, seed=1),
    "accuracy_bf16_large_logits": lambda: accuracy_case("accuracy_bf16_large_logits", torch.bfloat16, d=16, seed=2),
    "strided_and_tiles": strided_and_tiles_case,
    "exact_fits_floored": exact_fits_case,
    "method_routes_like_torch": method_case,
}


# ------------------------------------------------------------------------------------------------ CPU tests


@pytest.fixture(scope="module")
def interp_results():
    return interp_results_of("tests.test_ear_probe")


@pytest.mark.parametrize("case", list(INTERP_CASES))
def test_interpreter(interp_results, case):
    res = interp_results[case]
    assert res["ok"], res["detail"]


def test_torch_probe_floors_exact_fits_like_the_definition():
    """The float64 definition used above agrees with the torch probe on a well-conditioned case (the helper is
    right), and puts one-key and empty clusters at the floor."""
    from svg2.methods.svg_ear import ear_log_error

    qc, ks, vs, kc, vm, sizes = probe_case(dtype=torch.float32, seed=5)
    want = ear_log_error(qc, ks, vs, kc, vm, sizes, 0.2)
    ref = log_error_f64(qc, ks, vs, sizes, 0.2)
    live = ref > _FLOOR + 1e-6
    assert (want.double() - ref)[live].abs().max() < 1e-3
    assert (ref[..., 3] == _FLOOR).all() and (ref[..., 5] == _FLOOR).all()


def test_probe_choice_and_refusals():
    from svg2 import SVG2Config
    from svg2.methods import build_method

    cfg = SVG2Config(compensate=True)
    with pytest.raises(ValueError, match="probe='fast' is not one of"):
        build_method("svg_ear", cfg=cfg, probe="fast")
    method = build_method("svg_ear", cfg=cfg, probe="triton")
    with pytest.raises(NotImplementedError, match="triton probe cannot run here"):
        method._probe_backend(torch.zeros(1, 1, 4, 16))
    assert build_method("svg_ear", cfg=cfg)._probe_backend(torch.zeros(1, 1, 4, 16)) == "torch"  # auto on the CPU
    assert build_method("svg_ear", cfg=cfg).describe()["probe"] == "auto"  # part of the row key
    assert method.describe()["probe"] == "triton"


@cuda
def test_auto_probe_is_the_fused_kernel_on_cuda():
    from svg2 import SVG2Config
    from svg2.methods import build_method

    method = build_method("svg_ear", cfg=SVG2Config(compensate=True))
    assert method._probe_backend(torch.zeros(1, 1, 4, 16, device="cuda")) == "triton"


def test_kernel_refuses_bad_arguments():
    pytest.importorskip("triton")
    from svg2_kernels.ear_probe import ear_log_error_triton

    qc, ks, vs, kc, vm, sizes = probe_case()
    with pytest.raises(ValueError, match="precision"):
        ear_log_error_triton(qc, ks, vs, kc, vm, sizes, 0.2, precision="fp8")
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        ear_log_error_triton(qc, ks, vs, kc, vm, sizes, 0.2, block_q=24)
    with pytest.raises(ValueError, match="shapes do not match"):
        ear_log_error_triton(qc, ks, vs[:, :10], kc, vm, sizes, 0.2)


# ------------------------------------------------------------------------------------------------ GPU tests


def _diagnose(got, want, ref, sizes) -> str:
    """Where the kernel is furthest from the float64 definition (live pairs) and which true zeros it left above the
    floor: what a failing GPU run needs to say."""
    live = ref > _FLOOR + 1e-6
    err = (got.double() - ref).abs().masked_fill(~live, 0)
    b, i, j = ((err == err.max()).nonzero()[0]).tolist()
    up = ~live & (got.double() > _FLOOR + 1e-3)
    sz = sizes.cpu()[:, None, :].expand_as(got)
    top = got.double()[up].max().item() if up.any() else None
    return (f"worst live pair (n={b}, q={i}, k={j}, size {int(sizes[b, j])}): kernel {got[b, i, j].item():.6g}, "
            f"torch {want[b, i, j].item():.6g}, f64 {ref[b, i, j].item():.6g}; true zeros above the floor: "
            f"{int(up.sum())} (cluster sizes {sorted(set(sz[up].tolist()))}, largest log E {top})")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_probe_within_twice_the_torch_error(dtype):
    from svg2.methods.svg_ear import ear_log_error
    from svg2_kernels.ear_probe import ear_log_error_triton

    qc, ks, vs, kc, vm, sizes = probe_case(n=2, s=3000, d=128, cq=40, ck=60, dtype=dtype, device="cuda")
    scale = 128**-0.5
    got = ear_log_error_triton(qc, ks, vs, kc, vm, sizes, scale).cpu()  # CUDA defaults: tf32x3, 64 x 32, group 16
    want = ear_log_error(qc, ks, vs, kc, vm, sizes, scale).cpu()
    ref = log_error_f64(*(x.cpu() for x in (qc, ks, vs, sizes)), scale)
    e_got, e_want, floored = _errors(got, want, ref)
    assert e_got <= 2 * e_want + 1e-4 and floored, (e_got, e_want, floored, _diagnose(got, want, ref, sizes.cpu()))


if __name__ == "__main__":
    interp_worker(INTERP_CASES)
