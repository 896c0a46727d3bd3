"""docs/quickstart.ipynb and docs/transformerlens_ioi.ipynb run as written: offline, on a local kernel of this
virtualenv."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"
TL_NOTEBOOK = ROOT / "docs" / "transformerlens_ioi.ipynb"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# One torch thread unless told otherwise: on a 2-core machine shared with other work, two
# threads spin against each other and the notebook took 136 s instead of 25 s (patching
# alone 96 s instead of 9 s; a batched float64 QR 24 s instead of 0.02 s).
KERNEL_ENV = {**OFFLINE_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

# Run first in the kernel (never saved into the notebook): any network attempt raises, and is
# also recorded, so that code which swallows the exception still fails the run at the end.
BLOCK_NETWORK = '''
import os as _os
import socket as _socket
import sys as _sys

assert _os.environ.get("HF_HUB_OFFLINE") == "1"
print(_sys.executable)

class NetworkBlocked(RuntimeError):
    pass

_network_attempts = []

def _refuse(*args, **kwargs):
    _network_attempts.append(repr(args)[:200])
    raise NetworkBlocked(f"the quickstart notebook tried to reach the network: {args!r}")

_socket.socket.connect = _refuse
_socket.socket.connect_ex = _refuse
_socket.create_connection = _refuse
_socket.getaddrinfo = _refuse

try:  # the guard itself works
    _socket.create_connection(("127.0.0.1", 9), timeout=1)
except NetworkBlocked:
    _network_attempts.clear()
else:
    raise AssertionError("the network guard did not trigger")
'''

CHECK_NO_NETWORK = '''
assert not _network_attempts, f"network attempts, caught inside the notebook's code: {_network_attempts}"
'''


def _kernelspec(directory: Path) -> Path:
    """A "python3" kernelspec that runs this interpreter (the venv's), offline."""
    spec = directory / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test venv)",
        "language": "python",
        "env": KERNEL_ENV,
    }))
    return directory


def _text(cell, name: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == name)


def _html(cell) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs
                   if o.output_type in ("execute_result", "display_data"))


def _cell(nb, marker: str):
    found = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(found) == 1, f"expected one code cell containing {marker!r}, found {len(found)}"
    return found[0]


def test_quickstart_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"saved with outputs: {cell.source[:60]!r}"


def _execute_offline(path: Path, tmp_path, monkeypatch):
    """Run a notebook on a local kernel of this virtualenv with every socket call refused; the executed cells."""
    import nbclient
    from jupyter_client.kernelspec import KernelSpecManager

    monkeypatch.setenv("JUPYTER_PATH", str(_kernelspec(tmp_path / "jupyter")))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable

    nb = nbformat.read(path, as_version=4)
    n_cells = len(nb.cells)
    nb.cells = [nbformat.v4.new_code_cell(BLOCK_NETWORK)] + nb.cells + [nbformat.v4.new_code_cell(CHECK_NO_NETWORK)]
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    assert _text(nb.cells[0]).strip() == sys.executable, "the kernel is not this virtualenv's Python"
    nb.cells = nb.cells[1:-1]
    assert len(nb.cells) == n_cells
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"]
            assert "Traceback" not in _text(cell, "stderr")
    return nb


def test_transformerlens_notebook_is_saved_without_outputs():
    nb = nbformat.read(TL_NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_transformerlens_ioi_notebook_runs_offline(tmp_path, monkeypatch):
    """The IOI walk-through of docs/coming_from_transformerlens.md, with TransformerLens' idioms unchanged."""
    nb = _execute_offline(TL_NOTEBOOK, tmp_path, monkeypatch)
    diffs = _text(_cell(nb, "logit difference (IO - S)"))
    assert all(float(x) > 0 for x in diffs.split("[")[1].split("]")[0].split(",")), diffs
    assert "final lens equals the logit difference: True" in _text(_cell(nb, "accumulated_resid("))
    dla = _text(_cell(nb, "stack_head_results(")).strip().splitlines()
    assert len(dla) == 6 and all(line.strip().startswith("L") for line in dla)
    assert "attends most to" in _text(_cell(nb, "hook.layer()")) and "fired in 30 layers" in _text(_cell(nb, "hook.layer()"))
    assert len(_text(_cell(nb, "activation_patch(model")).strip().splitlines()) == 6


@pytest.mark.slow
def test_quickstart_runs_offline(tmp_path, monkeypatch):
    nb = _execute_offline(NOTEBOOK, tmp_path, monkeypatch)

    # The next-token prediction.
    assert "' Paris'" in _text(_cell(nb, "logits[0, -1].argmax()")).splitlines()[0]
    # The attention view: a self-contained circuitsvis grid (the bundle is inlined, nothing is fetched).
    html = _html(_cell(nb, "attention_heads("))
    assert "var CircuitsVis=" in html and 'data-component="AttentionHeads"' in html
    assert "unpkg.com" not in html and "<script src" not in html
    # Patching: the full (layer, position) grid, and the heatmap the result displays as.
    assert "(30, 14) grid" in _text(_cell(nb, "activation_patch(model"))
    heatmap = [c for c in nb.cells if c.cell_type == "code" and c.source.strip() == "result"]
    assert len(heatmap) == 1 and "<svg" in _html(heatmap[0])
    # The shift study found a layer that sorts "mole" by sense better than chance.
    shift_out = _text(_cell(nb, "shift_study(model"))
    accuracy = float(shift_out.split("centroid accuracy ")[1].split(")")[0])
    assert accuracy > 1 / 3
    # Circuits: layer 1's heads of attn-only-2l copy (induction), their OV eigenvalue positivity is ~1.
    circuits_out = _text(_cell(nb, "circuits.eigenvalue_positivity("))
    positivity = circuits_out.split("[layer, head]:")[1].split("K-composition")[0]
    layer1 = [float(x) for x in re.findall(r"-?\d+\.\d+", positivity.splitlines()[2])]
    assert len(layer1) == 4 and min(layer1) > 0.95, positivity
    # The attached model's cache is keyed by module path.
    assert "'blocks.1'" in _text(_cell(nb, "hooked = attach(my_model)"))
