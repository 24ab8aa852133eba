"""A tiny, download-free Llama model directory for running real vLLM in tests.

vLLM needs a model directory even when it never reads any weights:
``load_format="dummy"`` fills the parameters with (deterministic) random
values, so a directory that holds only ``config.json`` is enough for an engine
fed token-id prompts with ``skip_tokenizer_init=True``.  Text prompts and the
OpenAI-compatible server also need a tokenizer next to the config; this module
builds one offline (no Hugging Face Hub access) from a fixed corpus.

Typical use::

    import os, tempfile
    from vllm_custom_patches.testing import ENGINE_ENV, ENGINE_KWARGS, write_tiny_model

    tmp = tempfile.mkdtemp()
    os.environ.update(ENGINE_ENV)
    # Keep vLLM's compile/cache files out of ~/.cache/vllm:
    os.environ["VLLM_CACHE_ROOT"] = os.path.join(tmp, "vllm-cache")
    model_dir = write_tiny_model(os.path.join(tmp, "model"))
    llm = vllm.LLM(model=str(model_dir), **ENGINE_KWARGS)

The multiprocess engine (the default) starts its EngineCore and worker with
``spawn``: a script that starts one needs an ``if __name__ == "__main__":``
guard, and its module-level code runs again in each child (so create temp
directories and model files inside the guarded code, not at module level).

Everything written here is deterministic: the same call writes byte-identical
files every time (for a given ``tokenizers`` version, which owns the
``tokenizer.json`` format), so patched and unpatched runs can be compared
token for token.

Only the standard library is imported at module level; ``tokenizers`` is
imported lazily, and only when a tokenizer is requested, so this module can be
imported where vLLM and its dependencies are not installed.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
from collections import Counter
from typing import Any, Final

__all__ = [
    "ENGINE_ENV",
    "ENGINE_KWARGS",
    "VOCAB_SIZE",
    "write_tiny_model",
]

#: Vocabulary size of the model; the tokenizer is padded to exactly this many
#: tokens so that every id the (random) model can emit decodes to some text.
VOCAB_SIZE: Final[int] = 1000

#: Longest sequence the model config allows.  ``ENGINE_KWARGS`` caps vLLM's
#: ``max_model_len`` lower (128) to keep the KV cache and warm-up small.
MAX_POSITION_EMBEDDINGS: Final[int] = 256

#: Keyword arguments for ``vllm.LLM`` / ``EngineArgs`` that run the tiny model
#: on a CPU-only machine:
#:
#: - ``load_format="dummy"``: random weights, nothing to download or read;
#: - ``max_model_len=128``: small KV-cache blocks and fast profiling;
#: - ``enforce_eager=True``: skip graph capture / torch.compile, which costs
#:   tens of seconds on 2 cores and buys nothing for a 2-layer model;
#: - ``dtype="float32"``: the CPU kernels' safest dtype, and the model's own.
#:
#: The server equivalent is ``--load-format dummy --max-model-len 128
#: --enforce-eager --dtype float32``.
ENGINE_KWARGS: Final[dict[str, Any]] = {
    "load_format": "dummy",
    "max_model_len": 128,
    "enforce_eager": True,
    "dtype": "float32",
}

#: Environment variables for processes that start the engine.
#:
#: ``VLLM_CPU_KVCACHE_SPACE`` is the KV cache size in GiB; vLLM's CPU default
#: reserves far more memory than a 2-layer model needs.
#:
#: Paths are per run, so they are not set here; point them at a temporary
#: directory yourself:
#:
#: - ``VLLM_CACHE_ROOT``: otherwise vLLM writes under ``~/.cache/vllm``;
#: - ``VLLM_RPC_BASE_PATH`` (optional): where the multiprocess engine creates
#:   its ZMQ IPC socket files (default ``tempfile.gettempdir()``); vLLM leaves
#:   a few behind in it after every engine.  They are Unix sockets named
#:   ``<dir>/<uuid4>``, so keep the directory path under about 70 characters.
#:
#: Set these in ``os.environ`` before the engine starts, so that the spawned
#: EngineCore and worker processes inherit them.
ENGINE_ENV: Final[dict[str, str]] = {"VLLM_CPU_KVCACHE_SPACE": "1"}

# Special tokens, at the ids Llama tokenizers use (config.json names 1 and 2
# as bos/eos, and vLLM stops generation at eos unless told otherwise).
_UNK, _BOS, _EOS = "<unk>", "<s>", "</s>"
_SPECIAL_TOKENS: Final[tuple[str, ...]] = (_UNK, _BOS, _EOS)

# A fixed corpus the BPE merges are learned from.  Its content only needs to
# give common English pieces; changing it changes every token id.
_CORPUS: Final[tuple[str, ...]] = (
    "Hello, my name is Tiny Llama and I am a very small language model.",
    "The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Once upon a time there was a little model that could only say a few words.",
    "What is the future of artificial intelligence? Nobody knows for sure.",
    "A scheduler decides which requests run next, and in what order they run.",
    "Patches change the behaviour of a program while it is running.",
    "The user asked a question and the assistant gave a short answer.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025 2026",
    "Please write a story about a cat, a dog and a bird in the garden.",
    "It was the best of times, it was the worst of times.",
)

# Jinja chat template: one line per message, then the assistant's prefix when
# a generation prompt is requested.  Simple, but enough for
# /v1/chat/completions, which refuses to run without any template.
_CHAT_TEMPLATE: Final[str] = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _config() -> dict[str, Any]:
    """Return the Hugging Face ``config.json`` contents of the tiny Llama."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        # Stated explicitly (128 / 2 = 64 anyway): the CPU attention kernels
        # support only some head sizes; 64 works, 16 fails with
        # "Unsupported CPU attention configuration".
        "head_dim": 64,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        # ``rope_theta`` (not transformers 5's ``rope_parameters``): both
        # transformers 4 and 5 read it.
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        # Older readers look at ``torch_dtype``, transformers 5 at ``dtype``.
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": True,
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet).

    Byte-level BPE works on these 256 characters so that any input byte, and
    hence any text, can be encoded without ``<unk>``.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


# Approximates the GPT-2 pre-tokenizer regex (which the ``tokenizers``
# ByteLevel pre-tokenizer applies at encode time) with the standard ``re``
# module.  Only used to count pairs for training, so an approximation merely
# changes which merges are learned, never correctness.
_PRETOKENIZE = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")


def _learn_bpe(n_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn up to ``n_merges`` byte-level BPE merges from ``_CORPUS``.

    Returns ``(alphabet, merges)``.  Written in plain Python rather than with
    ``tokenizers.trainers.BpeTrainer`` so that the result cannot depend on
    the trainer's tie-breaking, threading or version: ties between equally
    frequent pairs are broken by the pair itself (smallest first).
    """
    table = _bytes_to_unicode()
    alphabet = [table[b] for b in range(256)]
    word_counts: Counter[tuple[str, ...]] = Counter()
    for line in _CORPUS:
        for piece in _PRETOKENIZE.findall(line):
            word_counts[tuple(table[b] for b in piece.encode("utf-8"))] += 1
    words = dict(sorted(word_counts.items()))
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break  # Merging singletons only memorises the corpus.
        merges.append(best)
        joined = best[0] + best[1]
        new_words: dict[tuple[str, ...], int] = {}
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            key = tuple(out)
            new_words[key] = new_words.get(key, 0) + count
        words = new_words
    return alphabet, merges


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build the full 1000-entry vocabulary and its merge list.

    Ids: specials (0-2), the 256 byte characters, one token per learned
    merge, then filler tokens ``<extra_N>`` up to ``VOCAB_SIZE``.  The model
    has random weights and can emit any id below ``vocab_size``, so every id
    must exist for detokenization (and the server) not to fail.  Fillers are
    plain vocabulary entries (not special tokens), so they decode as text
    even with ``skip_special_tokens=True``; no merge produces them, so
    encoding never yields them.
    """
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    alphabet, merges = _learn_bpe(VOCAB_SIZE - len(vocab) - 256)
    for tok in alphabet:
        vocab[tok] = len(vocab)
    kept: list[tuple[str, str]] = []
    for left, right in merges:
        joined = left + right
        if joined not in vocab:
            vocab[joined] = len(vocab)
        kept.append((left, right))
    n = 0
    while len(vocab) < VOCAB_SIZE:
        filler = f"<extra_{n}>"
        n += 1
        if filler not in vocab:
            vocab[filler] = len(vocab)
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    return vocab, kept


def _write_tokenizer(directory: pathlib.Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``.

    Needs the ``tokenizers`` package (a dependency of ``transformers`` and
    hence of vLLM); it owns the ``tokenizer.json`` format, so the file is
    built through its API rather than by hand.
    """
    try:
        from tokenizers import (  # type: ignore[import-not-found,unused-ignore]
            Tokenizer,
            decoders,
            models,
            pre_tokenizers,
            processors,
        )
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "write_tiny_model(tokenizer=True) needs the 'tokenizers' package; "
            "install it or pass tokenizer=False (then use skip_tokenizer_init=True "
            "and token-id prompts)"
        ) from exc

    vocab, merges = _vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=_UNK))
    # Byte-level pre-tokenization/decoding (as GPT-2): any text encodes, and
    # decode(encode(text)) == text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Prepend <s> as Llama tokenizers do, so prompts look like real ones.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A",
        pair=f"{_BOS} $A {_BOS} $B",
        special_tokens=[(_BOS, vocab[_BOS])],
    )
    tok.add_special_tokens(list(_SPECIAL_TOKENS))  # Already in vocab: ids kept.
    tok.save(str(directory / "tokenizer.json"), pretty=True)

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": _UNK,
        "bos_token": _BOS,
        "eos_token": _EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "chat_template": _CHAT_TEMPLATE,
    }
    _write_json(directory / "tokenizer_config.json", tokenizer_config)


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    """Write ``data`` as stable, human-readable JSON (sorted keys, LF ending)."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def write_tiny_model(directory: str | os.PathLike[str], *, tokenizer: bool = True) -> pathlib.Path:
    """Write the tiny Llama model directory and return its path.

    Args:
        directory: Where to write; created (with parents) if missing.
            Existing files of the same names are overwritten.
        tokenizer: Also write an offline-built byte-level BPE tokenizer
            (``tokenizer.json`` + ``tokenizer_config.json``, loadable by
            ``transformers.AutoTokenizer``).  Needed for text prompts and the
            OpenAI server; not needed with ``skip_tokenizer_init=True`` and
            token-id prompts.  Requires the ``tokenizers`` package.

    Returns:
        The directory as a :class:`pathlib.Path`; pass ``str(path)`` as
        vLLM's ``model`` (with ``ENGINE_KWARGS``, notably
        ``load_format="dummy"``: there are no weight files).
    """
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "config.json", _config())
    if tokenizer:
        _write_tokenizer(path)
    return path
