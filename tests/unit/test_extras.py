"""What each extra brings in: serving imports neither TensorFlow (until a model loads) nor
the training and test libraries; training says which extra it lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchserve.cli import main

HEAVY = ("tensorflow", "keras", "matplotlib", "skimage")


def loaded_after(code: str) -> list[str]:
    """Which of ``HEAVY`` a fresh interpreter has in sys.modules after running ``code``."""
    probe = code + (
        f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_serving_modules_import_no_tensorflow_matplotlib_or_scikit_image() -> None:
    code = (
        "import batchserve.cli, batchserve.http.v1, batchserve.serving.service, batchserve.demo\n"
        "import batchserve.server, batchserve.models.spec, batchserve.models.model_dir\n"
        "batchserve.cli.build_parser()\n"
        "assert len(batchserve.demo.sample_photos()) == len(batchserve.demo.SAMPLES)\n"
    )
    assert loaded_after(code) == []


def test_the_train_package_imports_no_tensorflow_or_matplotlib_until_it_trains() -> None:
    code = (
        "import batchserve.train, batchserve.train.report\n"
        "from batchserve.cli import main\n"
        "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
    )
    assert loaded_after(code) == []


def test_train_without_the_train_extra_exits_2_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As if matplotlib were not installed: importing it raises ModuleNotFoundError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for name in ("OMP_WAIT_POLICY", "TF_CPP_MIN_LOG_LEVEL"):  # main sets them if unset
        monkeypatch.setenv(name, os.environ.get(name, ""))
    (tmp_path / "data").mkdir()
    code = main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "model")])
    assert code == 2
    assert capsys.readouterr().err == (
        "batchserve: `batchserve train` needs the train extra (matplotlib is not installed): "
        "pip install 'batchserve[train]'\n"
    )
    assert not (tmp_path / "model").exists()
