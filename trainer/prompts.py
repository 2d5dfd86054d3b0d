"""The system prompt and the chat layout of every rollout (shared by the tokenizer, data and rewards).

The layout is the reference recipe's: the model reasons inside <think>...</think>, then writes the final
number inside <answer>...</answer> on the next line. The reward functions check this exact layout.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FORMAT_TAGS: tuple[str, ...] = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

SYSTEM_PROMPT = (
    "Solve the math problem. Reason step by step between <think> and </think>, "
    "then give only the final number between <answer> and </answer>, laid out as:\n"
    "<think>reasoning</think>\n<answer>number</answer>"
)


def chat_messages(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """One GSM8K question as a chat: the system prompt, then the user turn."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


def ideal_completion(reasoning: str, answer: str) -> str:
    """What a perfect completion looks like (used to build the tiny tokenizer's corpus and in tests)."""
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"
