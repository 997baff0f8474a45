"""Baseline (b): Flask + a compiled ``tf.function`` at batch 1 (batchserve's own model
code, without batching).

  gunicorn -w 2 -b 127.0.0.1:8091 bench.baselines.flask_function:app
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from flask import Flask, Response, request

from batchserve.models.loaders import load_model
from batchserve.models.spec import ModelSpec
from bench.baselines.common import answer, decode

model = load_model(ModelSpec(backend="tensorflow"))
model.predict(np.zeros((1, 160, 160, 3), dtype=np.uint8))  # compile before serving
app = Flask(__name__)


@app.post("/v1/embed")
def embed() -> Response:
    embedding = model.predict(decode(request.get_data())[None]).embeddings[0]
    return Response(answer(embedding), mimetype="application/json")


@app.get("/healthz")
def healthz() -> Response:
    return Response('{"status": "ok"}', mimetype="application/json")
