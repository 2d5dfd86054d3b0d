"""The tiny offline tokenizer (deterministic, cached, Qwen-shaped chat) and the tokenizer helpers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainer.data import generate_problems
from trainer.prompts import FORMAT_TAGS, SYSTEM_PROMPT, ideal_completion
from trainer.tokenizer import (
    IM_END,
    IM_START,
    PAD,
    TINY_VOCAB_SIZE,
    TokenizerError,
    build_tiny_tokenizer,
    decode,
    decode_batch,
    encode_prompts,
    ensure_tiny_tokenizer,
    load_tokenizer,
    pad_token_id,
    padded_vocab_size,
    stop_token_ids,
    tiny_corpus,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("grpoctl-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRPOCTL_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny(cache_dir: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer("tiny")


def test_build_is_cached_on_disk(cache_dir: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    folder = ensure_tiny_tokenizer()
    assert folder.parent == cache_dir / "tokenizers" and folder.name.startswith("tiny-")
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    again = load_tokenizer("tiny")
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp  # a load, not a rebuild
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folders left behind
    by_path = load_tokenizer(str(folder))  # the cache folder is a plain HF tokenizer folder
    text = "<think>12 + 30 = 42</think>\n<answer>42</answer>"
    assert by_path(text)["input_ids"] == again(text)["input_ids"] == tiny(text)["input_ids"]


def test_build_is_deterministic(tiny) -> None:  # type: ignore[no-untyped-def]
    """Every host of a multi-host run builds its own copy: builds must be byte-identical. (Each build
    hashes with fresh random keys inside `tokenizers`, so two builds here exercise the same freedom as
    two processes.)"""
    cached = (ensure_tiny_tokenizer() / "tokenizer.json").read_text()
    texts = tiny_corpus()
    first, second = (build_tiny_tokenizer(texts).backend_tokenizer.to_str() for _ in range(2))
    assert first == second
    rebuilt = json.loads(first)
    assert rebuilt["model"]["vocab"] == json.loads(cached)["model"]["vocab"]
    assert rebuilt["model"]["merges"] == json.loads(cached)["model"]["merges"]


def test_vocab_is_small_and_specials_tags_digits_are_single_tokens(tiny) -> None:  # type: ignore[no-untyped-def]
    assert 300 < len(tiny) <= TINY_VOCAB_SIZE == padded_vocab_size(tiny) == 384
    for token in (PAD, IM_START, IM_END, *FORMAT_TAGS):
        ids = tiny(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tiny.convert_ids_to_tokens(ids[0]) == token
    ids = tiny("9081726354", add_special_tokens=False)["input_ids"]
    assert [tiny.decode([i]) for i in ids] == list("9081726354")
    assert tiny.pad_token == PAD and tiny.eos_token == IM_END
    end, pad = tiny.convert_tokens_to_ids(IM_END), tiny.convert_tokens_to_ids(PAD)
    assert stop_token_ids(tiny) == tuple(sorted({end, pad}))
    assert pad_token_id(tiny) == tiny.convert_tokens_to_ids(PAD)


def test_chat_template_has_qwen_shape(tiny) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    prompt = tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    without = tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == prompt.removesuffix("<|im_start|>assistant\n")


def test_encode_prompts_uses_system_prompt_and_ends_with_assistant_header(tiny) -> None:  # type: ignore[no-untyped-def]
    questions = [p.question for p in generate_problems("test", 4, difficulty=1)]
    encoded = encode_prompts(tiny, questions)
    header = tiny("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for question, ids in zip(questions, encoded, strict=True):
        text = tiny.decode(ids)
        assert text == f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n{question}{IM_END}\n" \
            f"{IM_START}assistant\n"
        assert ids[-len(header):] == header
        assert len(ids) < 100  # words of the task are whole tokens: prompts stay short for the tiny model


@pytest.mark.parametrize("text", [
    ideal_completion("3 + 4 = 7", "7"),
    "There are 956 shells in Ben's bag.\nBen gives away 870 shells.",
    "  leading spaces, tabs\tand\n\nnewlines  ",
    "unseen words: zebra quartz; $1,234.50 and -3/4 ~ {x} | 100%",
    "",
])
def test_round_trip(tiny, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tiny(text, add_special_tokens=False)["input_ids"]
    assert decode(tiny, ids) == text


def test_text_outside_ascii_becomes_unk(tiny) -> None:  # type: ignore[no-untyped-def]
    ids = tiny("héllo 😀!", add_special_tokens=False)["input_ids"]
    assert tiny.decode(ids) == "h<unk>llo <unk>!"  # one <unk> per run of unknown bytes
    assert decode(tiny, ids) == "hllo !"  # completions drop special tokens


def test_decode_stops_at_end_of_turn_and_drops_padding(tiny) -> None:  # type: ignore[no-untyped-def]
    body = tiny(ideal_completion("2 + 2 = 4", "4"), add_special_tokens=False)["input_ids"]
    end, pad = tiny.convert_tokens_to_ids(IM_END), tiny.convert_tokens_to_ids(PAD)
    garbage = tiny("<answer>9</answer>", add_special_tokens=False)["input_ids"]
    assert decode(tiny, [*body, end, *garbage, pad, pad]) == ideal_completion("2 + 2 = 4", "4")
    batch = decode_batch(tiny, [[*body, pad, pad], [end, *body], []])
    assert batch == [ideal_completion("2 + 2 = 4", "4"), "", ""]
    # A model's table is padded past the tokenizer (padded_vocab_size): such ids decode to nothing.
    assert decode(tiny, [*body, len(tiny), padded_vocab_size(tiny) - 1]) == ideal_completion("2 + 2 = 4", "4")


def test_unknown_hub_id_offline_fails_fast_with_one_line(cache_dir: Path) -> None:
    # Fast because offline mode is on (the message says so): online, the hub client retries for ~50 s.
    with pytest.raises(TokenizerError) as err:
        load_tokenizer("grpoctl-test/no-such-model")
    message = str(err.value)
    assert "\n" not in message and message.startswith("tokenizer grpoctl-test/no-such-model: cannot load")
    assert "HF_HUB_OFFLINE=1" in message
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(str(cache_dir / "no-such-folder"))
