"""``python -m bench device --cpu --quick``: the GPU measurement's command, run here on the
CPU end to end (model alone, decode, FAISS, a real server under load, the limit named), so
that it works on the day a GPU machine is lent; then its file recorded and rendered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_the_device_command_measures_the_whole_path_on_the_cpu(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="PyTorch is not installed: pip install -e '.[torch]'")
    out = tmp_path / "device.json"
    command = [sys.executable, "-m", "bench", "device", "--cpu", "--quick", "--json-out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    section = json.loads(out.read_text())
    assert section["device"] == "CPU (no GPU)" and section["backend"] == "torch"
    assert section["command"] == "python -m bench device --cpu --quick --json-out " + str(out)
    assert set(section["model_images_per_s"]) == {"1", "8", "32"}
    assert min(section["model_images_per_s"].values()) > 0
    assert section["search"]["items"] == 10_000 and section["search"]["ms_per_call"]["32"] > 0
    points = section["points"]
    assert [(p["images_per_request"], p["clients"]) for p in points] == [
        (1, 1), (1, 8), (8, 1), (8, 8)
    ]  # fmt: skip
    for p in points:
        assert p["images_per_s"] > 0 and p["errors"] == {} and p["mean_batch"] >= 1
        assert p["server_cpu_pct"] > 0 and p["reactor_cpu_pct"] > 0
        assert p["gpu_util_pct"] is None  # no nvidia-smi here
    [edged] = section["edges"]  # the same server with two edge processes
    assert edged["workers"] == 2 and edged["clients"] == 8 and edged["errors"] == {}
    assert edged["images_per_s"] > 0 and edged["edges_cpu_pct"] > 0
    assert edged["edge_reactors_cpu_pct"] > 0 and edged["core_cpu_pct"] > 0
    # Eight clients of eight images batch more than one client of one image.
    assert points[3]["mean_batch"] > points[0]["mean_batch"]
    assert section["limit"]["nearest"] in {"model", "decode", "reactor", "load generator"}

    results, rendered = tmp_path / "results.json", tmp_path / "RESULTS.md"
    record = [sys.executable, "-m", "bench", "device", "--record", str(out),
              "--results", str(results), "--out", str(rendered), "--readme", ""]  # fmt: skip
    subprocess.run(record, cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert json.loads(results.read_text())["device"] == section
    assert "## The GPU path end to end: CPU (no GPU)" in rendered.read_text()
