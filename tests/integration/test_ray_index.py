"""``batchserve index --engine ray`` against the local engine: a Ray started for the run (2
CPUs) and a two-node cluster on this machine (a head and a worker, with token
authentication) that the other tests share, the built-in model, real JPEGs and a corrupt
file."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchserve.demo import sample_photos
from batchserve.storage.sqlite import SqliteCatalog
from tests.postgres import PostgresCluster, free_port, unavailable

RAY_BIN = Path(sys.executable).parent / "ray"


def require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        unavailable("Ray is not installed: pip install -e '.[ray]'")


@dataclass(frozen=True)
class Indexed:
    """What one ``batchserve index`` run did: exit status, stderr, the catalog's items as
    {id: (embedding, label, class, metadata)}, their thumbnails {id: JPEG or None} and
    their local features {id: packed or None}."""

    returncode: int
    stderr: str
    items: dict[str, tuple[np.ndarray, str | None, str | None, dict[str, object]]]
    thumbnails: dict[str, bytes | None]
    features: dict[str, bytes | None]


def write_photos(root: Path) -> Path:
    """16 JPEGs in two class folders (the demo photos and their crops) and a corrupt one."""
    for n, (_id, _label, data) in enumerate(sample_photos()):
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
            width, height = rgb.size
            crop = rgb.crop((width // 8, height // 8, width * 7 // 8, height * 7 // 8))
            for folder, picture in (("whole", rgb), ("cropped", crop)):
                (root / folder).mkdir(parents=True, exist_ok=True)
                picture.save(root / folder / f"{n}.jpg", "JPEG", quality=90)
    (root / "whole" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return root


def run_index(
    source: Path, data_dir: Path, *flags: str, env: dict[str, str] | None = None
) -> Indexed:
    """``batchserve index SOURCE --data-dir DATA_DIR FLAGS`` in ``env`` (default: ours)."""
    command = [sys.executable, "-m", "batchserve.cli", "index", str(source)]
    done = subprocess.run(
        [*command, "--data-dir", str(data_dir), *flags],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    items = read_items(data_dir)
    thumbnails, features = (
        read_side(data_dir, "thumbnails", "jpeg"),
        read_side(data_dir, "features", "orb"),
    )
    return Indexed(done.returncode, done.stderr, items, thumbnails, features)


def read_items(
    data_dir: Path,
) -> dict[str, tuple[np.ndarray, str | None, str | None, dict[str, object]]]:
    path = data_dir / "catalog.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT id, embedding, label, class, metadata FROM items").fetchall()
    return {
        r[0]: (np.frombuffer(r[1], dtype=np.float32), r[2], r[3], json.loads(r[4])) for r in rows
    }


def read_side(data_dir: Path, table: str, column: str) -> dict[str, bytes | None]:
    """{item id: its row's ``column`` of ``table`` (thumbnails, features) or None}."""
    path = data_dir / "catalog.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        rows = db.execute(
            f"SELECT items.id, {table}.{column} FROM items "
            f"LEFT JOIN {table} ON {table}.fid = items.fid"
        ).fetchall()
    return {r[0]: None if r[1] is None else bytes(r[1]) for r in rows}


def failures(run: Indexed) -> list[str]:
    """The final report's failure lines: location and reason."""
    return [
        line.removeprefix("  failed: ")
        for line in run.stderr.splitlines()
        if line.startswith("  failed: ")
    ]


Cluster = tuple[str, dict[str, str]]


def on(cluster: Cluster) -> tuple[str, ...]:
    """The flags of a run on ``cluster`` (its environment is ``cluster[1]``)."""
    return ("--engine", "ray", "--ray-address", cluster[0])


def assert_same_items(ray: Indexed, local: Indexed) -> None:
    """The same ids, embeddings, labels, classes and metadata, and the same thumbnails and
    local features (the local engine stores both for every item)."""
    assert sorted(ray.items) == sorted(local.items)
    for item_id, (vector, *rest) in ray.items.items():
        reference, *expected = local.items[item_id]
        assert float(vector @ reference) >= 0.9999, item_id
        assert rest == expected, item_id
    assert all(local.thumbnails.values()) and len(local.thumbnails) == len(local.items)
    assert ray.thumbnails == local.thumbnails
    assert all(local.features.values()) and len(local.features) == len(local.items)
    assert ray.features == local.features


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A home of its own: the token Ray makes for a cluster it starts lands there."""
    require_ray()
    return {**os.environ, "HOME": str(tmp_path_factory.mktemp("home"))}


class RayNode:
    """``ray start --block`` in a process group of its own, stopped with its group (``ray
    stop`` would stop every Ray on the machine)."""

    def __init__(self, log: Path, env: dict[str, str], *flags: str) -> None:
        self._log = open(log, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [str(RAY_BIN), "start", "--block", "--disable-usage-stats", "--num-cpus", "1",
             "--node-ip-address", "127.0.0.1", *flags],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A head and a worker of one CPU each, with a token of their own, shared by the
    module's runs (a run on a cluster whose workers are up starts in seconds, not half a
    minute); yields the head's address and the environment a client needs to join."""
    require_ray()
    tmp_path = tmp_path_factory.mktemp("cluster")
    token = tmp_path / "token"
    token.write_text(uuid.uuid4().hex)
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    port = free_port()
    temp = Path(f"/tmp/bs-ray-{uuid.uuid4().hex[:8]}")  # unix sockets: keep the path short
    head = RayNode(
        tmp_path / "head.log", env, "--head", "--port", str(port), "--temp-dir", str(temp),
        "--include-dashboard", "false",
    )  # fmt: skip
    nodes = [head]
    try:
        wait_for_nodes(f"127.0.0.1:{port}", env, 1)
        nodes.append(RayNode(tmp_path / "worker.log", env, "--address", f"127.0.0.1:{port}"))
        wait_for_nodes(f"127.0.0.1:{port}", env, 2)
        yield f"127.0.0.1:{port}", env
    finally:
        for node in reversed(nodes):
            node.stop()
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def wait_for_nodes(address: str, env: dict[str, str], count: int) -> None:
    probe = (
        "import ray, sys, time\n"
        "for _ in range(60):\n"
        "    try:\n"
        f"        ray.init(address={address!r}, logging_level='error')\n"
        f"        if sum(n['Alive'] for n in ray.nodes()) >= {count}:\n"
        "            sys.exit(0)\n"
        "        ray.shutdown()\n"
        "    except ConnectionError:\n"
        "        pass\n"
        "    time.sleep(1)\n"
        "sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, (
        f"the Ray cluster did not get {count} nodes: {done.stderr[-2000:]!r}"
    )


@pytest.fixture(scope="module")
def local(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Indexed:
    return run_index(photos, tmp_path_factory.mktemp("local") / "data")


def test_ray_indexes_a_folder_as_the_local_engine_does_and_resumes(
    photos: Path, local: Indexed, ray_home: dict[str, str], tmp_path: Path
) -> None:
    """Both runs start a Ray of their own (2 CPUs): the only test that does, and the first,
    before the module's cluster is up (a run without an address would join it)."""
    parquet, report = tmp_path / "embeddings.parquet", tmp_path / "report.json"
    ray = run_index(
        photos, tmp_path / "data", "--engine", "ray", "--ray-cpus", "2", "--output", str(parquet),
        "--report", str(report), env=ray_home,
    )  # fmt: skip
    written_report = json.loads(report.read_text())
    assert (written_report["indexed"], written_report["skipped"], written_report["nodes"]) == (
        16,
        0,
        1,
    )
    assert [f["path"] for f in written_report["failed"]] == [str(photos / "whole" / "broken.jpg")]
    assert set(written_report["stage_s"]) == {"read+decode", "embed", "write", "index"}
    assert local.returncode == ray.returncode == 1, ray.stderr  # the corrupt file
    assert len(ray.items) == 16
    assert_same_items(ray, local)
    assert "indexed 16 images" in ray.stderr and "1 failed" in ray.stderr
    assert (
        failures(ray)
        == failures(local)
        == [f"{photos / 'whole' / 'broken.jpg'}: cannot read image header: Truncated File Read"]
    )
    assert "busy time per stage" in ray.stderr and "embed" in ray.stderr
    assert "MapBatches(decode_rows)" in ray.stderr  # Ray's own progress, decode its own stage
    table = pq.read_table(parquet)
    assert table.column_names == ["id", "label", "metadata", "class", "embedding"]
    written = dict(zip(table["id"].to_pylist(), table["embedding"].to_pylist(), strict=True))
    assert sorted(written) == sorted(ray.items)
    assert all(np.allclose(written[i], ray.items[i][0]) for i in written)

    edited = Path(shutil.copytree(photos, tmp_path / "edited"))  # same ids, one file changed
    Image.new("RGB", (64, 48), (200, 30, 30)).save(edited / "cropped" / "0.jpg", "JPEG")
    again = run_index(edited, tmp_path / "data", "--engine", "ray", "--ray-cpus", "2", env=ray_home)
    assert "indexed 1 images" in again.stderr and "15 already present" in again.stderr
    assert float(again.items["cropped/0.jpg"][0] @ ray.items["cropped/0.jpg"][0]) < 0.99
    assert {k: v[0].tobytes() for k, v in again.items.items() if k != "cropped/0.jpg"} == {
        k: v[0].tobytes() for k, v in ray.items.items() if k != "cropped/0.jpg"
    }


def test_ray_indexes_a_parquet_manifest_with_ids_labels_and_metadata(
    photos: Path, local: Indexed, cluster: Cluster, tmp_path: Path
) -> None:
    paths = sorted(p for p in photos.rglob("*.jpg") if p.name != "broken.jpg")
    manifest = photos / "manifest.parquet"
    pq.write_table(
        pa.table(
            {
                "path": [p.relative_to(photos).as_posix() for p in paths],
                "id": [f"sku-{n}" for n in range(len(paths))],
                "label": ["catalogue"] * len(paths),
                "metadata": [json.dumps({"n": n}) for n in range(len(paths))],
            }
        ),
        manifest,
    )
    ray = run_index(manifest, tmp_path / "data", *on(cluster), env=cluster[1])
    assert ray.returncode == 0, ray.stderr
    for n, path in enumerate(paths):
        vector, label, _class, metadata = ray.items[f"sku-{n}"]
        reference = local.items[path.relative_to(photos).as_posix()][0]
        assert float(vector @ reference) >= 0.9999
        assert (label, metadata) == ("catalogue", {"n": n})


def test_ray_refuses_a_data_dir_of_another_model(
    photos: Path, cluster: Cluster, tmp_path: Path
) -> None:
    catalog = SqliteCatalog(tmp_path / "data" / "catalog.sqlite3", 1280)
    catalog.check_model({"name": "another-model", "weights_sha256": "0" * 64, "dim": 1280})
    catalog.close()
    ray = run_index(photos, tmp_path / "data", *on(cluster), env=cluster[1])
    assert ray.returncode == 2, ray.stderr
    assert "holds embeddings of model another-model" in ray.stderr
    assert ray.items == {}


def test_a_two_node_cluster_shares_the_job_and_gets_the_same_result(
    photos: Path, local: Indexed, cluster: Cluster, tmp_path: Path
) -> None:
    address, env = cluster
    ray = run_index(photos, tmp_path / "data", *on(cluster), env=env)
    assert ray.returncode == 1, ray.stderr
    assert "busy time per stage on 2 nodes" in ray.stderr
    assert_same_items(ray, local)

    without_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    without_token["HOME"] = str(tmp_path / "elsewhere")  # no ~/.ray/auth_token either
    refused = run_index(
        photos, tmp_path / "other", "--engine", "ray", "--ray-address", address, env=without_token
    )
    assert refused.returncode == 2 and f"cannot reach Ray at '{address}'" in refused.stderr
    assert "RAY_AUTH_TOKEN" in refused.stderr


def catalog_rows(url: str) -> dict[str, tuple[np.ndarray, str | None]]:
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, embedding, label FROM items").fetchall()
    return {r[0]: (np.frombuffer(r[1], dtype=np.float32), r[2]) for r in rows}


def catalog_thumbnails(url: str) -> dict[str, bytes | None]:
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT items.id, thumbnails.jpeg FROM items "
            "LEFT JOIN thumbnails ON thumbnails.fid = items.fid"
        ).fetchall()
    return {r[0]: None if r[1] is None else bytes(r[1]) for r in rows}


def test_ray_writes_a_postgresql_catalog_from_parallel_writers(
    photos: Path,
    local: Indexed,
    cluster: Cluster,
    postgres: PostgresCluster,
    tmp_path: Path,
) -> None:
    url = postgres.create_database()
    flags = (*on(cluster), "--catalog", url)
    ray = run_index(photos, tmp_path / "data", *flags, env=cluster[1])
    assert ray.returncode == 1 and "indexed 16 images" in ray.stderr, ray.stderr
    stored = catalog_rows(url)
    assert sorted(stored) == sorted(local.items)
    for item_id, (vector, label) in stored.items():
        assert (
            float(vector @ local.items[item_id][0]) >= 0.9999 and label == local.items[item_id][1]
        )
    assert catalog_thumbnails(url) == local.thumbnails
    assert "MapBatches(WriteRows)" in ray.stderr  # the writers, a stage of their own
    assert list((tmp_path / "data" / "snapshots").iterdir())  # the index, built and published

    again = run_index(photos, tmp_path / "data", *flags, env=cluster[1])
    assert "indexed 0 images" in again.stderr and "16 already present" in again.stderr


def test_ray_with_crop_views_writes_the_views_the_local_engine_writes(
    photos: Path,
    cluster: Cluster,
    postgres: PostgresCluster,
    tmp_path: Path,
) -> None:
    """``--crop-views`` on both engines: each item's catalog row holds its embedding and its
    five crop views' (6 x 1280), the same from Ray's parallel PostgreSQL writers as from
    the local engine."""
    local = run_index(photos, tmp_path / "local", "--crop-views")
    assert local.returncode == 1 and "indexed 16 images" in local.stderr, local.stderr
    url = postgres.create_database()
    flags = (*on(cluster), "--catalog", url, "--crop-views")
    ray = run_index(photos, tmp_path / "data", *flags, env=cluster[1])
    assert ray.returncode == 1 and "indexed 16 images" in ray.stderr, ray.stderr
    stored = catalog_rows(url)
    assert sorted(stored) == sorted(local.items)
    for item_id, (vectors, _label) in stored.items():
        views, reference = vectors.reshape(6, 1280), local.items[item_id][0].reshape(6, 1280)
        assert np.einsum("vd,vd->v", views, reference).min() >= 0.9999, item_id
        assert float((views[1:] @ views[0]).max()) < 0.9999  # the crops are not the whole
