"""experiments/vendor_flashinfer.py on a synthetic wheel: what the trimmed copy keeps and drops."""

from __future__ import annotations

import json
import tarfile
import zipfile

from experiments.vendor_flashinfer import build

FILES = {
    "flashinfer/__init__.py": "from .unrelated import everything\n",
    "flashinfer/_build_meta.py": "__version__ = '0'\n",
    "flashinfer/sparse.py": "import einops\nfrom .prefill import get_module\n",
    "flashinfer/prefill.py": "def get_module():\n    from .jit import core\n    import tvm_ffi\n",
    "flashinfer/jit/__init__.py": "",
    "flashinfer/jit/core.py": "SOURCES = ['batch_prefill.cu']\n",
    "flashinfer/unrelated.py": "import quack\n",
    "flashinfer/data/csrc/batch_prefill.cu": '#include "flashinfer/attention.cuh"\n',
    "flashinfer/data/csrc/moe.cu": '#include "flashinfer/moe.cuh"\n',
    "flashinfer/data/include/flashinfer/attention.cuh": "#include <cute/tensor.hpp>\n#include <cutlass/fast_math.h>\n",
    # CUTLASS names libcu++ headers through a macro; missing them, nvcc mixed in the toolkit's own CCCL
    "flashinfer/data/cutlass/include/cutlass/fast_math.h": "#include CUDA_STD_HEADER(utility)\n",
    "flashinfer/data/cccl/libcudacxx/include/cuda/std/utility": "",
    "flashinfer/data/cccl/libcudacxx/include/cuda/std/tuple": "",
    "flashinfer/data/include/flashinfer/moe.cuh": "",
    "flashinfer/data/cutlass/include/cute/tensor.hpp": "",
    "flashinfer/data/cutlass/include/cute/unused.hpp": "",
}


def test_trimmed_copy_keeps_the_prefill_closure(tmp_path):
    wheel = tmp_path / "flashinfer-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in FILES.items():
            z.writestr(name, text)
    out = tmp_path / "site"
    m = build(str(wheel), str(out), budget_mib=1.0, archive=str(tmp_path / "site.tar.xz"))
    kept = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"VENDORED.json"}
    assert kept == {"flashinfer/__init__.py", "flashinfer/_build_meta.py", "flashinfer/sparse.py",
                    "flashinfer/prefill.py", "flashinfer/jit/__init__.py", "flashinfer/jit/core.py",
                    "flashinfer/data/csrc/batch_prefill.cu", "flashinfer/data/include/flashinfer/attention.cuh",
                    "flashinfer/data/cutlass/include/cute/tensor.hpp",
                    "flashinfer/data/cutlass/include/cutlass/fast_math.h",
                    "flashinfer/data/cccl/libcudacxx/include/cuda/std/utility"}
    assert "unrelated" not in (out / "flashinfer/__init__.py").read_text()  # the minimal __init__
    assert m["third_party_imports"] == ["einops", "tvm_ffi"]
    assert m["third_party_imports_at_import_time"] == ["einops"]
    assert m["within_budget"] and json.loads((out / "VENDORED.json").read_text())["source_files"] == 5
    with tarfile.open(tmp_path / "site.tar.xz") as tar:
        assert "site/flashinfer/sparse.py" in tar.getnames()
