"""Tokenizers: a HF tokenizer with its chat template, or a tiny one the project builds offline.

`load_tokenizer("Qwen/Qwen2.5-3B-Instruct")` (or a local folder) is transformers' AutoTokenizer.
`load_tokenizer("tiny")` is a byte-level BPE of ~350 tokens trained with `tokenizers` on text of the
built-in problem generator and the system prompt, with Qwen's special tokens and a chat template of the
same shape. Digits and the four format tags are single tokens and every word of the task is one token, so
a random-init model can learn the answer layout in a few dozen steps. Its alphabet is printable ASCII (the
task's text): anything else encodes to <unk>, a price worth paying for a small vocabulary. The build is
deterministic and cached under $GRPOCTL_CACHE_DIR (default ~/.cache/grpoctl)/tokenizers/tiny-<hash of
recipe and corpus>.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import string
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from trainer.prompts import FORMAT_TAGS, SYSTEM_PROMPT, chat_messages, ideal_completion

TINY = "tiny"
PAD, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
CHAT_SPECIALS: tuple[str, ...] = (PAD, IM_START, IM_END)
# Upper bound of the tiny vocab: 100 ASCII symbols + 4 specials + merges + 4 tags. BPE runs out of merges
# below it (~350, when every word of the task is one token); 3 x 128 rows suit TPU tiles.
TINY_VOCAB_SIZE = 384
_TINY_RECIPE = "tiny-bpe-v2"  # bump when the build below changes
_CORPUS_PROBLEMS_PER_LEVEL = 400

# Qwen2's chat layout: <|im_start|>role\ncontent<|im_end|>\n per turn, then "<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded (unknown folder, hub unreachable): one line, names the spec."""


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """"tiny" -> the cached tiny tokenizer; otherwise a local folder or hub id through AutoTokenizer."""
    if spec == TINY:
        return _load_folder(ensure_tiny_tokenizer(), spec)
    return _load_folder(spec, spec)


def _load_folder(path: str | Path, spec: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # OSError offline / unknown id, ValueError for broken folders
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE=1 and not in the local cache)" if offline and not Path(spec).exists() else ""
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise TokenizerError(f"tokenizer {spec}: cannot load{hint}: {first}") from err
    if tokenizer.chat_template is None:
        raise TokenizerError(f"tokenizer {spec}: has no chat template")
    return tokenizer


# --------------------------------------------------------------------------------------------- tiny build


def cache_root() -> Path:
    return Path(os.environ.get("GRPOCTL_CACHE_DIR") or Path.home() / ".cache" / "grpoctl")


def tiny_corpus() -> list[str]:
    """Training text: whole chats (system prompt, question, ideal completion) over every generator level."""
    from trainer.data import LEVELS, generate_problems

    texts = []
    for level in sorted(LEVELS):
        for problem in generate_problems("train", _CORPUS_PROBLEMS_PER_LEVEL, difficulty=level, seed=0):
            work, _, _ = problem.solution.rpartition("####")
            turns = [*chat_messages(problem.question),
                     {"role": "assistant", "content": ideal_completion(work.strip(), problem.answer)}]
            texts.append("".join(f"{IM_START}{t['role']}\n{t['content']}{IM_END}\n" for t in turns))
    return texts


def _corpus_pieces(texts: Iterable[str]) -> Iterable[str]:
    """The corpus without special tokens and tags: BPE must not spend merges on their pieces."""
    pattern = re.compile("|".join(re.escape(t) for t in (*CHAT_SPECIALS, *FORMAT_TAGS)))
    for text in texts:
        yield from (piece for piece in pattern.split(text) if piece)


def _ascii_alphabet() -> list[str]:
    """Printable ASCII (with newline and tab) in the byte-level symbols the BPE sees."""
    from tokenizers import pre_tokenizers

    to_symbols = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str
    return sorted({to_symbols(ch)[0][0] for ch in string.printable})


def build_tiny_tokenizer(texts: Sequence[str], vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE on `texts` (deterministic) and wrap it for transformers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
    # Digits split one by one before the byte-level split: every number is a sequence of digit tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(FORMAT_TAGS),
        special_tokens=[*CHAT_SPECIALS, UNK],
        initial_alphabet=_ascii_alphabet(),
        limit_alphabet=len(_ascii_alphabet()),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_pieces(texts), trainer=trainer)
    tok.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in FORMAT_TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def ensure_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """The folder of the tiny tokenizer, built on first use; safe when several processes race."""
    texts = tiny_corpus()
    digest = hashlib.sha256(f"{_TINY_RECIPE}:{vocab_size}\n".encode())
    for text in texts:
        digest.update(text.encode())
    folder = cache_root() / "tokenizers" / f"tiny-{digest.hexdigest()[:16]}"
    if (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        build_tiny_tokenizer(texts, vocab_size).save_pretrained(str(staging))
        try:
            staging.rename(folder)
        except OSError:  # another process finished first: its folder is the same build
            if not (folder / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# ------------------------------------------------------------------------------------------------ helpers


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], system_prompt: str = SYSTEM_PROMPT
) -> list[list[int]]:
    """Token ids of each question as a chat (system + user turn) ending with the assistant header."""
    chats = [chat_messages(q, system_prompt) for q in questions]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Ids that end a completion: end of turn, end of text and the tokenizer's eos."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in (IM_END, PAD) if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return stop_token_ids(tokenizer)[0]


def padded_vocab_size(tokenizer: PreTrainedTokenizerBase, multiple: int = 128) -> int:
    """Embedding rows for a model of this tokenizer: len(tokenizer) rounded up (TPU tiles, like Qwen's)."""
    return -(-len(tokenizer) // multiple) * multiple


def decode(
    tokenizer: PreTrainedTokenizerBase, ids: Iterable[int], stop_ids: Sequence[int] | None = None
) -> str:
    """Completion text: the ids up to the first stop token, special tokens dropped, tags kept."""
    stops = set(stop_token_ids(tokenizer) if stop_ids is None else stop_ids)
    kept = []
    for token in ids:
        token = int(token)
        if token in stops:
            break
        kept.append(token)
    return tokenizer.decode(kept, skip_special_tokens=True)


def decode_batch(tokenizer: PreTrainedTokenizerBase, batch: Iterable[Iterable[int]]) -> list[str]:
    stops = stop_token_ids(tokenizer)
    return [decode(tokenizer, ids, stops) for ids in batch]
