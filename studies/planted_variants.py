"""The planted-token variants of held-out preference pairs (`studies/planted_tokens.py`): each has a known span.

Each answer is first cut after its last sentence end within a token budget ([`trim_answer`]); then, per kind:

- `filler`: a generic closing (one of FILLERS, by data row) appended to the rejected answer after a blank line;
- `swap`: the rejected answer is the chosen answer with one fact changed, so that the two differ only there: the
  first number (NUMBER; list markers such as `1.` and lines naming a confidence excepted) gets every digit
  d -> (d + 5) mod 10 (a leading 0 -> 9), or else the first entity of ENTITIES becomes the next one of its group
  (France -> Germany); when the held-out chosen answer has neither, its rejected answer is used. The span is on
  both sides (the original tokens in the chosen answer, the new ones in the rejected answer);
- `insert`: an off-topic sentence (one of IRRELEVANT, by data row) inserted into the chosen answer after the
  sentence end (`.`, `!`, `?` after a letter, then a space) nearest its middle.

The planted span is the completion tokens whose characters overlap the planted text, found with the tokenizer's
offsets on the chat template's text and checked against the trainer's tokenisation ([`span_positions`]).
"""

import re
from dataclasses import dataclass

from trl.data_utils import maybe_extract_prompt

from otpo_trl.tokenization import template_kwargs, tokenize_pair


KINDS = ("filler", "swap", "insert")
# Chosen before any result was seen; generic, on no pair's topic.
FILLERS = (
    "I hope this helps! Let me know if you have any other questions.",
    "Thank you for your question. Please feel free to reach out if you need anything else.",
    "Please note that this information is provided for general purposes only.",
    "Overall, there are many factors to consider, and every situation is different.",
)
IRRELEVANT = (
    "The Pacific Ocean is the largest and deepest of the oceans on our planet.",
    "Honeybees tell each other where flowers are with a waggle dance.",
    "Bamboo is one of the fastest-growing plants in the world.",
    "A violin usually has four strings tuned in perfect fifths.",
)
ENTITIES = (  # one group per line; "May" left out (also a verb)
    ("France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Canada", "Brazil", "Mexico", "Egypt"),
    ("Paris", "Berlin", "Rome", "Madrid", "Tokyo", "Beijing", "London", "Toronto", "Chicago", "Sydney", "Cairo"),
    ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    ("January", "February", "March", "April", "June", "July", "August", "September", "October", "November"),
    ("English", "French", "German", "Spanish", "Italian", "Chinese", "Japanese", "Russian"),
)
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w]|\.\d)")
LIST_MARKER = re.compile(r"(?m)^[ \t]*\d+[.)]")
CONFIDENCE = re.compile(r"(?im)^.*confidence.*$")  # UltraFeedback's "Confidence: 90%" lines: no fact of the answer
ENTITY = re.compile(r"\b(" + "|".join(name for group in ENTITIES for name in group) + r")\b")
SENTENCE_END = re.compile(r"(?<=[A-Za-z])[.!?](?=[ \t\n])")


# ------------------------------------------------------------------ the variants (pure string functions)


def trim_answer(answer: str, tokenizer, max_tokens: int) -> str | None:
    """`answer` without trailing space, cut after its last sentence end (or line end) within its first `max_tokens`
    tokens (tokenised alone) if it is longer; None if no such end exists."""
    answer = answer.rstrip()
    offsets = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= max_tokens:
        return answer
    head = answer[: offsets[max_tokens - 1][1]]
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)|(?=\n)", head)]
    cut = head[: ends[-1]].rstrip() if ends else ""
    return cut or None


def append_filler(answer: str, filler: str) -> tuple[str, tuple[int, int]]:
    """`answer` + a blank line + `filler`, and the characters planted (the blank line included)."""
    return f"{answer}\n\n{filler}", (len(answer), len(answer) + 2 + len(filler))


def shifted_digits(number: str) -> str:
    """Every digit d -> (d + 5) mod 10, a leading 0 -> 9: the same shape, every digit changed."""
    out = "".join(str((int(c) + 5) % 10) if c.isdigit() else c for c in number)
    return ("9" + out[1:]) if out[0] == "0" else out


def swap_fact(answer: str) -> tuple[str, tuple[int, int], tuple[int, int], str] | None:
    """The answer with its first number (not a list marker) changed, or else its first listed entity replaced by
    the next of its group. Returns (new answer, characters of the old text in `answer`, of the new text in the new
    answer, "old -> new"), or None when the answer has neither."""
    skip = {m.end() - 1 for m in LIST_MARKER.finditer(answer)}  # where a list marker's "." or ")" is
    skip |= {i for m in CONFIDENCE.finditer(answer) for i in range(m.start(), m.end() + 1)}
    number = next((m for m in NUMBER.finditer(answer) if m.end() not in skip), None)
    if number is not None:
        old, new = number.group(), shifted_digits(number.group())
        start = number.start()
    else:
        entity = ENTITY.search(answer)
        if entity is None:
            return None
        group = next(g for g in ENTITIES if entity.group() in g)
        old, new, start = entity.group(), group[(group.index(entity.group()) + 1) % len(group)], entity.start()
    text = answer[:start] + new + answer[start + len(old) :]
    return text, (start, start + len(old)), (start, start + len(new)), f"{old} -> {new}"


def insert_sentence(answer: str, sentence: str) -> tuple[str, tuple[int, int]] | None:
    """`answer` with " " + `sentence` after the sentence end nearest its middle, and the characters planted (the
    space included); None without a sentence end followed by more text."""
    ends = [m.end() for m in SENTENCE_END.finditer(answer)]
    if not ends:
        return None
    at = min(ends, key=lambda e: abs(e - len(answer) / 2))
    return answer[:at] + " " + sentence + answer[at:], (at, at + 1 + len(sentence))


@dataclass
class Variant:
    """One planted pair: `example` in TRL's conversational format (prompt, one assistant turn a side); `spans`
    {side: (start, end) characters of the planted text in that side's answer}; `positions` {side: the planted
    tokens' positions among the side's completion tokens}; `n_tokens` {side: completion tokens}."""

    kind: str
    row: int
    example: dict
    spans: dict
    planted: str
    positions: dict | None = None
    n_tokens: dict | None = None


def make_variant(kind: str, row: int, prompt: list, chosen: str, rejected: str) -> Variant | None:
    """The `kind` variant of a pair of (trimmed) answers, or None if the pair has no place for it."""
    if kind == "filler":
        filler = FILLERS[row % len(FILLERS)]
        rejected, span = append_filler(rejected, filler)
        spans, planted = {"rejected": span}, filler
    elif kind == "swap":  # the chosen answer's fact, else the rejected answer's (it is then the variant's chosen)
        source = "chosen" if swap_fact(chosen) else "rejected"
        chosen = chosen if source == "chosen" else rejected
        swapped = swap_fact(chosen)
        if swapped is None:
            return None
        rejected, old, new, planted = swapped
        planted += "" if source == "chosen" else " (in the held-out rejected answer)"
        spans = {"chosen": old, "rejected": new}
    else:
        sentence = IRRELEVANT[row % len(IRRELEVANT)]
        inserted = insert_sentence(chosen, sentence)
        if inserted is None:
            return None
        (chosen, span), planted = inserted, sentence
        spans = {"chosen": span}
    turn = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    return Variant(kind, row, {"prompt": prompt, "chosen": turn[0], "rejected": turn[1]}, spans, planted)


def span_positions(example: dict, side: str, span: tuple[int, int], tokenizer) -> list[int]:
    """The positions, among `side`'s completion tokens as the trainer sees them (`tokenize_pair`), of the tokens
    whose characters overlap `span` (characters of the side's answer), from the tokenizer's offsets on the chat
    template's text. ValueError if that text does not tokenise to the trainer's tokens."""
    ids = tokenize_pair(example, tokenizer)
    kwargs = template_kwargs(example)
    text = tokenizer.apply_chat_template(example["prompt"] + example[side], tokenize=False, **kwargs)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if encoded["input_ids"] != ids["prompt_ids"] + ids[f"{side}_ids"]:
        raise ValueError(f"the chat template's text does not tokenise to the trainer's {side} tokens")
    start = text.rfind(example[side][0]["content"])  # the answer is the last turn
    lo, hi = start + span[0], start + span[1]
    n_prompt = len(ids["prompt_ids"])
    return [k - n_prompt for k, (a, b) in enumerate(encoded["offset_mapping"]) if k >= n_prompt and a < hi and b > lo]


def build_variants(dataset, tokenizer, kind: str, n: int, *, max_length: int, answer_tokens: int) -> list[Variant]:
    """The first `n` pairs of `dataset` (in order) that have a `kind` variant fitting `max_length`, positions set."""
    out = []
    for row in range(len(dataset)):
        example = maybe_extract_prompt(dict(dataset[row]))
        answers = [trim_answer(example[s][-1]["content"], tokenizer, answer_tokens) for s in ("chosen", "rejected")]
        if None in answers or answers[0] == answers[1]:
            continue
        variant = make_variant(kind, row, example["prompt"], *answers)
        if variant is None:
            continue
        ids = tokenize_pair(variant.example, tokenizer)
        if len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])) > max_length:
            continue
        variant.positions = {
            s: span_positions(variant.example, s, span, tokenizer) for s, span in variant.spans.items()
        }
        variant.n_tokens = {s: len(ids[f"{s}_ids"]) for s in ("chosen", "rejected")}
        out.append(variant)
        if len(out) == n:
            break
    return out


__all__ = ["KINDS", "Variant", "build_variants", "make_variant", "span_positions", "swap_fact", "trim_answer"]
