"""Baseline (a): Flask + ``model.predict`` on one image per request.

gunicorn -w 2 -b 127.0.0.1:8090 bench.baselines.flask_predict:app
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
from flask import Flask, Response, request

from batchserve.models.spec import builtin_model_path
from bench.baselines.common import answer, decode

_full = keras.models.load_model(builtin_model_path(), compile=False)
# The embedding: the pooled backbone, the input of the classifier's Dense layer.
model = keras.Model(_full.inputs, _full.layers[-1].input)
app = Flask(__name__)


@app.post("/v1/embed")
def embed() -> Response:
    pixels = decode(request.get_data()).astype("float32")
    x = keras.applications.mobilenet_v2.preprocess_input(pixels)[None]
    embedding = model.predict(x, verbose=0)[0]
    return Response(answer(embedding), mimetype="application/json")


@app.get("/healthz")
def healthz() -> Response:
    return Response('{"status": "ok"}', mimetype="application/json")
