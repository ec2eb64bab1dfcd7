"""Split a reasoning model's output into `reasoning_content` (inside <think>…</think>) and `content` (the rest).

Follows the cases of vLLM's `deepseek_r1` reasoning parser (vllm/reasoning/deepseek_r1_reasoning_parser.py and
its tests), because R1-style chat templates end the generation prompt with `<think>\\n`: the model's output then
starts INSIDE the think block and usually holds only the closing tag.

- "abc</think>xyz"          -> reasoning "abc", content "xyz"     (no opening tag: the start is reasoning)
- "<think>abc</think>xyz"   -> reasoning "abc", content "xyz"
- "abc" / "<think>abc"      -> reasoning "abc", content None      (never closed: all of it is reasoning)
- "</think>xyz"             -> reasoning "", content "xyz"        (streaming: reasoning None)
- "abc</think>"             -> reasoning "abc", content None
- ""                        -> reasoning "", content None         (streaming: both None)
- "\\n<think>abc</think>\\nxyz" -> reasoning "abc", content "\\nxyz"  (streaming keeps the leading "\\n" as reasoning,
  since a stream cannot know whether text before a late <think> is reasoning; vLLM does the same)

The streaming parser works on text deltas and holds back a tail that could be the start of a tag split over two
deltas, so the tags never leak into either field whatever the chunking.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """Non-streaming split: (reasoning_content, content)."""
    start, end = text.find(THINK_START), text.find(THINK_END)
    if start != -1 and (end == -1 or start < end):
        # Drop the opening tag and anything before it. (vLLM partitions on the first <think> anywhere, even one
        # inside the answer after </think>; we only treat it as the opening tag when it comes before the end tag.)
        text = text[start + len(THINK_START) :]
    if THINK_END not in text:
        return text, None
    reasoning, _, content = text.partition(THINK_END)
    return reasoning, content or None


def _partial_tag_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags` (0 if none)."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


class ReasoningStream:
    """Streaming split: feed text deltas, get (reasoning_delta, content_delta) pairs; None means nothing new."""

    def __init__(self):
        self.seen_start = False
        self.seen_end = False
        self._held = ""  # tail that may be the beginning of a tag

    def feed(self, delta: str) -> tuple[str | None, str | None]:
        text, self._held = self._held + delta, ""
        if self.seen_end:
            return None, text or None
        reasoning = ""
        while True:
            end = text.find(THINK_END)
            start = -1 if self.seen_start else text.find(THINK_START)
            if start != -1 and (end == -1 or start < end):
                # An opening tag inside the reasoning region is dropped (only the first one, as vLLM does).
                reasoning += text[:start]
                text = text[start + len(THINK_START) :]
                self.seen_start = True
                continue
            if end != -1:
                self.seen_end = True
                return reasoning + text[:end] or None, text[end + len(THINK_END) :] or None
            tags = (THINK_END,) if self.seen_start else (THINK_END, THINK_START)
            k = _partial_tag_suffix(text, tags)
            if k:
                text, self._held = text[:-k], text[-k:]
            return reasoning + text or None, None

    def flush(self) -> tuple[str | None, str | None]:
        """End of output: a held-back partial tag was just text after all."""
        held, self._held = self._held, ""
        if not held:
            return None, None
        return (None, held) if self.seen_end else (held, None)


def reasoning_token_count(token_ids: list[int], think_end_id: int | None, text_reasoning: str | None) -> int:
    """Tokens spent thinking: everything up to and including the closing tag; all of them if it never closed.

    Without a single-token `</think>` id we fall back to "all or nothing" from the text split."""
    if think_end_id is not None:
        if think_end_id in token_ids:
            return token_ids.index(think_end_id) + 1
        return len(token_ids)
    return len(token_ids) if text_reasoning else 0
