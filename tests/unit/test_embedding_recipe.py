"""How an embedding is made (pooling, fit, border trimming) is part of the model: it is in
the fingerprint, and a catalog made another way is refused with what to do about it."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchserve.models.spec import (
    LEGACY_EMBEDDING,
    ModelInfo,
    ModelSpec,
    embedding_recipe,
    recipe_flags,
)
from batchserve.storage.catalog import ModelMismatch
from batchserve.storage.sqlite import SqliteCatalog

MODEL = {"name": "m", "weights_sha256": "a" * 64, "dim": 8}


def info(embedding: dict[str, object]) -> ModelInfo:
    return ModelInfo("m", "m", (32, 32), 8, weights_sha256="a" * 64, embedding=embedding)


def test_the_default_recipe_is_gem_and_trimmed_borders() -> None:
    recipe = embedding_recipe(ModelSpec(), pools_map=True)
    assert recipe == {"pooling": "gem-3", "fit": "squash", "trim_borders": True}
    assert not info(recipe).letterbox and info(recipe).trim_borders
    assert info(recipe).fingerprint() == {**MODEL, "embedding": recipe}


def test_a_model_whose_output_is_the_embedding_is_not_pooled() -> None:
    assert embedding_recipe(ModelSpec(), pools_map=False)["pooling"] == "model"
    assert embedding_recipe(ModelSpec(pooling="avg"), pools_map=True)["pooling"] == "avg"
    assert embedding_recipe(ModelSpec(gem_p=1.0), pools_map=True)["pooling"] == "avg"


def test_the_flags_of_a_recipe_make_that_recipe_again() -> None:
    assert recipe_flags(LEGACY_EMBEDDING) == (
        "--pooling avg --fit squash --no-trim-borders --no-crop-views --no-grey-view"
    )
    recipe = {"pooling": "gem-4", "fit": "letterbox", "trim_borders": True}
    assert recipe_flags(recipe) == (
        "--pooling gem --gem-p 4 --fit letterbox --trim-borders --no-crop-views --no-grey-view"
    )
    spec = ModelSpec(pooling="gem", gem_p=4.0, fit="letterbox", trim_borders=True)
    assert embedding_recipe(spec, pools_map=True) == recipe
    views = embedding_recipe(ModelSpec(crop_views=True, grey_view=True), pools_map=True)
    assert recipe_flags(views).endswith("--trim-borders --crop-views --grey-view")


def test_item_views_are_in_the_fingerprint_only_when_on() -> None:
    recipe = embedding_recipe(ModelSpec(crop_views=True), pools_map=True)
    assert recipe["views"] == {"crops": 5, "side": 0.7}
    assert info(recipe).views == 5
    grey = embedding_recipe(ModelSpec(crop_views=True, grey_view=True), pools_map=True)
    assert grey["views"] == {"crops": 5, "side": 0.7, "grey": True} and info(grey).views == 6
    assert embedding_recipe(ModelSpec(grey_view=True), pools_map=True)["views"] == {"grey": True}
    assert "views" not in embedding_recipe(ModelSpec(), pools_map=True)
    assert info(embedding_recipe(ModelSpec(), pools_map=True)).views == 0


def catalog_of(path: Path, fingerprint: dict[str, object]) -> SqliteCatalog:
    catalog = SqliteCatalog(path / "catalog.sqlite3", 8)
    catalog.check_model(fingerprint)
    return catalog


def test_a_catalog_from_before_recipes_opens_with_the_old_recipe(tmp_path: Path) -> None:
    catalog_of(tmp_path, MODEL).close()  # stored with no "embedding": made the old way
    catalog = SqliteCatalog(tmp_path / "catalog.sqlite3", 8)
    catalog.check_model(info(dict(LEGACY_EMBEDDING)).fingerprint())  # --pooling avg ...
    catalog.close()


def test_a_catalog_made_another_way_is_refused_with_the_flags_and_the_rebuild(
    tmp_path: Path,
) -> None:
    catalog_of(tmp_path, MODEL).close()
    catalog = SqliteCatalog(tmp_path / "catalog.sqlite3", 8)
    new = info(embedding_recipe(ModelSpec(), pools_map=True)).fingerprint()
    with pytest.raises(ModelMismatch) as refused:
        catalog.check_model(new)
    message = str(refused.value)
    assert "made another way (pooling avg, fit squash, borders kept)" in message
    assert "(pooling gem-3, fit squash, borders trimmed)" in message
    assert "--pooling avg --fit squash --no-trim-borders" in message
    assert "batchserve index SOURCE --data-dir NEW_DIR" in message


def test_a_catalog_without_crop_views_is_refused_by_a_server_that_makes_them(
    tmp_path: Path,
) -> None:
    made = info(embedding_recipe(ModelSpec(), pools_map=True)).fingerprint()
    catalog_of(tmp_path, made).close()
    catalog = SqliteCatalog(tmp_path / "catalog.sqlite3", 8, views=5)
    with pytest.raises(ModelMismatch) as refused:
        catalog.check_model(info(embedding_recipe(ModelSpec(crop_views=True), True)).fingerprint())
    message = str(refused.value)
    assert (
        "than this server makes them (pooling gem-3, fit squash, borders trimmed, 5 crop "
        "views)" in message
    )
    assert "--trim-borders --no-crop-views --no-grey-view" in message


def test_a_catalog_of_another_model_is_refused_as_before(tmp_path: Path) -> None:
    catalog = catalog_of(tmp_path, MODEL)
    with pytest.raises(ModelMismatch, match=r"holds embeddings of model m .* not of other"):
        catalog.check_model({**MODEL, "name": "other"})
