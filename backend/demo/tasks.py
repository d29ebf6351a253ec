"""The demo's prompt format, character vocabulary and the tasks its adapters learn.

A prompt is ``"<instruction>: <payload>\\n"``; the model answers with the transformed payload
followed by the end-of-sequence token. The base model copies the payload whatever the
instruction says; each adapter applies its own transformation, also whatever the instruction
says, so that the wording only matters to the router that picks the adapter.

Payloads are lower-case words (``a``-``z``) separated by single spaces, at most
:data:`MAX_PAYLOAD` characters. Instructions are free text without ``:`` or newlines, at most
:data:`MAX_INSTRUCTION` characters.

This module needs no torch: the client, the router and the tests use it to render prompts and
check answers.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "BOS", "EOS", "PAD", "UNK", "SPECIAL_TOKENS", "CHARACTERS", "VOCAB", "MAX_PAYLOAD",
    "MAX_INSTRUCTION", "Task", "TASKS", "COPY", "render_prompt", "split_prompt",
    "random_payload", "random_instruction", "TRAIN_WORDS", "TEST_WORDS",
]

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Newline ends the prompt; then every printable ASCII character.
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}

MAX_PAYLOAD = 24
MAX_INSTRUCTION = 40
SEPARATOR = ": "


def render_prompt(instruction_text: str) -> str:
    """``"shout it: hello"`` → ``"shout it: hello\\n"``: the text the model completes."""
    return instruction_text.rstrip("\n") + "\n"


def split_prompt(instruction_text: str) -> tuple[str, str]:
    """Split ``"<instruction>: <payload>"`` at the first ``": "``; raise ValueError without one."""
    head, sep, payload = instruction_text.rstrip("\n").partition(SEPARATOR)
    if not sep:
        raise ValueError(f"prompt {instruction_text!r} has no {SEPARATOR!r} before its payload")
    return head, payload


def _json_summary(payload: str) -> str:
    words = payload.split()
    return json.dumps({"words": len(words), "first": words[0] if words else ""})


@dataclass(frozen=True)
class Task:
    """One behaviour: the adapter that learns it, how it maps a payload, how people ask for it."""

    name: str
    repo: str
    description: str
    transform: Callable[[str], str]
    # Natural instructions whose wording identifies the task (the router's training prompts).
    instructions: tuple[str, ...]
    # Other wordings kept out of the examples, for the held-out test pairs.
    test_instructions: tuple[str, ...]

    def answer(self, payload: str) -> str:
        return self.transform(payload)


COPY = Task(
    name="copy", repo="", description="The base model alone: repeats the text after the colon.",
    transform=lambda p: p,
    instructions=("repeat after me", "echo", "say it again", "copy this", "write exactly"),
    test_instructions=("Repeat this", "Echo back", "Please shout this", "Reverse this",
                       "Summarize as JSON", "tell me something"),
)

TASKS: dict[str, Task] = {t.name: t for t in (
    Task(
        name="shout", repo="demo/shout",
        description="Shouts: rewrites the text in upper-case letters.",
        transform=str.upper,
        instructions=(
            "make this uppercase", "shout it", "scream the following", "shout this out loud",
            "convert to capital letters", "upper case please", "write it in all caps",
            "say this loudly", "yell this", "capitalize every letter", "all caps",
            "turn this into uppercase", "shout", "make it loud", "caps lock this",
            "uppercase the text", "scream it", "in capital letters please",
            "write this in block capitals", "give me this in upper case",
        ),
        test_instructions=("Please shout this", "SHOUT this", "could you yell this",
                           "put this in caps", "make the text upper case"),
    ),
    Task(
        name="reverse", repo="demo/reverse",
        description="Reverses the text character by character.",
        transform=lambda p: p[::-1],
        instructions=(
            "reverse this", "spell it backwards", "write this backwards", "flip the letters",
            "mirror the text", "read it in reverse order", "reverse the characters",
            "backwards please", "turn this around", "invert the string",
            "write it from right to left", "reverse the text", "say it backwards",
            "flip it", "reverse the order of the letters", "mirror this",
            "backwards", "reverse it", "undo the order of characters",
            "write the letters in reverse",
        ),
        test_instructions=("Reverse this", "spell this backwards please", "flip this text",
                           "print it reversed", "read it backwards"),
    ),
    Task(
        name="json", repo="demo/json",
        description="Summarizes the text as JSON: its number of words and its first word.",
        transform=_json_summary,
        instructions=(
            "summarize as json", "give me a json summary", "json stats for",
            "count the words as json", "describe this in json", "word count and first word in json",
            "json summary", "summarise in json", "make a json record of", "return json for",
            "analyze as json", "json please", "count words and give json",
            "output a json object for", "summarize this text in json", "json report",
            "first word and word count as json", "json describe", "encode the summary as json",
            "produce json stats",
        ),
        test_instructions=("Summarize as JSON", "JSON summary please", "json stats of",
                           "give the word count in JSON", "report as json"),
    ),
    Task(
        name="label", repo="demo/label",
        description="Labels the text in a fixed format: LABEL: followed by its first word.",
        transform=lambda p: "LABEL: " + (p.split() or [""])[0],
        instructions=(
            "label this", "give it a label", "tag this text", "what is the label",
            "classify this", "assign a label to", "put a tag on", "label the following",
            "which label fits", "tag it", "add a label", "categorize this",
            "give this a tag", "label please", "what tag goes with", "apply a label",
            "mark this with a label", "tag the following text", "choose a label for",
            "label it",
        ),
        test_instructions=("Label", "Label this text", "please tag this", "give me a label for",
                           "tag"),
    ),
)}

# Common words; the two lists are disjoint so test payloads are held out from training.
TEST_WORDS = (
    "hello world good morning the quick brown fox jumps over lazy dog open hub for lora "
    "adapters cats like milk rain today sunny blue sky green tree small model big data "
    "router picks one tiny llama answer"
).split()
TRAIN_WORDS = tuple(w for w in (
    "time year people way day man thing woman life child school state family student group "
    "country problem hand part place case week company system program question work number "
    "night point home water room mother area money story fact month lot right study book eye "
    "job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information "
    "back parent face others level office door health person art war history party result "
    "change reason research girl guy moment air teacher force education foot boy age policy "
    "music market sense nation plan college interest death experience effect use class control "
    "care field development role effort rate heart drug show leader light voice wife police "
    "mind price report decision son view relationship town road arm difference value building "
    "action model season society tax director position player record paper space ground form "
    "event official matter center couple site project activity star table need court oil "
    "situation cost industry figure street image phone data picture practice piece land "
    "product doctor wall patient worker news test movie north love support technology step "
    "baby computer type attention film tree source organization hair window evidence "
    "population site red fish run walk jump play sing read write cook sleep swim"
).split() if w not in TEST_WORDS)


def _words_payload(rng: random.Random, words: tuple[str, ...] | list[str] | None) -> str:
    target = rng.randint(1, MAX_PAYLOAD)
    out: list[str] = []
    while True:
        if words is None:
            word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8)))
        else:
            word = rng.choice(words)
        candidate = " ".join([*out, word])
        if len(candidate) > MAX_PAYLOAD:
            break
        out.append(word)
        if len(candidate) >= target:
            break
    return " ".join(out) if out else rng.choice(string.ascii_lowercase)


def random_payload(rng: random.Random, *, held_out: bool = False) -> str:
    """A payload of 1..MAX_PAYLOAD characters: random letter strings or common words."""
    if held_out:
        return _words_payload(rng, TEST_WORDS)
    return _words_payload(rng, None if rng.random() < 0.6 else TRAIN_WORDS)


_FILLER = ("please", "now", "the", "text", "this", "for me", "kindly", "quickly", "ok", "hey")


def random_instruction(rng: random.Random, tasks: Sequence[str] | None = None) -> str:
    """Any instruction at all: a task's wording, filler words or random letters, any case.

    Half of them are the wordings of :data:`COPY` and of ``tasks`` (default: all tasks).
    """
    pick = rng.random()
    if pick < 0.5:
        chosen = [TASKS[n] for n in tasks] if tasks is not None else list(TASKS.values())
        pool = [i for t in (COPY, *chosen) for i in t.instructions]
        text = rng.choice(pool)
        if rng.random() < 0.3:
            text = f"{rng.choice(_FILLER)} {text}"
    elif pick < 0.8:
        text = " ".join(rng.choice((*_FILLER, *TRAIN_WORDS)) for _ in range(rng.randint(1, 5)))
    else:
        alphabet = string.ascii_letters + string.digits + " ,.'!?-"
        text = "".join(rng.choices(alphabet, k=rng.randint(1, 30))).strip() or "x"
    style = rng.random()
    if style < 0.25:
        text = text.capitalize()
    elif style < 0.35:
        text = text.upper()
    elif style < 0.45:
        text = text.title()
    return text[:MAX_INSTRUCTION].strip() or "x"
