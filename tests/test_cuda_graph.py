"""SVG2Config.cuda_graph (issue 18): the graph path's state machine with a fake graph backend on CPU (cold ->
warm -> capture -> replay, signature changes, refusals, off by default), and on a GPU (``cuda`` marker) real CUDA
graph replay against eager, step by step, on direct calls and on a tiny random Wan transformer with two branches."""

from __future__ import annotations

import logging

import pytest
import torch

from svg2 import SVG2Config, enable_svg2
from svg2.clustering import HeadSlice
from svg2.cuda_graph import CudaGraphBackend, GraphCache
from svg2.methods import AttentionContext, MethodState, build_method
from tests.helpers import clustered_qkv
from tests.tiny_diffusers import TINY_CFG, tiny_wan, wan_inputs

CFG = SVG2Config(num_q_centroids=6, num_k_centroids=12, kmeans_iters_init=8, kmeans_iters_step=2,
                 dense_steps_frac=0.0, dense_layers=0, kmeans_kernel="torch", attention_kernel="torch")


class FakeBackend:
    """Stands in for torch.cuda graphs on CPU: ``warmup`` runs the call once (the real one does it on a side
    stream), ``capture`` executes nothing and returns a replay that runs the same closure again, which reads and
    writes only the static buffers. Counts captures and replays."""

    name = "fake"

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0
        self.pools = 0

    def unavailable(self, device):
        return None

    def new_pool(self):
        self.pools += 1
        return object()

    def warmup(self, fn):
        fn()

    def capture(self, fn, pool):
        self.captures += 1

        def replay():
            self.replays += 1
            fn()

        return replay


def _ctx(state, layer=0, branch="cond", step=0, **kw):
    return AttentionContext(layer_index=layer, step_index=step, num_steps=10, branch=branch, state=state,
                            check_finite=False, **kw)


def _inputs(step, branch, s=200, dtype=torch.float32):
    seed = 100 * step + (0 if branch == "cond" else 1)
    return clustered_qkv(b=1, h=2, s=s, d=16, clusters=5, seed=seed, dtype=dtype)


def _run_pair(steps=6, branches=("cond", "uncond"), layers=(0, 1), cfg=CFG, backend=None, between=None):
    """The same calls through an eager method and a graph method; yields per call (out_eager, out_graph)."""
    eager, graphed = build_method("svg2", cfg=cfg), build_method("svg2", cfg=cfg.replace(cuda_graph=True))
    se, sg = MethodState(), MethodState()
    sg.graph_backend = backend or FakeBackend()
    rows = []
    for step in range(steps):
        if between is not None:
            between(step, se, sg)
        for branch in branches:
            for layer in layers:
                q, k, v = _inputs(step, branch)
                oe = eager(q, k, v, _ctx(se, layer, branch, step))
                og = graphed(q, k, v, _ctx(sg, layer, branch, step))
                rows.append((step, branch, layer, oe, og))
    return se, sg, rows


def _assert_same_state(se: MethodState, sg: MethodState):
    assert se._clusters.keys() == sg._clusters.keys()
    for key, ce in se._clusters.items():
        cg = sg._clusters[key]
        assert torch.equal(ce.q_centroids, cg.q_centroids), key
        assert torch.equal(ce.k_centroids, cg.k_centroids), key
        assert ce.calls == cg.calls


def test_off_by_default_and_config_dict_unchanged():
    assert SVG2Config().cuda_graph is False
    assert "cuda_graph" not in SVG2Config().to_dict()  # result keys built from to_dict() are unchanged
    on = SVG2Config(cuda_graph=True)
    assert on.to_dict()["cuda_graph"] is True and SVG2Config.from_dict(on.to_dict()) == on
    assert SVG2Config.from_dict(SVG2Config().to_dict()) == SVG2Config()
    with pytest.raises(TypeError):
        SVG2Config(cuda_graph=1)
    m = build_method("svg2", cfg=CFG)
    st = MethodState()
    q, k, v = _inputs(0, "cond")
    for step in range(3):
        m(q, k, v, _ctx(st, step=step))
    assert st.graphs is None  # the default path never builds a graph cache


def test_cold_warm_capture_replay_equal_to_eager_step_by_step():
    backend = FakeBackend()
    se, sg, rows = _run_pair(backend=backend)
    for step, branch, layer, oe, og in rows:
        assert torch.equal(oe, og), (step, branch, layer)
    _assert_same_state(se, sg)
    g = sg.graphs
    sites = 4  # 2 layers x 2 branches
    # step 0 cold (eager), step 1 warm (eager), step 2 capture (runs the call), steps 3-5 replay
    assert g.events == {"eager_cold": sites, "eager_warm": sites, "capture": sites, "replay": 3 * sites}
    assert backend.captures == sites and backend.replays == 3 * sites and backend.pools == 1  # one shared pool
    assert len(g.buffers) == 1  # one signature: static q/k/v/out shared by every site's graph
    recs_e = se.resolved_records()
    recs_g = sg.resolved_records()
    assert [r["density"] for r in recs_e] == [r["density"] for r in recs_g]
    assert sum(1 for r in recs_g if r.get("cuda_graph")) == 4 * sites


def test_centroids_are_updated_in_place_across_replays():
    """The graph reads the addresses seen at capture: after the capture the site's ClusterState must hold the
    graph's static centroid tensors (the same objects at every later step), with the eager values."""
    seen = {}

    def between(step, se, sg):
        if step >= 3:
            for key, cs in sg._clusters.items():
                ptr = (cs.q_centroids.data_ptr(), cs.k_centroids.data_ptr())
                if key in seen:
                    assert seen[key] == ptr, (step, key)
                seen[key] = ptr
                g = sg.graphs.sites[key].graphs
                (graph,) = g.values()
                assert cs.q_centroids is graph.q_centroids and cs.k_centroids is graph.k_centroids
        if step >= 1:
            _assert_same_state(se, sg)

    se, sg, rows = _run_pair(steps=7, between=between)
    assert len(seen) == 4
    for *_, oe, og in rows:
        assert torch.equal(oe, og)


def test_outside_centroid_changes_are_copied_in_before_replay():
    """A new video (reset: cold start again) and centroids seeded outside the graph both reach the replay."""
    def between(step, se, sg):
        if step == 4:  # new video: states forgotten, graphs kept
            se.reset()
            sg.reset()
        if step == 6:  # centroids rebound from outside (as seed_centroids_in_warmup or an eager call would)
            for st in (se, sg):
                for cs in st._clusters.values():
                    cs.q_centroids = cs.q_centroids.flip(1).clone()

    se, sg, rows = _run_pair(steps=8, between=between)
    for step, branch, layer, oe, og in rows:
        assert torch.equal(oe, og), (step, branch, layer)
    _assert_same_state(se, sg)
    ev = sg.graphs.events
    assert ev["capture"] == 4 and ev["eager_cold"] == 8  # two cold starts per site, one capture per site
    assert ev["replay"] == 4 * 8 - 4 * 4  # steps 3, 5, 6, 7 (step 4 is the new video's cold call)


def test_signature_change_recaptures_and_is_bounded(caplog):
    m = build_method("svg2", cfg=CFG.replace(cuda_graph=True))
    st = MethodState()
    st.graph_backend = FakeBackend()
    st.graphs = GraphCache(st.graph_backend, max_graphs_per_site=2)
    eager = build_method("svg2", cfg=CFG)
    se = MethodState()
    caplog.set_level(logging.WARNING, logger="svg2.cuda_graph")
    for s in (200, 160, 120):  # three signatures at one site; the third exceeds the bound
        for step in range(4):
            q, k, v = _inputs(step, "cond", s=s)
            assert torch.equal(m(q, k, v, _ctx(st, step=step)), eager(q, k, v, _ctx(se, step=step)))
    ev = st.graphs.events
    # the centroids still fit a new sequence length (warm start): each new signature gets one eager warm call,
    # then its capture; the third signature runs eagerly (the bound)
    assert ev == {"eager_cold": 1, "eager_warm": 2, "capture": 2, "replay": 1 + 2, "full": 4}
    assert st.graphs.num_graphs() == 2 and len(st.graphs.buffers) == 2
    msgs = [r.getMessage() for r in caplog.records if "more than 2 input signatures" in r.getMessage()]
    assert len(msgs) == 1  # said once


@pytest.mark.parametrize("change, ctx_kw, reason", [
    (dict(compensate=True), {}, "compensate=True"),
    (dict(layout_every=2), {}, "layout_every > 1"),
    ({}, dict(check_finite=True), "check_finite=True"),
    ({}, dict(heads=HeadSlice(0, 2, 4)), "sequence-parallel"),
    ({}, dict(num_text_tokens=8), "joint text tokens"),
])
def test_refusals_run_eagerly_with_one_logged_reason(change, ctx_kw, reason, caplog):
    cfg = CFG.replace(**change)
    m, eager = build_method("svg2", cfg=cfg.replace(cuda_graph=True)), build_method("svg2", cfg=cfg)
    st, se = MethodState(), MethodState()
    st.graph_backend = FakeBackend()
    caplog.set_level(logging.WARNING, logger="svg2.cuda_graph")
    for step in range(4):
        q, k, v = _inputs(step, "cond")
        base = dict(layer_index=0, step_index=step, num_steps=10, check_finite=False)
        base.update(ctx_kw)
        og = m(q, k, v, AttentionContext(state=st, **base))
        oe = eager(q, k, v, AttentionContext(state=se, **base))
        assert torch.equal(og, oe)
    assert st.graphs.events == {"refused": 4} and st.graph_backend.captures == 0
    assert len(st.graphs.reasons) == 1 and reason in st.graphs.reasons[0]
    assert sum(reason in r.getMessage() for r in caplog.records) == 1


def test_real_backend_refuses_cpu_inputs(caplog):
    assert "not on a CUDA device" in CudaGraphBackend().unavailable(torch.device("cpu"))
    m = build_method("svg2", cfg=CFG.replace(cuda_graph=True))
    st = MethodState()  # no injected backend: torch.cuda graphs
    caplog.set_level(logging.WARNING, logger="svg2.cuda_graph")
    for step in range(3):
        q, k, v = _inputs(step, "cond")
        m(q, k, v, _ctx(st, step=step))
    assert st.graphs.events == {"refused": 3}
    assert sum("not on a CUDA device" in r.getMessage() for r in caplog.records) == 1


def _wan_loop(model, handle_cfg, steps, inputs, backend=None):
    h = enable_svg2(model, handle_cfg)
    if backend is not None:
        for t in h.targets:
            t.state.graph_backend = backend
    outs = []
    with torch.no_grad():
        for i in range(steps):
            for b in ("cond", "uncond"):
                with model.cache_context(b, step_index=i, num_inference_steps=steps):
                    outs.append(model(**inputs)[0])
    states = {key: (cs.q_centroids.clone(), cs.k_centroids.clone())
              for key, cs in h.targets[0].state._clusters.items() if cs.q_centroids is not None}  # dense layers: none
    graphs = h.targets[0].state.graphs
    rows = h.records()
    h.remove()
    assert h.targets[0].state.graphs is None  # remove() drops the graphs
    return outs, states, graphs, rows


def test_tiny_wan_handle_with_fake_backend_equals_eager():
    model = tiny_wan()
    inputs = wan_inputs()
    cfg = TINY_CFG.replace(dense_steps_frac=0.2, dense_layers=1)
    oe, se, _, re_ = _wan_loop(model, cfg, 6, inputs)
    og, sg, graphs, rg = _wan_loop(model, cfg.replace(cuda_graph=True), 6, inputs, backend=FakeBackend())
    for i, (a, b) in enumerate(zip(oe, og)):
        assert torch.equal(a, b), i
    assert se.keys() == sg.keys()
    for key in se:
        assert torch.equal(se[key][0], sg[key][0]) and torch.equal(se[key][1], sg[key][1]), key
    # 5 sparse steps (step 0 dense) x 2 sparse layers x 2 branches: cold, warm, capture, 2 replays per site
    assert graphs.events == {"eager_cold": 4, "eager_warm": 4, "capture": 4, "replay": 8}
    assert [r["density"] for r in re_] == [r["density"] for r in rg]


# -- on a GPU: real CUDA graphs -------------------------------------------------------------------------------

def _eager_is_deterministic(fn) -> bool:
    a, b = fn(), fn()
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _same(a, b, exact):
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_replay_equals_eager_direct_calls(dtype):
    """Default kernels (auto: Triton on Hopper) at a shape where they run; two sites x two branches, 8 steps."""
    cfg = SVG2Config(num_q_centroids=32, num_k_centroids=64, kmeans_iters_init=10, dense_steps_frac=0.0,
                     dense_layers=0, target_density=0.25)

    def run(graph: bool):
        m = build_method("svg2", cfg=cfg.replace(cuda_graph=graph))
        st = MethodState()
        outs = []
        for step in range(8):
            for branch in ("cond", "uncond"):
                for layer in (0, 1):
                    q, k, v = (x.cuda() for x in _inputs(step, branch, s=4096, dtype=dtype))
                    outs.append(m(q, k, v, _ctx(st, layer, branch, step)))
                    cs = st.cluster_state(layer, branch)
                    outs += [cs.q_centroids.clone(), cs.k_centroids.clone()]
        torch.cuda.synchronize()
        return outs, st

    exact = _eager_is_deterministic(lambda: run(False)[0])
    (oe, _), (og, sg) = run(False), run(True)
    assert sg.graphs.events["capture"] == 4 and sg.graphs.events["replay"] == 4 * 5
    for a, b in zip(oe, og):
        _same(a, b, exact)
    assert exact, "eager svg2 is not bitwise reproducible here: graph replay was compared with a tolerance only"


@pytest.mark.cuda
def test_cuda_graph_tiny_wan_two_branches_equals_eager():
    model = tiny_wan().cuda()
    inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in wan_inputs().items()}
    cfg = TINY_CFG.replace(dense_steps_frac=0.2, dense_layers=1)
    exact = _eager_is_deterministic(lambda: _wan_loop(model, cfg, 6, inputs)[0])
    oe, se, _, _ = _wan_loop(model, cfg, 6, inputs)
    og, sg, graphs, _ = _wan_loop(model, cfg.replace(cuda_graph=True), 6, inputs)
    assert graphs.events.get("capture") == 4 and graphs.events.get("replay") == 8, graphs.events
    for a, b in zip(oe, og):
        _same(a, b, exact)
    for key in se:  # k-means state evolves identically
        _same(se[key][0], sg[key][0], exact)
        _same(se[key][1], sg[key][1], exact)
    assert exact, "eager svg2 is not bitwise reproducible here: graph replay was compared with a tolerance only"


def test_config_change_recaptures_instead_of_replaying_the_old_config():
    """A benchmark changes method.cfg (target_density) between runs: the graph of the old config must not replay."""
    cfg = CFG.replace(target_density=0.5)
    m, eager = build_method("svg2", cfg=cfg.replace(cuda_graph=True)), build_method("svg2", cfg=cfg)
    st, se = MethodState(), MethodState()
    st.graph_backend = FakeBackend()
    for step in range(8):
        if step == 4:
            m.cfg = m.cfg.replace(target_density=0.2)
            eager.cfg = eager.cfg.replace(target_density=0.2)
        q, k, v = _inputs(step, "cond")
        assert torch.equal(m(q, k, v, _ctx(st, step=step)), eager(q, k, v, _ctx(se, step=step))), step
    assert [r["density"] for r in st.resolved_records()] == [r["density"] for r in se.resolved_records()]
    assert st.graphs.events == {"eager_cold": 1, "eager_warm": 2, "capture": 2, "replay": 3}


class FailingCapture(FakeBackend):
    def capture(self, fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_failed_capture_keeps_the_result_and_stays_eager(caplog):
    caplog.set_level(logging.WARNING, logger="svg2.cuda_graph")
    se, sg, rows = _run_pair(steps=5, layers=(0,), branches=("cond",), backend=FailingCapture())
    for step, _branch, _layer, oe, og in rows:
        assert torch.equal(oe, og), step
    _assert_same_state(se, sg)
    assert sg.graphs.events == {"eager_cold": 1, "eager_warm": 1, "capture_failed": 1, "eager_failed": 2}
    assert sum("capture failed (RuntimeError" in r.getMessage() for r in caplog.records) == 1
