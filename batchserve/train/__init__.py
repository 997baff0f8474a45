"""Transfer learning for ``batchserve train``, installed with the ``train`` extra
(``pip install 'batchserve[train]'``, plus the ``cpu`` or ``gpu`` extra for TensorFlow).

``settings`` (the run's flags), ``dataset`` (class folders and the decoding pipeline),
``network`` (the Keras model trained), ``fit`` (the training loop and the export of
``MODEL_DIR``), ``evaluate`` (the validation set) and ``report`` (``report.json`` and the
plots). Serving never imports this package: what it reads back from ``MODEL_DIR`` is in
``batchserve.models.model_dir``. TensorFlow and matplotlib are imported only when a model is
built or a plot drawn.
"""

from batchserve.train.fit import train
from batchserve.train.settings import TrainSettings

__all__ = ["TrainSettings", "train"]
