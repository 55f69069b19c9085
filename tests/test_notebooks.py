"""Every notebook in notebooks/ runs top to bottom in a fresh python3 kernel; a failing cell fails CI.

Each notebook is executed with nbclient (kernel `python3`, a per-cell timeout) in a temporary
working directory, with a clean environment: no XLA_FLAGS (the notebook's first cell must create
its own simulated CPU devices) and QWEN3_JAX_ROOT pointing at this checkout (the first cell's way
to find the packages when they are not pip-installed), and QWEN3_JAX_NOTEBOOK_QUICK=1 (the memory
plan notebook then skips the per-mesh workspace compile). The notebooks assert their own numbers
(planned bytes == placed bytes, logits errors under tolerances, greedy tokens equal); here we
also check that each drew its charts and that what is saved in the repository is either clean
or the output of one real top-to-bottom run.

The selected notebooks start together when the first of their tests runs, RUN_AT_ONCE at a time:
each kernel is its own process that keeps about one core busy (XLA compiles on one thread), so
two at once use a 2-core machine's second core. Each still runs alone in its own kernel.
"""

from __future__ import annotations

import base64
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbclient
import nbformat
import pytest

from conftest import require_reference

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # one cell; generous because CI machines are small and shared
# Charts each notebook must draw (PNG outputs of a top-to-bottom run).
MIN_FIGURES = {"01_mesh_tour.ipynb": 1, "02_memory_plan.ipynb": 2, "03_fp8.ipynb": 2, "04_parity.ipynb": 1,
               "05_generation.ipynb": 1}
NEEDS_TRANSFORMERS = {"03_fp8.ipynb", "04_parity.ipynb"}  # they write their checkpoint with save_pretrained
RUN_AT_ONCE = 2  # kernels executing at the same time


def kernel_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH")}
    env["QWEN3_JAX_ROOT"] = str(ROOT)
    # 02_memory_plan: plan weights and KV cache without compiling the 235B steps for all 16 meshes
    # (~8 s of CPU each); the workspace itself is tested in test_memory_plan.py.
    env["QWEN3_JAX_NOTEBOOK_QUICK"] = "1"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # quiets a debugger warning on frozen modules
    return env


def run_notebook(path: Path, workdir: Path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    # The kernel's own stdout/stderr (not the cells' outputs) to a file: kernels start from a
    # background thread, where pytest's capture of this process's stderr may not be in place.
    with open(workdir / "kernel.log", "wb") as log:
        try:
            client.execute(env=kernel_env(), stdout=log, stderr=log)
        except nbclient.exceptions.CellExecutionError as e:
            pytest.fail(f"{path.name}: a cell failed:\n{str(e)[-6000:]}", pytrace=False)
        except Exception as e:  # noqa: BLE001 - e.g. jupyter_client.kernelspec.NoSuchKernel
            if type(e).__name__ == "NoSuchKernel":
                pytest.fail(f"no Jupyter kernel named python3: {e}; register one with "
                            "`python -m ipykernel install --user --name python3`", pytrace=False)
            raise RuntimeError(f"{path.name}: {type(e).__name__}: {e}; the kernel's log: {workdir / 'kernel.log'}") from e
    return nb


def png_outputs(nb) -> list[bytes]:
    return [base64.b64decode(out["data"]["image/png"])
            for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


def test_every_notebook_is_tested():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
    assert set(NOTEBOOKS) == set(MIN_FIGURES), "MIN_FIGURES must name every notebook (and only those)"
    assert NEEDS_TRANSFORMERS <= set(NOTEBOOKS)


@pytest.fixture(scope="module")
def notebook_runs(request, tmp_path_factory):
    """{name: Future of the executed notebook} for every notebook whose test was selected, all
    started now (RUN_AT_ONCE at a time), each in a fresh kernel and its own temporary directory."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_notebook_runs_top_to_bottom"}
    have_reference = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    names = [n for n in NOTEBOOKS if n in selected and (have_reference or n not in NEEDS_TRANSFORMERS)]
    pool = ThreadPoolExecutor(RUN_AT_ONCE, thread_name_prefix="notebook")
    yield {n: pool.submit(run_notebook, NOTEBOOK_DIR / n, tmp_path_factory.mktemp(n.removesuffix(".ipynb")))
           for n in names}
    pool.shutdown(cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, notebook_runs):
    if name in NEEDS_TRANSFORMERS:
        require_reference()
    nb = notebook_runs[name].result()  # re-raises the run's pytest.fail (a failing cell) here
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    figures = png_outputs(nb)
    assert len(figures) >= MIN_FIGURES[name], f"{name} drew {len(figures)} charts, expected {MIN_FIGURES[name]}"
    assert all(f.startswith(b"\x89PNG") and len(f) > 5000 for f in figures)  # real images, not empty axes


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_notebook_is_clean_or_one_real_run(name):
    """Saved outputs are either absent or from one top-to-bottom run: no stale or failed cells."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == [None] * len(code) or counts == list(range(1, len(code) + 1)), counts
    if counts[0] is None:
        assert all(not c.outputs for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    first = code[0].source
    flags = first.index("xla_force_host_platform_device_count")
    assert flags < first.index("import jax") and flags < first.index("import qwen3_jax")
