"""``python -m bench device``'s own arithmetic: which part was nearest its limit, the wheels
it carries to a lent machine, and its section of RESULTS.md; and the section on OpenVINO in
bfloat16."""

from __future__ import annotations

from typing import Any

from bench.harness import wheels
from bench.report import sections_backends
from bench.scenarios import device

MODEL = {"1": 100.0, "8": 400.0, "32": 1000.0}


def point(**overrides: Any) -> dict[str, Any]:
    base = {
        "images_per_request": 1, "clients": 8, "images_per_s": 300.0, "p50_ms": 20.0,
        "p99_ms": 40.0, "errors": {}, "mean_batch": 8.0, "gpu_util_pct": None,
        "server_cpu_pct": 150.0, "reactor_cpu_pct": 50.0, "generator_cpu_pct": 30.0,
    }  # fmt: skip
    return {**base, **overrides}


def test_the_model_is_the_limit_when_it_runs_at_its_own_rate_for_the_batch_it_got() -> None:
    found = device.limit(point(images_per_s=392.0, mean_batch=9.5), MODEL, 1000.0, 2)
    # Mean batch 9.5: the model's rate at batch 8 (400/s) is its limit there.
    assert found["shares"]["model"] == 0.98 and found["nearest"] == "model"


def test_the_reactor_is_the_limit_when_its_thread_is_busy_and_the_model_is_not() -> None:
    found = device.limit(point(images_per_s=200.0, reactor_cpu_pct=97.0), MODEL, 1000.0, 2)
    assert found["nearest"] == "reactor" and found["shares"]["reactor"] == 0.97


def test_decode_and_the_generator_are_measured_against_their_own_capacity() -> None:
    decode = device.limit(point(images_per_s=392.0, mean_batch=32), MODEL, 200.0, 2)
    assert decode["nearest"] == "decode" and decode["shares"]["decode"] == 0.98
    busy = point(images_per_s=100.0, generator_cpu_pct=100.0 * device.GENERATORS)
    assert device.limit(busy, MODEL, 1000.0, 2)["nearest"] == "load generator"


def test_the_wheels_are_what_serving_needs_beyond_the_machines_own_packages() -> None:
    needed = {line.split("==")[0] for line in wheels.needed()}
    assert {"twisted", "klein", "keras", "faiss-cpu", "httpx", "h5py", "zope-interface"} <= needed
    assert not needed & wheels.PRESENT  # numpy, torch, ... are the machine's own
    assert all("==" in line for line in wheels.needed())  # the versions this checkout runs


def test_the_section_names_the_device_every_point_and_the_limit() -> None:
    section = {
        "device": "NVIDIA H100 80GB HBM3", "backend": "torch", "quick": False,
        "model_images_per_s": MODEL, "decode_per_s_per_thread": 310.0,
        "search": {"items": 100_000, "dim": 1280, "k": 10, "ms_per_call": {"1": 4.1, "32": 30.2}},
        "server": {"flags": ["--backend", "torch"], "generators": 4, "seconds": 10.0},
        "points": [point(), point(images_per_request=8, gpu_util_pct=41.5)],
        "best": point(), "limit": device.limit(point(), MODEL, 1000.0, 16),
    }  # fmt: skip
    text = "\n".join(sections_backends.device(section))
    assert "## The GPU path end to end: NVIDIA H100 80GB HBM3" in text
    assert "100,000 items" in text and "4.1 ms for 1 queries" in text
    assert "| 8 | 8 | 300 | 20 | 40 | 8 | 41.5 | 150 | 50 | 30 |" in text
    assert "| 1 | 8 | 300 | 20 | 40 | 8 | n/a |" in text
    assert f"**{section['limit']['nearest']}**" in text


def test_bfloat16_is_said_to_stay_off_when_it_finds_fewer_originals_first() -> None:
    def section(bf16_top1: float) -> str:
        rates = {"1": 400.0, "32": 460.0}
        figures = {
            "f32": {"top1": 0.814, "recall5": 0.884, "map": 0.85, "images_per_s": rates},
            "bf16": {"top1": bf16_top1, "recall5": 0.886, "map": 0.85, "images_per_s": rates},
        }
        numbers = {"catalog": 1131, "queries": 1659, "rounds": 3, "precisions": figures,
                   "min_cosine": 0.94, "mean_cosine": 0.99}  # fmt: skip
        return "\n".join(sections_backends.precision(numbers))

    assert "float32 stays the default" in section(0.811)
    assert "| bf16 | 0.811 | 0.886 | 400.0 | 460.0 |" in section(0.811)
    assert "bfloat16 finds as many originals first" in section(0.814)
