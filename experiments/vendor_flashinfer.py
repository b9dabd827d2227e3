"""Build a trimmed copy of flashinfer holding what ``VariableBlockSparseAttentionWrapper`` (JIT prefill) needs.

The flashinfer-python 0.7.2.post1 wheel is 62 MB (420 MB unpacked: every kernel family's CUDA sources, CUTLASS,
CCCL); the GPU machine takes at most 64 MiB with the project. This keeps:

* Python: the import closure (``ast``; module-level and lazy imports, relative and absolute) of
  ``flashinfer.sparse``, ``flashinfer.prefill`` and the ``flashinfer.jit`` package, with a minimal
  ``flashinfer/__init__.py`` (the real one imports every kernel family);
* CUDA sources: the csrc / template files named in the prefill JIT's Python (``jit/attention``, ``jit/core``,
  ``prefill``, ``sparse``) and every header they ``#include``, followed through flashinfer's include dir, csrc,
  CUTLASS and CCCL (conditional includes too: an over-approximation).

Usage (CPU, here):
    pip download flashinfer-python==0.7.2.post1 --no-deps -d .flashinfer/
    python experiments/vendor_flashinfer.py .flashinfer/flashinfer_python-0.7.2.post1-py3-none-any.whl
writes ``.flashinfer/site`` (unpacked, ~50 MiB: CUTLASS headers for the SM90 backend are most of it) and
``.flashinfer/flashinfer_site.tar.xz`` (what travels; the project itself is ~54 MiB of the 64). On the GPU
machine: carry the archive, ``tar xJf .flashinfer/flashinfer_site.tar.xz -C /tmp && PYTHONPATH=/tmp/site``, plus
wheels of the third-party modules the manifest lists under ``third_party_imports_at_import_time`` that the image
lacks (``apache-tvm-ffi``, ``einops`` at least).
``.flashinfer/`` is git-ignored: neither the wheel nor the copy is committed.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from pathlib import PurePosixPath

PKG = "flashinfer"
SEED_MODULES = ("flashinfer.sparse", "flashinfer.prefill", "flashinfer._build_meta")  # the last: minimal __init__
SEED_PACKAGES = ("flashinfer/jit/",)
# Python files whose string literals name the CUDA sources and templates of the prefill JIT
SOURCE_NAMERS = ("flashinfer/jit/attention/", "flashinfer/jit/core.py", "flashinfer/jit/utils.py",
                 "flashinfer/prefill.py", "flashinfer/sparse.py")
INCLUDE_ROOTS = ("flashinfer/data/include", "flashinfer/data/csrc", "flashinfer/data/cutlass/include",
                 "flashinfer/data/cutlass/tools/util/include", "flashinfer/data/cccl/cub",
                 "flashinfer/data/cccl/libcudacxx/include", "flashinfer/data/cccl/thrust",
                 "flashinfer/data/spdlog/include")
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".inc", ".jinja", ".inl")
_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)
# CUTLASS names libcu++ headers through a macro, ``#include CUDA_STD_HEADER(utility)`` -> <cuda/std/utility>.
# Missing them, the build falls back to the CUDA toolkit's own CCCL, whose macros clash with the bundled copy's
# (nvcc 13 on the H200: "missing binary operator before token '('" at `#if _CCCL_HAS_CUDA_COMPILER()`).
_CUDA_STD_INCLUDE = re.compile(r'^\s*#\s*include\s+CUDA_STD_HEADER\(\s*(\w+)\s*\)', re.M)
_MINIMAL_INIT = '''"""Trimmed flashinfer (svg2 experiments/vendor_flashinfer.py): variable-block sparse prefill only."""
from ._build_meta import __version__ as __version__  # noqa: F401


def __getattr__(name):
    if name in ("VariableBlockSparseAttentionWrapper", "BlockSparseAttentionWrapper"):
        from . import sparse

        return getattr(sparse, name)
    raise AttributeError(name)
'''


def module_path(names: set[str], module: str) -> str | None:
    """The wheel path of ``module`` (a module file or a package __init__), or None."""
    base = module.replace(".", "/")
    for cand in (f"{base}.py", f"{base}/__init__.py"):
        if cand in names:
            return cand
    return None


def _eager_nodes(tree: ast.Module):
    """The nodes of ``tree`` outside function bodies (what runs at import)."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def imports_of(path: str, source: str) -> tuple[set[str], set[str], set[str]]:
    """(flashinfer modules, third-party top-level names) that ``source`` imports anywhere (lazy imports too), and
    the third-party names it imports at import time, from one parse."""
    tree = ast.parse(source, filename=path)
    eager_nodes = {id(n) for n in _eager_nodes(tree)}
    pkg = ".".join(PurePosixPath(path).parts[:-1])
    ours: set[str] = set()
    theirs: set[str] = set()
    eager: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [a.name if a.name.startswith(PKG) else a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found = [mod] if mod.split(".")[0] != PKG else [mod, *(f"{mod}.{a.name}" for a in node.names)]
        else:
            continue
        for name in found:  # ImportFrom of ours also lists its names: they may be submodules
            if name.split(".")[0] == PKG:
                ours.add(name)
            else:
                theirs.add(name.split(".")[0])
                if id(node) in eager_nodes:
                    eager.add(name.split(".")[0])
    return ours, theirs, eager


def python_closure(z: zipfile.ZipFile) -> tuple[set[str], set[str], set[str]]:
    """(kept files, third-party modules imported anywhere, third-party modules imported at import time)."""
    names = set(z.namelist())
    todo = [p for m in SEED_MODULES if (p := module_path(names, m))]
    todo += [n for n in names if n.endswith(".py") and n.startswith(SEED_PACKAGES)]
    keep: set[str] = set()
    third: set[str] = set()
    eager: set[str] = set()
    while todo:
        path = todo.pop()
        if path in keep:
            continue
        keep.add(path)
        parts = PurePosixPath(path).parts
        for i in range(1, len(parts) - 1 + (0 if path.endswith("__init__.py") else 1)):  # parent packages
            init = "/".join(parts[:i]) + "/__init__.py"
            if init in names and init not in keep:
                todo.append(init)
        if path == f"{PKG}/__init__.py":
            continue  # replaced by the minimal one: its imports are not followed
        ours, theirs, theirs_eager = imports_of(path, z.read(path).decode())
        third |= theirs
        eager |= theirs_eager
        for mod in ours:
            p = module_path(names, mod)
            if p and p not in keep:
                todo.append(p)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    return keep, {t for t in third if t and t not in stdlib}, {t for t in eager if t and t not in stdlib}


def source_closure(z: zipfile.ZipFile, py_files: set[str]) -> set[str]:
    names = set(z.namelist())
    sources = [n for n in names if n.startswith(INCLUDE_ROOTS) and n.endswith(SOURCE_SUFFIXES)]
    by_base: dict[str, list[str]] = {}
    for n in sources:
        by_base.setdefault(PurePosixPath(n).name, []).append(n)
    literals: set[str] = set()
    for path in py_files:
        if path.startswith(SOURCE_NAMERS):
            for node in ast.walk(ast.parse(z.read(path).decode())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    literals.add(PurePosixPath(node.value).name)
    todo = [n for base in literals if base.endswith(SOURCE_SUFFIXES) for n in by_base.get(base, [])
            if n.startswith("flashinfer/data/csrc/")]
    keep: set[str] = set()
    while todo:
        path = todo.pop()
        if path in keep:
            continue
        keep.add(path)
        text = z.read(path).decode(errors="replace")
        here = str(PurePosixPath(path).parent)
        incs = _INCLUDE.findall(text) + [f"cuda/std/{h}" for h in _CUDA_STD_INCLUDE.findall(text)]
        for inc in incs:
            for root in (here, *INCLUDE_ROOTS):
                cand = str(PurePosixPath(root) / inc)
                if cand in names:
                    if cand not in keep:
                        todo.append(cand)
                    break
    return keep


def build(wheel: str, out: str, budget_mib: float, archive: str | None = None) -> dict:
    import tarfile
    from pathlib import Path

    z = zipfile.ZipFile(wheel)
    py, third, eager = python_closure(z)
    src = source_closure(z, py)
    dest = Path(out)
    total = 0
    for name in sorted(py | src):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = _MINIMAL_INIT.encode() if name == f"{PKG}/__init__.py" else z.read(name)
        target.write_bytes(data)
        total += len(data)
    manifest = {"wheel": Path(wheel).name, "python_files": len(py), "source_files": len(src),
                "bytes": total, "mib": round(total / 2**20, 2), "third_party_imports": sorted(third),
                "third_party_imports_at_import_time": sorted(eager)}
    (dest / "VENDORED.json").write_text(json.dumps(manifest, indent=1))
    size = total
    if archive:  # what travels: the headers compress ~10x
        with tarfile.open(archive, "w:xz") as tar:
            tar.add(dest, arcname="site")
        size = Path(archive).stat().st_size
        manifest["archive"] = archive
        manifest["archive_mib"] = round(size / 2**20, 2)
    manifest["within_budget"] = size / 2**20 <= budget_mib
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel")
    p.add_argument("--out", default=".flashinfer/site")
    p.add_argument("--archive", default=".flashinfer/flashinfer_site.tar.xz",
                   help="also pack the copy as tar.xz (what travels; '' to skip)")
    p.add_argument("--budget-mib", type=float, default=8.0,
                   help="warn when what travels (the archive, else the copy) is larger: the project itself is ~54 MiB "
                        "of the GPU machine's 64 MiB")
    args = p.parse_args(argv)
    m = build(args.wheel, args.out, args.budget_mib, args.archive or None)
    print(json.dumps(m, indent=1))
    if not m["within_budget"]:
        print(f"WARNING: {m['mib']} MiB is over --budget-mib {args.budget_mib}", file=sys.stderr)


if __name__ == "__main__":
    main()
